"""Exact TP > 1 for one Mamba group with the gated norm: the norm group spans TP ranks and its statistic is
all-reduced across them. Logits (test_import_hf, every layout) and gradients match TP=1."""

import pytest
import torch

from falcon_bridge.converters.import_hf import import_hf
from falcon_bridge.converters.reshard import reshard
from falcon_bridge.converters.verify import sample_tokens
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.runtime import (
    init_distributed,
    launch,
    load_model,
    provider_from_checkpoint,
    shutdown_distributed,
)

CARD = "tiny-one-group-gated-norm"
TOKENS = sample_tokens(256, batch=2, seq_len=20, seed=3)
# TP-replicated parameters (their gradient is complete on every rank) and TP-sharded ones (gathered on dim 0)
REPLICATED = ["decoder.layers.0.norm.weight", "decoder.layers.3.mlp.linear_fc1.layer_norm_weight",
              "decoder.final_norm.weight"]
SHARDED = ["decoder.layers.0.mamba_mixer.norm.weight", "decoder.layers.2.mamba_mixer.norm.weight",
           "decoder.layers.1.mamba_mixer.A_log", "decoder.layers.1.mamba_mixer.out_proj.weight"]


def gradient_worker(rank: int, root: str, tp: int) -> dict[str, torch.Tensor] | None:
    """Gradients of the summed next-token loss, full tensors on rank 0."""
    from megatron.core import parallel_state as ps

    provider, it_dir = provider_from_checkpoint(root, tp=tp)
    device = init_distributed(rank, tp, tp, 1)
    try:
        model = load_model(provider, it_dir, device, parallel_output=True)  # vocab-parallel loss
        b, s = TOKENS.shape
        labels = torch.roll(TOKENS, -1, dims=1)
        loss = model(TOKENS, torch.arange(s).expand(b, s), None, labels=labels).sum()
        loss.backward()
        params = dict(model.named_parameters())
        grads = {}
        for name in REPLICATED + SHARDED:
            g = params[name].grad.contiguous()
            if name in SHARDED:
                dim = 1 if name.endswith("out_proj.weight") else 0
                parts = [torch.empty_like(g) for _ in range(tp)]
                torch.distributed.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
                g = torch.cat(parts, dim=dim)
            grads[name] = g
        grads["loss"] = loss.detach()
        return grads if rank == 0 else None
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def checkpoints(tiny_hf, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gated")
    import_hf(str(tiny_hf[CARD]), tmp / "tp2", MegatronLayout(tp=2))  # one group replicated to 2
    reshard(tmp / "tp2", tmp / "tp4", MegatronLayout(tp=4))  # … and to 4
    return tmp


@pytest.mark.parametrize("tp", [2, 4])
def test_gated_norm_spanning_ranks_gives_tp1_gradients(checkpoints, tp):
    """Same checkpoint at TP=1 and TP=tp (the padded vocabulary, part of the loss's softmax, is the checkpoint's)."""
    root = str(checkpoints / f"tp{tp}")
    reference = launch(gradient_worker, 1, root, 1)
    grads = launch(gradient_worker, tp, root, tp)
    assert torch.allclose(grads["loss"], reference["loss"], rtol=1e-5)
    for name in REPLICATED + SHARDED:
        ref, got = reference[name], grads[name]
        rel = (got - ref).abs().max() / ref.abs().max()
        assert rel <= 1e-4, f"TP={tp} {name}: relative gradient error {rel:.2e}"
