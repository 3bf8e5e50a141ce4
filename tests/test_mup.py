"""µP fold/unfold: exactness of the arithmetic, the tied-embedding rule, and export in both modes."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from test_roundtrip import assert_bit_identical, hf_tensors

from falcon_bridge.cards import Card, load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.reshard import ReshardOptions, reshard
from falcon_bridge.converters.verify import compare_logits, hf_logits, sample_tokens
from falcon_bridge.core import mup
from falcon_bridge.core.config import Multipliers
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput


def test_fold_table_on_a_hand_checkable_in_proj():
    arch = load_card("tiny-mup").arch  # ssm_in 1.5, ssm_multipliers z 0.8, x 1.7, B 0.4, C 2.2, dt 0.9
    factor = mup.fold_factor(arch, "model.layers.3.mamba.in_proj.weight")
    d, gn = arch.mamba_d_ssm, arch.group_state
    assert factor.shape == (arch.in_proj_rows, 1)
    assert factor[0, 0] == pytest.approx(1.2) and factor[d, 0] == pytest.approx(2.55)
    assert factor[2 * d, 0] == pytest.approx(0.6) and factor[2 * d + gn, 0] == pytest.approx(3.3)
    assert factor[-1, 0] == pytest.approx(1.35)
    assert mup.fold_factor(arch, "model.layers.0.self_attn.k_proj.weight") == pytest.approx(0.7 * 0.45)
    assert mup.fold_factor(arch, "model.layers.0.feed_forward.up_proj.weight") is None
    assert mup.fold_factor(arch, "model.layers.0.mamba.A_log") is None


def test_unfold_is_bit_exact_for_powers_of_two_and_within_one_ulp_otherwise():
    w = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    for factor in (0.25, 2.0, 0.015625):
        assert torch.equal(mup._apply(mup._apply(w, factor, torch.float32, False), factor, torch.float32, True), w)
    for factor in (0.3535533905932738, 5.656854249492381, 0.23570226039551587, 0.0390625):
        back = mup._apply(mup._apply(w, factor, torch.float32, False), factor, torch.float32, True)
        ulps = (back.view(torch.int32) - w.view(torch.int32)).abs()
        assert ulps.max() <= 1


def test_bf16_fold_unfold_error_bound():
    """bf16 storage: fold rounds once to bf16, unfold once more; the result is within one bf16 ulp of the
    original (relative error ≤ 2⁻⁷), and most values come back exactly."""
    w = torch.randn(1 << 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for factor in (0.3535533905932738, 5.656854249492381, 0.0390625):
        back = mup._apply(mup._apply(w, factor, torch.bfloat16, False), factor, torch.bfloat16, True)
        assert (back.view(torch.int16) - w.view(torch.int16)).abs().max() <= 1
        rel = ((back.float() - w.float()).abs() / w.float().abs()).max().item()
        assert rel <= 2**-7
        assert (back == w).float().mean() > 0.5


def inexact_tied_card() -> Card:
    """Tied embeddings whose lm_head/embedding ratio (1 / 4·√2) does not multiply back exactly in fp32."""
    tied = load_card("tiny-tied")
    return replace(tied, name="tied-inexact", arch=replace(tied.arch, multipliers=replace(
        tied.arch.multipliers, embedding=5.656854249492381, lm_head=1.0)))


def test_tied_embeddings_fold_only_when_the_ratio_is_exact():
    with pytest.raises(BadInput, match="--mup preserve"):
        mup.folded_arch(inexact_tied_card().arch)
    tied = load_card("tiny-tied").arch  # Falcon-H1-Tiny-90M's multipliers: 227/2048 and 5/64
    folded = mup.folded_arch(tied).multipliers
    assert folded.embedding == 1.0 and folded.lm_head == 0.078125 / 0.11083984375 and folded.ssm == (1.0,) * 5
    assert mup.folded_arch(load_card("tiny-mup").arch).multipliers == Multipliers()


def test_fold_refused_for_inexact_tied_card_writes_nothing(tmp_path):
    create_random(CreateRandomOptions(inexact_tied_card(), tmp_path / "src", seed=1, dtype=torch.float32))
    with pytest.raises(BadInput, match="tied embeddings"):
        import_hf(ImportOptions(str(tmp_path / "src"), tmp_path / "out", MegatronLayout(), mup_mode="fold"))
    assert not (tmp_path / "out").exists()


def power_of_two_card() -> Card:
    base = load_card("tiny-groups-gated-norm").arch
    m = Multipliers(embedding=4.0, lm_head=0.125, attention_in=0.5, attention_out=2.0, key=0.25, ssm_in=2.0,
                    ssm_out=0.5, ssm=(0.5, 0.25, 2.0, 0.5, 4.0), mlp=(0.5, 0.25))
    return Card("pow2", "", replace(base, multipliers=m), True, None, {})


def test_fold_then_unfold_round_trip_is_bit_identical_for_power_of_two_multipliers(tmp_path):
    create_random(CreateRandomOptions(power_of_two_card(), tmp_path / "src", seed=2, dtype=torch.float32))
    import_hf(ImportOptions(str(tmp_path / "src"), tmp_path / "mg", MegatronLayout(tp=2), mup_mode="fold"))
    reshard(ReshardOptions(tmp_path / "mg", tmp_path / "mg2", MegatronLayout(pp=2)))  # reshard keeps the mode
    rc = json.loads((tmp_path / "mg2" / "iter_0000000" / "falcon_bridge_run_config.json").read_text())
    assert rc["mup"]["mode"] == "fold" and all(v == 1.0 for v in Multipliers.from_hf(
        rc["mup"]["applied_multipliers"]).flat())
    summary = export_hf(ExportOptions(tmp_path / "mg2", tmp_path / "hf"))
    assert summary.mup == "unfolded"
    assert_bit_identical(tmp_path / "src", tmp_path / "hf")


def test_unfold_of_general_multipliers_is_within_one_ulp(tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf["tiny-mup"]), tmp_path / "mg", MegatronLayout(), mup_mode="fold"))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "hf"))
    source, result = hf_tensors(tiny_hf["tiny-mup"]), hf_tensors(tmp_path / "hf")
    for name in source:
        ulps = (source[name].view(torch.int32) - result[name].view(torch.int32)).abs().max()
        assert ulps <= 1, name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["ssm_multipliers"] == [0.8, 1.7, 0.4, 2.2, 0.9]


def test_keep_folded_export_has_unit_multipliers_and_the_same_logits(tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf["tiny-mup"]), tmp_path / "mg", MegatronLayout(), mup_mode="fold"))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "hf", mup_export="keep-folded"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert all(v == 1.0 for v in Multipliers.from_hf(config).flat())
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        folded_embed = f.get_tensor("model.embed_tokens.weight")
    assert torch.allclose(folded_embed, hf_tensors(tiny_hf["tiny-mup"])["model.embed_tokens.weight"] * 3.0)
    tokens = sample_tokens(256, 2, 24)
    r = compare_logits(hf_logits(tiny_hf["tiny-mup"], tokens, torch.float32),
                       hf_logits(tmp_path / "hf", tokens, torch.float32), tolerance=1e-5)
    assert r.passed, r
