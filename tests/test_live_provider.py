"""Provider-first live bridge (converters/live.py) in gloo processes on CPU: a provider from HF whose settings and
process groups are the framework's, its model (one module, or virtual pipeline chunks under megatron's DDP) loaded
from HF, gives the weights import-hf + dist_checkpointing.load give and the logits of the whole model; bad input
is refused with one message; examples/rl_refit.py refits a transformers model from a trained one."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron_workers import live_provider_misuse, provider_first_checks, virtual_pipeline_checks
from safetensors import safe_open

from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.distributed import launch

REPO = Path(__file__).resolve().parents[1]

# (card, TP, PP, dtype, under Float16Module)
CASES = {
    "falcon-tp1": ("tiny-one-group", 1, 1, None, False),
    "falcon-tp2-bf16-float16module": ("tiny-one-group", 2, 1, torch.bfloat16, True),
    "falcon-tp4-replicated-groups": ("tiny-one-group-gated-norm", 4, 1, None, False),
    "falcon-pp2-tied": ("tiny-tied", 1, 2, None, False),
    "llama-tp2-tied": ("tiny-llama-tied", 2, 1, None, False),
    "llama-pp2-tied": ("tiny-llama-tied", 1, 2, None, False),
}


@pytest.mark.parametrize("case", CASES)
def test_provider_first_model_equals_the_file_path(case, tiny_hf, tmp_path):
    card, tp, pp, dtype, float16_module = CASES[case]
    import_hf(ImportOptions(str(tiny_hf[card]), tmp_path / "mg", MegatronLayout(), dtype=dtype))
    result = launch(provider_first_checks, tp * pp, str(tiny_hf[card]), str(tmp_path / "mg"), tp, pp,
                    float16_module)
    assert result["differ"] == []
    assert result["settings"] == ("full", tp, pp)  # the settings changed on the provider are the model's


@pytest.mark.parametrize("card", ["tiny-tied", "tiny-llama"])
def test_virtual_pipeline_chunks_under_ddp_equal_the_whole_model(card, tiny_hf):
    batches = [sample_tokens(200, 1, 16, seed=s) for s in range(2)]
    result = launch(virtual_pipeline_checks, 2, str(tiny_hf[card]), batches)
    assert result["differ"] == [] and result["compared"] > 10
    assert result["kept_storage"]
    assert len(result["chunk_logits"]) == len(batches)
    for chunks, whole in zip(result["chunk_logits"], result["whole_logits"]):
        assert torch.equal(chunks, whole)
    # DDP's gradient buffers, still those of the loaded parameters, hold the whole model's gradients (summed in
    # another order: fp32 rounding apart)
    assert result["gradient_error"] < 1e-5


def test_virtual_pipeline_chunks_follow_megatrons_interleaved_order():
    from falcon_bridge.cards import load_card

    arch = load_card("tiny-llama").arch  # 4 layers
    layout = MegatronLayout(pp=2, vpp=2).validate(arch)
    # chunk vp_stage · pp + pp_rank holds the next layer: rank 0 runs layers 0 and 2, rank 1 layers 1 and 3
    assert [layout.chunk(4, r, v) for r in range(2) for v in range(2)] == [(1, 0), (1, 2), (1, 1), (1, 3)]
    uneven = MegatronLayout(pp=2, vpp=2, pp_layers=(2, 2)).validate(arch)
    assert uneven.chunk(4, 1, 1) == (1, 3)


@pytest.mark.parametrize(("layout", "message"), [
    (MegatronLayout(pp=2, vpp=3), "must split into 3 equal non-empty model chunks"),
    (MegatronLayout(pp=2, vpp=2, pp_layers=(1, 3)), "must split into 2 equal non-empty model chunks"),
    (MegatronLayout(pp=1, vpp=2), "need a pipeline (pp > 1)"),
    (MegatronLayout(pp=2, vpp=0), "must be ≥ 1"),
])
def test_layouts_virtual_stages_cannot_split_are_refused(layout, message):
    from falcon_bridge.cards import load_card
    from falcon_bridge.errors import BadInput

    with pytest.raises(BadInput, match=re.escape(message)):
        layout.validate(load_card("tiny-llama").arch)


def test_provider_first_misuse_is_refused_with_one_message(tiny_hf):
    seen = launch(live_provider_misuse, 2, str(tiny_hf["tiny-one-group"]), str(tiny_hf["tiny-llama"]),
                  str(tiny_hf["tiny-groups-gated-norm"]))
    expected = ["the layout has 2 virtual pipeline stages: provide() builds one chunk per call, pass vp_stage",
                "the provider is laid out for TP 2, PP 1 but the process groups are TP 1, PP 2: call "
                "provider.lay_out_over(pg_collection) first",
                "3 virtual pipeline stages per rank: the layers of each pipeline stage (2, 2 of num_hidden_layers 4) "
                "must split into 3 equal non-empty model chunks",
                "the live bridge takes one model: one module or the chunks one provider built",
                f"{tiny_hf['tiny-llama']}: a llama checkpoint, but the model is falcon_h1",
                f"{tiny_hf['tiny-groups-gated-norm']}: not the model's architecture: ",
                "mup fold: the model was built for mup preserve"]
    assert len(seen) == len(expected)
    for message, start in zip(seen, expected):
        assert message.startswith(start), (message, start)


def test_the_rl_refit_example_runs(tiny_hf):
    hf = tiny_hf["tiny-one-group"]
    proc = subprocess.run([sys.executable, "examples/rl_refit.py", str(hf)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        assert result["streamed_tensors"] == len(list(f.keys())) and result["not_streamed"] == []
    # the engine, started from other weights, now computes the trained model's logits (two implementations: fp32
    # rounding apart)
    assert result["max_abs_logit_difference"] < 1e-6 < result["logit_scale"]
