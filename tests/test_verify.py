"""verify: block-by-block comparison that names the first place HF and Megatron part ways."""

import json
import subprocess
import sys

import torch

from falcon_bridge.converters.import_hf import import_hf
from falcon_bridge.converters.verify import verify
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats import megatron as mg


def test_json_report_passes_and_then_points_at_a_corrupted_mamba_branch(tiny_hf, tmp_path):
    hf = tiny_hf["tiny-mup"]
    import_hf(str(hf), tmp_path / "good", MegatronLayout(tp=2))
    (tmp_path / "tokens.json").write_text(json.dumps([[5, 17, 3, 99, 42, 8, 250, 1, 64, 7, 12, 200]]))
    proc = subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", "verify", str(hf), str(tmp_path / "good"),
                           "--tp", "2", "--tokens", str(tmp_path / "tokens.json"), "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and result["first_divergence"] is None and result["argmax_agreement"] == 1.0
    components = [(row["layer"], row["component"]) for row in result["layers"]]
    assert components[0] == (None, "embedding") and components[-1] == (None, "final_norm")
    assert (2, "mamba") in components and len(components) == 2 + 3 * 4

    # the same checkpoint with layer 2's Mamba out_proj off by 1 %: the report must point there, not later
    it_dir = tmp_path / "good" / "iter_0000000"
    reader = mg.TorchDistReader(it_dir)
    tensors = {k: reader.get(k) for k in reader.tensors}
    tensors["decoder.layers.2.mamba_mixer.out_proj.weight"] *= 1.01
    bad = tmp_path / "bad"
    mg.write_torch_dist(bad / "iter_0000000", {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()},
                        tensors.__getitem__, objects=dict.fromkeys(
                            k for k in reader._reader.read_metadata().state_dict_metadata if "_extra_state" in k))
    mg.write_run_config(bad / "iter_0000000", mg.read_run_config(it_dir))
    mg.write_tracker(bad)
    report = verify(hf, bad, tp=1, pp=2, dtype=torch.float32)
    assert not report.passed
    assert report.first_divergence == {"layer": 2, "component": "mamba"}
    rows = {(r["layer"], r["component"]): r for r in report.layers}
    assert rows[(1, "mlp")]["relative"] < 1e-5 and rows[(2, "mamba")]["relative"] > 1e-3
