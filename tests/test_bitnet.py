"""BitNet Falcon-H1: TP-invariant scales in Megatron, the three HF formats, and parity with transformers."""

import json
import shutil

import pytest
import torch
from conftest import TINY_CARDS
from safetensors import safe_open
from test_roundtrip import assert_bit_identical, hf_tensors

from falcon_bridge.cards import load_card
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import VerifyOptions, compare_logits, hf_logits, sample_tokens, verify
from falcon_bridge.core import packed_ternary, ternary
from falcon_bridge.core.mapping import is_bitnet_linear
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.megatron.distributed import launch
from falcon_bridge.megatron.forward import megatron_logits_worker

TOKENS = sample_tokens(256, batch=2, seq_len=24, seed=7)
CARDS = [c for c in TINY_CARDS if c != "tiny-attn-width"]  # 6 attention heads: TP=4 does not divide them


@pytest.fixture(scope="module")
def bitnet_checkpoints(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bitnet")
    for name in CARDS:
        import_hf(ImportOptions(str(tiny_hf[name]), tmp / f"{name}-tp2", MegatronLayout(tp=2), bitnet=True))
        import_hf(ImportOptions(str(tiny_hf[name]), tmp / f"{name}-tp4", MegatronLayout(tp=4), bitnet=True))
        export_hf(ExportOptions(tmp / f"{name}-tp2", tmp / f"{name}-packed", fmt="packed"))
    return tmp


def bitnet_agree(a: torch.Tensor, b: torch.Tensor):
    """(whether two BitNet models' fp32 logits agree, the comparison). Before any rounding boundary is crossed the
    two agree to fp32 noise (1e-7, see `verify` on these checkpoints). But quantization is discrete: a 1e-7
    difference upstream (another summation order) can move one int8 activation code across a rounding boundary,
    and later layers carry that jump (~1e-3 of the logits on the tiny cards). So: mean |Δ| ≤ 1e-3 · max |logit|,
    max |Δ| ≤ 1e-2 · max |logit|, argmax agreement ≥ 95 %."""
    r = compare_logits(a, b, tolerance=1e-2)
    return r.passed and r.mean_abs_diff <= 1e-3 * r.max_abs_logit and r.argmax_agreement >= 0.95, r


def test_bitnet_logits_are_the_same_at_every_tp_and_equal_transformers_packed(bitnet_checkpoints):
    """fp32, against transformers' packed BitLinear model and across TP (bitnet_agree)."""

    def roots(layout):  # the tp4 checkpoint was imported with --tp 4 (any import loads at any TP)
        return [str(bitnet_checkpoints / f"{name}-{layout}") for name in CARDS]

    by_tp = {tp: launch(megatron_logits_worker, tp, roots("tp4" if tp == 4 else "tp2"), tp, 1, TOKENS, "float32")
             for tp in (1, 2, 4)}
    for i, name in enumerate(CARDS):
        reference = hf_logits(bitnet_checkpoints / f"{name}-packed", TOKENS, torch.float32)  # transformers BitLinear
        for tp, results in by_tp.items():
            ok, r = bitnet_agree(reference, results[i])
            assert ok, f"{name} TP={tp} vs transformers: {r}"
            ok, r = bitnet_agree(by_tp[1][i], results[i])
            assert ok, f"{name} TP={tp} vs TP=1: {r}"


def test_packed_format_matches_transformers_layout_and_config(bitnet_checkpoints, tiny_hf):
    packed_dir = bitnet_checkpoints / "tiny-mup-packed"
    config = json.loads((packed_dir / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "bitnet", "linear_class": "bitlinear",
                                             "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}
    source, arch = hf_tensors(tiny_hf["tiny-mup"]), load_card("tiny-mup").arch
    with safe_open(packed_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
        for name, latent in source.items():
            if is_bitnet_linear(arch, name):
                packed, scale = f.get_tensor(name), f.get_tensor(name.removesuffix("weight") + "weight_scale")
                assert packed.dtype == torch.uint8 and packed.shape == (latent.shape[0] // 4, latent.shape[1])
                assert torch.equal(packed_ternary.unpack_ternary(packed, latent.shape[0]), ternary.ternarize(latent))
                assert scale.shape == (1,) and torch.allclose(scale, ternary.weight_scale(latent).reshape(1))
            else:
                assert torch.equal(f.get_tensor(name), latent), name  # everything else stays float, untouched
    assert "lm_head.weight_scale" not in names


def test_latent_and_dequantized_formats(bitnet_checkpoints, tiny_hf, tmp_path):
    export_hf(ExportOptions(bitnet_checkpoints / "tiny-mup-tp2", tmp_path / "latent"))
    assert_bit_identical(tiny_hf["tiny-mup"], tmp_path / "latent")
    export_hf(ExportOptions(bitnet_checkpoints / "tiny-mup-tp2", tmp_path / "deq", fmt="dequantized"))
    deq, source = hf_tensors(tmp_path / "deq"), hf_tensors(tiny_hf["tiny-mup"])
    arch = load_card("tiny-mup").arch
    for name in source:
        expected = ternary.weight_fake_quant(source[name]) if is_bitnet_linear(arch, name) else source[name]
        assert torch.equal(deq[name], expected), name
    import_hf(ImportOptions(str(tiny_hf["tiny-mup"]), tmp_path / "plain", MegatronLayout()))
    with pytest.raises(BadInput, match="not a BitNet checkpoint"):
        export_hf(ExportOptions(tmp_path / "plain", tmp_path / "x", fmt="packed"))


def test_packed_checkpoint_survives_import_and_export(bitnet_checkpoints, tmp_path):
    packed = bitnet_checkpoints / "tiny-groups-gated-norm-packed"
    summary = import_hf(ImportOptions(str(packed), tmp_path / "mg", MegatronLayout(tp=2)))
    assert summary.bitnet and "latent" in summary.warnings[0]
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "again", fmt="packed"))
    a, b = hf_tensors(packed), hf_tensors(tmp_path / "again")
    for name in a:
        if a[name].dtype == torch.uint8:
            assert torch.equal(a[name], b[name]), name  # the same ternary values
        else:
            assert torch.allclose(a[name], b[name], rtol=1e-6, atol=0), name  # the same scales and floats


def test_verify_accepts_a_packed_hf_directory(bitnet_checkpoints):
    report = verify(VerifyOptions(bitnet_checkpoints / "tiny-one-group-packed",
                                  bitnet_checkpoints / "tiny-one-group-tp2", tp=2, dtype=torch.float32, tolerance=1e-2))
    assert report.passed, report.to_json()
    assert report.layers[1]["relative"] < 1e-5  # layer 0's Mamba branch: quantized on both sides, fp32 noise apart


def test_bitnet_bad_inputs(bitnet_checkpoints, tmp_path):
    packed = bitnet_checkpoints / "tiny-mup-packed"
    missing_scale = tmp_path / "missing_scale"
    shutil.copytree(packed, missing_scale)
    from safetensors.torch import load_file, save_file

    tensors = load_file(missing_scale / "model.safetensors")
    del tensors["model.layers.1.mamba.in_proj.weight_scale"]
    save_file(tensors, missing_scale / "model.safetensors")
    with pytest.raises(BadInput, match="model.layers.1.mamba.in_proj.weight_scale is missing"):
        import_hf(ImportOptions(str(missing_scale), tmp_path / "out", MegatronLayout()))
    claims = tmp_path / "claims"
    shutil.copytree(bitnet_checkpoints / "tiny-mup-tp2", tmp_path / "mg")
    export_hf(ExportOptions(tmp_path / "mg", claims))  # latent floats …
    cfg = json.loads((claims / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitnet"}  # … under a config that claims packed weights
    (claims / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match="no tensor is packed"):
        import_hf(ImportOptions(str(claims), tmp_path / "out", MegatronLayout()))
    odd = tmp_path / "odd"
    shutil.copytree(packed, odd)
    tensors = load_file(odd / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:-1]
    save_file(tensors, odd / "model.safetensors")
    with pytest.raises(BadInput, match="q_proj.weight has shape \\[60, 64\\]"):
        import_hf(ImportOptions(str(odd), tmp_path / "out", MegatronLayout()))
    with pytest.raises(BadInput, match="--mup fold with --bitnet"):
        import_hf(ImportOptions(str(packed), tmp_path / "out", MegatronLayout(), mup_mode="fold"))
    assert not (tmp_path / "out").exists()


def bf16_bitnet_worker(rank: int, card: str) -> dict:
    """Our BitNet model as Megatron-LM trains it in bf16 (wrapped in megatron-core's Float16Module, which casts every
    floating-point parameter and buffer): each linear's quantized weight against fp32's on the same (bf16-rounded)
    weights, and a forward."""
    from megatron.core.transformer.module import Float16Module

    from falcon_bridge.megatron.distributed import init_distributed, shutdown_distributed
    from falcon_bridge.megatron.provider import provider_class

    init_distributed(rank, 1, 1, 1)
    try:
        arch = load_card(card).arch
        model = provider_class(arch)(arch, MegatronLayout(), torch.float32, bitnet=True).provide()
        linears = {n: m for n, m in model.named_modules() if hasattr(m, "bitnet_segment")}
        with torch.no_grad():
            for m in linears.values():
                m.weight.copy_(m.weight.bfloat16())
            in_fp32 = {n: m.quantized_weight(m.weight) for n, m in linears.items()}
        wrapped = Float16Module(model.config.__class__(**{**vars(model.config), "bf16": True,
                                                          "params_dtype": torch.bfloat16}), model)
        with torch.no_grad():
            # the same ternary values and scales, then the bf16 straight-through sum both sides compute
            unequal = [n for n, m in linears.items()
                       if not torch.equal(m.quantized_weight(m.weight), ternary.ste(m.weight, in_fp32[n].bfloat16()))]
            tokens = torch.randint(0, arch.vocab_size, (1, 16))
            logits = wrapped(tokens, None, None)
        return {"linears": len(linears),
                "buffer_dtypes": sorted({str(b.dtype) for m in linears.values() for n, b in m.named_buffers()
                                         if n.startswith("bitnet_")}),
                "unequal": unequal,
                "finite": bool(torch.isfinite(logits).all()),
                "param_dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    finally:
        shutdown_distributed()


@pytest.mark.parametrize("card", ["tiny-one-group", "tiny-llama-tied"])
def test_bitnet_model_trains_in_bf16_as_megatron_lm_casts_it(card):
    """Megatron-LM's bf16 training wraps the model in Float16Module, which casts floating buffers to bf16: the
    per-HF-tensor counts behind each absmean scale are integer buffers, so they stay exact, and the quantized
    weights equal fp32's on the same weights up to bf16 rounding of the result (an H200 run of a Falcon3-1.58bit
    card failed here when the counts were fp64 buffers cast to bf16)."""
    result = launch(bf16_bitnet_worker, 1, card)
    assert result["linears"] > 0 and result["buffer_dtypes"] == ["torch.int64"], result
    assert result["unequal"] == [], result
    assert result["finite"] and result["param_dtypes"] == ["torch.bfloat16"], result
