"""Training our Megatron model as Megatron-LM trains it: megatron-core's DDP and optimizer around it, and the
next-token loss of a batch.
"""

from __future__ import annotations

import torch


def wrap_for_training(model, lr: float = 1e-3):
    """Our model wrapped as Megatron-LM trains it: megatron-core's DDP (fp32 gradient buffers) with
    finalize_model_grads as the schedule's gradient finalizer, and get_megatron_optimizer's AdamW (weight decay
    0.1, betas 0.9/0.95, no clipping; bf16 weights get fp32 master copies). Returns (ddp, optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    bf16 = config.params_dtype == torch.bfloat16
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=0.1, clip_grad=0.0, adam_beta1=0.9, adam_beta2=0.95, bf16=bf16,
        params_dtype=config.params_dtype), [ddp])
    return ddp, optimizer


def next_token_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s-1] of predicting each next token, as HF's labels=input_ids loss (one stage, TP
    vocab-parallel): the last position has no next token and is left out."""
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    return model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))[:, :-1]
