"""Exact TP > 1 for one Mamba group with the gated norm: the norm group spans TP ranks and its statistic is
all-reduced across them. Logits (test_import_hf, every layout) and gradients match TP=1."""

import pytest
import torch
from megatron_workers import loss_and_gradients

from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.reshard import ReshardOptions, reshard
from falcon_bridge.converters.verify import sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.distributed import launch

CARD = "tiny-one-group-gated-norm"
TOKENS = sample_tokens(256, batch=2, seq_len=20, seed=3)
# TP-replicated parameters (their gradient is complete on every rank: None) and TP-sharded ones (their TP dim)
PARAMETERS = {"decoder.layers.0.norm.weight": None, "decoder.layers.3.mlp.linear_fc1.layer_norm_weight": None,
              "decoder.final_norm.weight": None, "decoder.layers.0.mamba_mixer.norm.weight": 0,
              "decoder.layers.2.mamba_mixer.norm.weight": 0, "decoder.layers.1.mamba_mixer.A_log": 0,
              "decoder.layers.1.mamba_mixer.out_proj.weight": 1}


@pytest.fixture(scope="module")
def checkpoints(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gated")
    import_hf(ImportOptions(str(tiny_hf[CARD]), tmp / "tp2", MegatronLayout(tp=2)))  # one group replicated to 2
    reshard(ReshardOptions(tmp / "tp2", tmp / "tp4", MegatronLayout(tp=4)))  # … and to 4
    return tmp


@pytest.mark.parametrize("tp", [2, 4])
def test_gated_norm_spanning_ranks_gives_tp1_gradients(checkpoints, tp):
    """Same checkpoint at TP=1 and TP=tp."""
    root = str(checkpoints / f"tp{tp}")
    reference = launch(loss_and_gradients, 1, root, 1, TOKENS, PARAMETERS)
    grads = launch(loss_and_gradients, tp, root, tp, TOKENS, PARAMETERS)
    assert torch.allclose(grads["loss"], reference["loss"], rtol=1e-5)
    for name in PARAMETERS:
        ref, got = reference[name], grads[name]
        rel = (got - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-4, f"TP={tp} {name}: relative gradient error {rel:.2e}"
