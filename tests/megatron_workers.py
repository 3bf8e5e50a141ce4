"""Worker functions run in spawned TP processes by several tests (module-level, so `launch` can pickle them)."""

from pathlib import Path

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


def train_and_save(rank: int, root: str, tp: int, pp: int, batches: list[torch.Tensor], out: str,
                   save_gradients: bool = False, lr: float = 1e-3) -> None:
    """Train as Megatron-LM does: megatron-core's DDP wrapper, get_forward_backward_func's schedule (one
    microbatch per step, the summed next-token loss), finalize_model_grads and get_megatron_optimizer's AdamW,
    one step per batch; then dist_checkpointing.save the weights into `out` (a checkpoint export-hf reads, with
    the source's run config). save_gradients: no optimizer step; save the gradients of the first batch in the
    weights' place instead, so that export-hf maps them to HF names and layout."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from falcon_bridge.formats import megatron as mg

    provider, it_dir = provider_from_checkpoint(root, tp=tp, pp=pp)
    device = init_distributed(rank, tp * pp, tp, pp)
    try:
        model = load_model(provider, it_dir, device, parallel_output=True).train()
        config = model.config
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.1, clip_grad=0.0,
                                                           adam_beta1=0.9, adam_beta2=0.95), [ddp])

        def forward_step(data_iterator, module):
            tokens = next(data_iterator).to(device)
            b, s = tokens.shape
            positions = torch.arange(s, device=device).expand(b, s)
            labels = torch.roll(tokens, -1, dims=1) if ps.is_pipeline_last_stage() else None
            output = module(tokens, positions, None, labels=labels)

            def loss(per_token):
                total = per_token[:, :-1].sum()  # the last position has no next token
                return total, {"loss": total.detach()}
            return output, loss

        for tokens in batches:
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([tokens]), model=[ddp],
                                        num_microbatches=1, seq_length=tokens.shape[1],
                                        micro_batch_size=tokens.shape[0], forward_only=False)
            if save_gradients:
                for p in model.parameters():
                    p.data.copy_(p.main_grad)
                break
            optimizer.step()
        out_it = Path(out) / mg.iteration_dir_name(0)
        out_it.mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), str(out_it))
        if rank == 0:
            mg.write_run_config(out_it, mg.read_run_config(it_dir))
            mg.write_tracker(Path(out), 0)
    finally:
        shutdown_distributed()
