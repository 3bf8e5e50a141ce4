"""Worker functions run in spawned TP processes by several tests (module-level, so `launch` can pickle them)."""

import torch

from falcon_bridge.megatron.runtime import (
    init_distributed,
    load_model,
    next_token_loss,
    provider_from_checkpoint,
    shutdown_distributed,
)


def loss_and_gradients(rank: int, root: str, tp: int, tokens: torch.Tensor, gather_dims: dict[str, int | None]
                       ) -> dict[str, torch.Tensor] | None:
    """Training step of our model: the per-token next-token loss [b, s-1] (the vocab-parallel loss megatron trains
    with) and the gradients of its sum for the parameters in `gather_dims` (name → the dim TP shards it on, or None
    when replicated), as full tensors on rank 0."""
    from megatron.core import parallel_state as ps

    provider, it_dir = provider_from_checkpoint(root, tp=tp)
    device = init_distributed(rank, tp, tp, 1)
    try:
        model = load_model(provider, it_dir, device, parallel_output=True).train()
        loss = next_token_loss(model, tokens.to(device))
        loss.sum().backward()
        params = dict(model.named_parameters())
        out = {"loss": loss.detach().cpu()}
        for name, dim in gather_dims.items():
            g = params[name].grad.contiguous()
            if dim is not None:
                parts = [torch.empty_like(g) for _ in range(tp)]
                torch.distributed.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
                g = torch.cat(parts, dim=dim)
            out[name] = g.cpu()
        return out if rank == 0 else None
    finally:
        shutdown_distributed()
