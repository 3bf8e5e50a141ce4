"""import-hf proven by logits: HF FalconH1ForCausalLM vs our Megatron model, every tiny card, TP=1, TP=2, PP=2."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import TINY_CARDS, legacy_layout_checkpoint
from safetensors.torch import load_file, save_file

from falcon_bridge.cards import load_card
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import compare_logits, hf_logits, sample_tokens
from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.mapping import megatron_extra_state_keys, megatron_tensor_shapes
from falcon_bridge.core.parallel import MegatronLayout, stored_as_hf
from falcon_bridge.errors import BadInput
from falcon_bridge.formats.megatron import TorchDistReader, find_iteration_dir
from falcon_bridge.megatron.distributed import launch
from falcon_bridge.megatron.forward import megatron_logits_worker

TOKENS = sample_tokens(vocab_size=256, batch=2, seq_len=24)  # 24 > mamba_chunk_size 8: the scan crosses chunks


@pytest.fixture(scope="module")
def reference_logits(tiny_hf):
    return {name: hf_logits(tiny_hf[name], TOKENS, torch.float32) for name in TINY_CARDS}


# (TP, PP) the model runs at, the layout import-hf was told, µP mode. The checkpoint is the same for every TP/PP
# (HF's vocabulary rows and Mamba groups): megatron's dist_checkpointing.load alone opens it at another layout.
LAYOUTS = {"tp1": ((1, 1), (1, 1), "preserve"), "tp2": ((2, 1), (2, 1), "preserve"),
           "pp2-from-tp2-import": ((1, 2), (2, 1), "preserve"), "tp4-from-tp1-import": ((4, 1), (1, 1), "preserve"),
           "tp2pp2-from-tp1-import": ((2, 2), (1, 1), "preserve"), "tp2-mup-folded": ((2, 1), (2, 1), "fold")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_megatron_logits_equal_hf(layout, tiny_hf, reference_logits, tmp_path):
    """fp32, max |Δ| ≤ 1e-5 · max |logit| (folded µP included: folded = preserved = HF)."""
    (tp, pp), imported_as, mup_mode = LAYOUTS[layout]
    cards = [c for c in TINY_CARDS if fits(FalconH1Arch.from_hf(json.loads((tiny_hf[c] / "config.json").read_text())),
                                        tp, pp)]
    for name in cards:
        import_hf(ImportOptions(str(tiny_hf[name]), tmp_path / name, MegatronLayout(*imported_as), mup_mode=mup_mode))
    assert len(cards) >= 4
    results = launch(megatron_logits_worker, tp * pp, [str(tmp_path / c) for c in cards], tp, pp, TOKENS, "float32")
    for name, logits in zip(cards, results):
        r = compare_logits(reference_logits[name], logits, tolerance=1e-5)
        assert r.passed, f"{name} {layout}: {r}"
        assert r.argmax_agreement == 1.0


@pytest.mark.parametrize("tp", [1, 4])
def test_checkpoints_that_stored_a_tp_layout_still_load(tiny_hf, reference_logits, tmp_path, tp):
    """Checkpoints written before the TP-agnostic layout stored TP=2's padded vocabulary and replicated Mamba
    groups; they still load at any TP (each local group reads its HF group's first stored copy) and export."""
    roots = []
    for name in ("tiny-vocab-pad", "tiny-one-group-gated-norm", "tiny-tied"):
        import_hf(ImportOptions(str(tiny_hf[name]), tmp_path / f"{name}-new", MegatronLayout()))
        roots.append(legacy_layout_checkpoint(tmp_path / f"{name}-new", tmp_path / name, tp=2))
    tokens = sample_tokens(vocab_size=256, batch=2, seq_len=24)
    for name, logits in zip(("tiny-vocab-pad", "tiny-one-group-gated-norm", "tiny-tied"),
                            launch(megatron_logits_worker, tp, [str(r) for r in roots], tp, 1, tokens, "float32")):
        assert compare_logits(hf_logits(tiny_hf[name], tokens, torch.float32), logits, tolerance=1e-5).passed, name


def fits(arch, tp, pp) -> bool:
    try:
        MegatronLayout(tp=tp, pp=pp).validate(arch)
        return True
    except BadInput:
        return False


def test_checkpoint_holds_exactly_the_model_keys(tiny_hf, tmp_path):
    """Keys and global shapes equal what the Megatron model's sharded_state_dict() asks for (checked in a real
    megatron process by test_megatron_logits_equal_hf, which loads with megatron's strict default)."""
    arch = load_card("tiny-vocab-pad").arch
    import_hf(ImportOptions(str(tiny_hf["tiny-vocab-pad"]), tmp_path / "ckpt", MegatronLayout(tp=2)))
    reader = TorchDistReader(find_iteration_dir(tmp_path / "ckpt"))
    expected = megatron_tensor_shapes(arch, stored_as_hf(arch))
    assert {k: v[0] for k, v in reader.tensors.items()} == expected
    # stored as HF has them, although TP=2 pads 1001 ids to 1024 and replicates the one B/C group to 2
    assert expected["embedding.word_embeddings.weight"] == (1001, 64)
    assert expected["decoder.layers.0.mamba_mixer.in_proj.weight.B"] == (16, 64)
    run_config = json.loads((find_iteration_dir(tmp_path / "ckpt") / "falcon_bridge_run_config.json").read_text())
    assert run_config["layout"]["tp"] == 2 and run_config["mup"]["mode"] == "preserve"
    assert len(megatron_extra_state_keys(arch)) == 7 * arch.num_layers + 2  # linears and (TE) norms
    embed = reader.get("embedding.word_embeddings.weight")
    source = load_file(tiny_hf["tiny-vocab-pad"] / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(embed, source)


def _copy(src, dst, edit=None, config_edit=None):
    shutil.copytree(src, dst)
    if edit:
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors")
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


BAD_INPUTS = {
    "missing tensor": (lambda t: t.pop("model.layers.1.mamba.D"), None, "model.layers.1.mamba.D is missing", {}),
    "extra tensor": (lambda t: t.update({"model.layers.0.mamba.bogus": torch.zeros(2)}), None,
                     "unexpected tensor model.layers.0.mamba.bogus", {}),
    "wrong shape": (lambda t: t.update({"model.layers.0.mamba.A_log": torch.zeros(3)}), None,
                    "model.layers.0.mamba.A_log has shape [3]", {}),
    "tp not dividing heads": (None, None, "--tp 3 does not divide num_attention_heads", {"tp": 3}),
    "tp vs kv heads": (None, lambda c: c.update(num_attention_heads=6, num_key_value_heads=3), "num_key_value_heads",
                       {"tp": 2}),
    "pp not dividing layers": (None, None, "--pp 3 does not divide num_hidden_layers", {"pp": 3}),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_clear_error_and_nothing_is_written(case, tiny_hf, tmp_path):
    edit, config_edit, message, layout = BAD_INPUTS[case]
    src = _copy(tiny_hf["tiny-one-group"], tmp_path / "src", edit, config_edit)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    with pytest.raises(BadInput, match=message.replace("[", r"\[")):
        import_hf(ImportOptions(str(src), tmp_path / "out", MegatronLayout(**layout)))
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [src]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is never modified


def test_tp_beyond_groups_with_the_gated_norm_needs_groups_dividing_tp():
    arch = replace(load_card("tiny-groups-gated-norm").arch, num_heads=12, num_kv_heads=3, mamba_n_heads=12,
                   mamba_d_head=8)  # 2 groups; TP=3 divides every head count, but not the groups
    with pytest.raises(BadInput, match="gated Mamba norm"):
        MegatronLayout(tp=3).validate(arch)
    assert MegatronLayout(tp=3).validate(replace(arch, mamba_rms_norm=False)).mamba_groups(arch) == 6
    assert MegatronLayout(tp=4).validate(replace(arch, num_heads=8, num_kv_heads=4)).mamba_groups(arch) == 4


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(tiny_hf, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", "import-hf", str(tiny_hf["tiny-mup"]),
                           str(tmp_path / "out"), "--tp", "3"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --tp 3 does not divide num_attention_heads (4)"]
    assert not (tmp_path / "out").exists()


def test_offline_hub_id_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="nor in the local Hugging Face cache, and the Hub cannot be reached"):
        import_hf(ImportOptions("tiiuae/Falcon-H1-0.5B-Base", tmp_path / "out", MegatronLayout()))
