"""verify: block-by-block comparison that names the first place HF and Megatron part ways."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import edited_megatron_checkpoint

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import VerifyOptions, default_tolerance, difference, verify
from falcon_bridge.core import mup
from falcon_bridge.core.parallel import MegatronLayout


def test_json_report_passes_and_then_points_at_a_corrupted_mamba_branch(tiny_hf, tmp_path):
    hf = tiny_hf["tiny-mup"]
    import_hf(ImportOptions(str(hf), tmp_path / "good", MegatronLayout(tp=2)))
    (tmp_path / "tokens.json").write_text(json.dumps([[5, 17, 3, 99, 42, 8, 250, 1, 64, 7, 12, 200]]))
    proc = subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", "verify", str(hf), str(tmp_path / "good"),
                           "--tokens", str(tmp_path / "tokens.json"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["tp"], result["pp"]) == (2, 1)  # the layout import-hf recorded, without --tp
    assert result["passed"] and result["first_divergence"] is None and result["argmax_agreement"] == 1.0
    components = [(row["layer"], row["component"]) for row in result["layers"]]
    assert components[0] == (None, "embedding") and components[-1] == (None, "final_norm")
    assert (2, "mamba") in components and len(components) == 2 + 3 * 4

    # the same checkpoint with layer 2's Mamba out_proj off by 1 %: the report must point there, not later
    bad = edited_megatron_checkpoint(tmp_path / "good", tmp_path / "bad",
                                     lambda t: t["decoder.layers.2.mamba_mixer.out_proj.weight"].mul_(1.01))
    report = verify(VerifyOptions(hf, bad, tp=1, pp=2, dtype=torch.float32))
    assert not report.passed
    assert report.first_divergence == {"layer": 2, "component": "mamba"}
    rows = {(r["layer"], r["component"]): r for r in report.layers}
    assert rows[(1, "mlp")]["relative"] < 1e-5 and rows[(2, "mamba")]["relative"] > 1e-3


def test_prompt_is_tokenized_with_the_checkpoints_tokenizer_carried_through_import(tiny_hf, tmp_path):
    hf = tiny_hf["tiny-vocab-pad"]  # large enough a vocabulary for create-random's tokenizer
    summary = import_hf(ImportOptions(str(hf), tmp_path / "mg", MegatronLayout()))
    assert (tmp_path / "mg" / "iter_0000000" / "tokenizer.json").exists()
    report = verify(VerifyOptions(hf, tmp_path / "mg", prompt="Falcon-H1 runs attention and Mamba side by side"))
    assert report.passed and summary.tensors > 0


def test_default_tolerance_follows_the_precision_the_kernels_compute_in(monkeypatch):
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    assert default_tolerance(torch.float32, "cpu") == 1e-4
    assert default_tolerance(torch.float32, "cuda") == 1e-3  # Triton's TF32 dots in mamba-ssm's SSD kernels
    assert default_tolerance(torch.bfloat16, "cuda") == default_tolerance(torch.bfloat16, "cpu") == 3e-2
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    assert default_tolerance(torch.float32, "cuda") == 1e-4


def test_cosine_of_a_large_tensor_with_itself_is_one():
    x = torch.randn(4, 512, 8192)  # summed in fp32, this cosine comes out as 1.0013
    assert abs(difference(x, x)["cosine"] - 1.0) < 1e-12


@pytest.mark.parametrize("card", ["tiny-mup", "tiny-tied"])
def test_bf16_fold_is_judged_against_the_same_rounding_and_a_wrong_fold_still_fails(card, tmp_path, monkeypatch):
    """Every released checkpoint is bf16: folding into it rounds each folded weight once. import-hf says so; verify
    compares with HF's weights folded the same way (at the fp32 bar) and reports the rounding's own effect; a fold
    with one multiplier wrong fails, pointing at the branch it feeds."""
    create_random(CreateRandomOptions(load_card(card), tmp_path / "hf", seed=3, dtype=torch.bfloat16))
    summary = import_hf(ImportOptions(str(tmp_path / "hf"), tmp_path / "folded", MegatronLayout(tp=2), mup_mode="fold"))
    assert any("rounded once" in w and "--dtype fp32" in w for w in summary.warnings)
    report = verify(VerifyOptions(tmp_path / "hf", tmp_path / "folded", tp=2))
    assert report.passed, report.to_json()
    assert report.tolerance == 1e-4 and "folded into bfloat16" in report.reference
    assert 0 < report.fold_rounding.relative < 3e-2  # bf16 rounding: visible, small
    if card == "tiny-tied":
        return  # the shared matrix's fold is what this card adds; the wrong fold is one card's job

    right = mup.fold_factor  # mup.fold looks the factor up through this module-level name: patch it there
    monkeypatch.setattr(mup, "fold_factor", lambda a, name: right(a, name) * 1.05
                        if name.endswith("mamba.out_proj.weight") else right(a, name))
    import_hf(ImportOptions(str(tmp_path / "hf"), tmp_path / "wrong", MegatronLayout(), mup_mode="fold"))
    monkeypatch.undo()
    report = verify(VerifyOptions(tmp_path / "hf", tmp_path / "wrong"))
    assert not report.passed and report.first_divergence == {"layer": 0, "component": "mamba"}
