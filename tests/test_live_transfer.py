"""The live bridge's export through a transfer plan (converters/live.py: transfer_plan, export_hf_weights,
export_hf_buckets), in gloo processes on CPU: at TP 1/2/4, PP 2, TP 2 × PP 2 and virtual pipeline stages, a wrapped
model included, every bucket size, a filtered plan and one tensor per bucket give exactly the tensors export-hf gives
for the same weights, the same on every rank; a drifted replica is reported and the main copy exported; misuse fails
on every rank with one message and no hang."""

import pytest
import torch
from megatron_workers import live_transfer_checks, live_transfer_misuse
from test_live import stored

from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.distributed import launch

# (card, TP, PP, virtual stages, under megatron DDP)
CASES = {
    "tp1": ("tiny-one-group", 1, 1, 1, False),
    "tp2-replicated-groups-ddp": ("tiny-one-group", 2, 1, 1, True),
    "tp4-padding-only-vocab-shards": ("tiny-llama-tied", 4, 1, 1, False),
    "pp2-tied-across-stages": ("tiny-llama-tied", 1, 2, 1, False),
    "tp2pp2": ("tiny-one-group", 2, 2, 1, False),
    "pp2-virtual-stages-ddp": ("tiny-one-group", 1, 2, 2, True),
}


def exported(hf, tmp_path) -> dict:
    """What export-hf writes for the weights of HF checkpoint `hf` (imported first)."""
    import_hf(ImportOptions(str(hf), tmp_path / "mg", MegatronLayout()))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "exported"))
    return stored(tmp_path / "exported")


def assert_exactly(streamed: dict, files: dict) -> None:
    for name, tensor in streamed.items():
        assert tensor.dtype == files[name].dtype and torch.equal(tensor, files[name]), name


@pytest.mark.parametrize("case", CASES)
def test_bucketed_and_filtered_export_equals_export_hf(case, tiny_hf, tmp_path):
    card, tp, pp, vpp, wrap = CASES[case]
    files = exported(tiny_hf[card], tmp_path)
    result = launch(live_transfer_checks, tp * pp, str(tiny_hf[card]), tp, pp, vpp, wrap)

    for label in ("default", "3x-smallest", "smallest"):
        assert sorted(result["streams"][label]) == sorted(files), label  # every tensor, once
        assert_exactly(result["streams"][label], files)
    assert result["buckets"]["default"] == pp * vpp  # one per run of entries a stage holds
    assert result["buckets"]["smallest"] > result["buckets"]["3x-smallest"] >= result["buckets"]["default"]
    assert [row[0] for row in result["plan"]] == list(result["streams"]["default"])  # the plan's names, map order
    for name, shape, dtype, stage, chunk, nbytes in result["plan"]:
        assert (shape, dtype, nbytes) == (tuple(files[name].shape), files[name].dtype, files[name].nbytes), name
        assert 0 <= stage < pp and 0 <= chunk < vpp
    if pp > 1:  # each stage owns its layers; the embedding the first, the final norm (and lm_head) the last
        stages = {name: stage for name, _, _, stage, _, _ in result["plan"]}
        assert stages["model.embed_tokens.weight"] == 0 and result["plan"][-1][3] == pp - 1
        assert {stages[n] for n in stages if n.startswith("model.layers.")} == set(range(pp))

    assert sorted(result["subset"]) == sorted(n for n in files if n.endswith(("q_proj.weight", "norm.weight")))
    assert sorted(result["streams"]["filtered"]) == sorted(result["subset"])
    assert_exactly(result["streams"]["filtered"], files)
    q_proj = sorted(n for n in files if n.endswith("q_proj.weight"))
    assert sorted(names[0] for names in result["one_each"]) == q_proj
    assert all(len(names) == 1 for names in result["one_each"])

    for digests in result["digests"]:  # every rank yielded the same tensors
        assert digests == result["digests"][0]
    for divergences in result["divergences"]:
        assert all(divergences[label] == {} for label in ("default", "3x-smallest", "smallest"))
    if result["changed"] is not None:  # the last rank's copy of layer 0's B group drifted by 1
        for divergences in result["divergences"]:
            assert divergences["changed"] == {"model.layers.0.mamba.in_proj.weight": 1.0}
        assert_exactly(result["changed"], files)  # the main copy was exported


def test_misuse_fails_on_every_rank_without_a_hang(tiny_hf):
    seen = launch(live_transfer_misuse, 2, str(tiny_hf["tiny-one-group"]),
                  str(tiny_hf["tiny-one-group-gated-norm"]))
    said = [dict(line.split(": ", 1) for line in lines) for lines in seen]
    for rank in (0, 1):
        assert said[rank]["unknown name"] == "not in the transfer plan: ['model.nope']"
        assert said[rank]["other model"].startswith("rank 0: the transfer plan was built for another model or layout")
        assert said[rank]["too small"].startswith("bucket_bytes ") and "the largest tensor" in said[rank]["too small"]
        assert said[rank]["selection"].startswith("the ranks disagree on the transfer plan")
        assert said[rank]["bucket sizes"].startswith("the ranks disagree on the transfer plan")
        assert said[rank]["after"] == "done"  # the stream works again after the abandoned ones
        assert said[rank]["reallocated"].startswith("rank 0: the transfer plan was built for other parameters")
        assert said[rank]["collective after"] == "2"
    assert said[0]["stopped"] == "done"  # rank 0 chose to stop after one tensor
    assert said[1]["stopped"].startswith("another rank stopped reading the export early")
    assert said[0]["failed"].startswith("another rank stopped reading the export early")
    assert said[1]["failed"] == "the consumer failed"
