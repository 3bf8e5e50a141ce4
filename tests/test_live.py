"""The live bridge (converters/live.py) against the file path, in gloo processes on CPU: HF → running model gives
the weights import-hf + dist_checkpointing.load give; a running model → HF gives the bytes export-hf gives; a model
trained a few steps and saved live equals the same model saved and exported through files; misuse fails on every
rank without a hang."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron_workers import live_bridge_checks, live_bridge_misuse, train_and_save
from safetensors import safe_open

from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.verify import sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats.hf import ulp_differences
from falcon_bridge.formats.manifest import check_manifest
from falcon_bridge.megatron.distributed import launch

REPO = Path(__file__).resolve().parents[1]

# (card, TP, PP, µP mode, BitNet, HF format): one TP/PP each, covering what the live path must get right
CASES = {
    "tp1-mup-folded": ("tiny-mup", 1, 1, "fold", False, "latent"),
    "tp2-bitnet-packed": ("tiny-one-group", 2, 1, "preserve", True, "packed"),
    "tp4-replicated-groups": ("tiny-one-group-gated-norm", 4, 1, "preserve", False, "latent"),
    "pp2-tied": ("tiny-tied", 1, 2, "preserve", False, "latent"),
    "tp2pp2-vocab-pad": ("tiny-vocab-pad", 2, 2, "preserve", False, "latent"),
}


def stored(directory):
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.mark.parametrize("case", CASES)
def test_live_bridge_equals_the_file_path(case, tiny_hf, tmp_path):
    card, tp, pp, mup, bitnet, fmt = CASES[case]
    hf = tiny_hf[card]
    import_hf(ImportOptions(str(hf), tmp_path / "mg", MegatronLayout(), mup_mode=mup, bitnet=bitnet))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "exported", fmt=fmt))
    result = launch(live_bridge_checks, tp * pp, str(hf), str(tmp_path / "mg"), tp, pp, mup, bitnet, fmt,
                    str(tmp_path / "live"))
    assert result["differ"] == []  # HF → live model: the weights import-hf + dist_checkpointing.load give
    files = stored(tmp_path / "exported")
    assert sorted(result["streamed"]) == sorted(files)  # every tensor, once
    for name, tensor in files.items():
        assert tensor.dtype == result["streamed"][name].dtype and torch.equal(tensor, result["streamed"][name]), name
    assert set(ulp_differences(tmp_path / "exported", tmp_path / "live").values()) == {0}
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "live" / name).read_text()) == json.loads((tmp_path / "exported" / name)
                                                                                 .read_text())
    assert check_manifest(tmp_path / "live") == []


def test_trained_model_saved_live_equals_saved_and_exported_through_files(tiny_hf, tmp_path):
    card = "tiny-groups-gated-norm"
    import_hf(ImportOptions(str(tiny_hf[card]), tmp_path / "mg", MegatronLayout()))
    batches = [sample_tokens(256, 2, 16, seed=s) for s in range(3)]
    launch(train_and_save, 4, str(tmp_path / "mg"), 4, 1, batches, str(tmp_path / "trained"), False,
           str(tmp_path / "live"))
    export_hf(ExportOptions(tmp_path / "trained", tmp_path / "exported"))
    differences = ulp_differences(tmp_path / "exported", tmp_path / "live")
    assert differences and set(differences.values()) == {0}
    assert stored(tmp_path / "live")["model.layers.0.mamba.in_proj.weight"].ne(
        stored(tiny_hf[card])["model.layers.0.mamba.in_proj.weight"]).any()  # it did train


def test_misuse_fails_on_every_rank_without_a_hang(tiny_hf):
    seen = launch(live_bridge_misuse, 2, str(tiny_hf["tiny-one-group"]), 2)
    for lines in seen:
        assert any(line.startswith("not ours: Linear: not a model built by") for line in lines), lines
        assert any(line.startswith("disagree: the ranks disagree on the model") for line in lines), lines
        assert lines[-1] == "collective after: 2"
    assert any(line.startswith("abandoned: another rank stopped reading") for line in seen[1])
    assert not any(line.startswith("abandoned") for line in seen[0])  # rank 0 chose to stop


def test_the_example_runs(tiny_hf, tmp_path):
    proc = subprocess.run([sys.executable, "examples/live_bridge.py", str(tiny_hf["tiny-one-group"]),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "'streamed_parameters': 267424" in proc.stdout and check_manifest(tmp_path / "out") == []
