"""Forward passes of our Megatron model across TP×PP ranks, and what verify records of them: the pipeline forward
(hidden states sent between stages), hooks capturing each block's branch outputs, and the worker that returns
a checkpoint's logits on global rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from falcon_bridge.megatron.checkpoint import load_model, provider_from_checkpoint
from falcon_bridge.megatron.distributed import init_distributed, shutdown_distributed


@torch.no_grad()
def pipeline_forward(model, tokens: torch.Tensor, hidden_size: int, dtype: torch.dtype):
    """One forward pass through all pipeline stages (send/recv of the hidden states between stages).

    Returns the full-vocabulary logits [b, s, V_padded] on the last stage, None elsewhere.
    """
    from megatron.core import parallel_state as ps

    device = tokens.device
    b, s = tokens.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, hidden_size, dtype=dtype, device=device)
        torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, None)  # causal attention needs no mask
    if not ps.is_pipeline_last_stage():
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def record_scaled_outputs(modules: dict[str, tuple[torch.nn.Module, float]], captured: dict[str, torch.Tensor],
                          megatron: bool) -> list:
    """Forward hooks storing each module's output × its multiplier in captured[name] as [b, s, h] fp32 on CPU.
    megatron: outputs are (output, bias) pairs in [s, b, h] (the bias is added); else HF's [b, s, h] outputs,
    whose tuple extras (attention weights) are dropped."""
    def hook(name, multiplier):
        def record(module, inputs, output):
            if isinstance(output, tuple):
                out, extra = output[0], output[1] if len(output) > 1 else None
            else:
                out, extra = output, None
            if megatron:
                out = (out if extra is None else out + extra).transpose(0, 1)
            captured[name] = (out * multiplier).float().cpu()
        return record

    return [module.register_forward_hook(hook(name, multiplier)) for name, (module, multiplier) in modules.items()]


def capture_branches(model, captured: dict[str, torch.Tensor]) -> list:
    """Forward hooks recording what each block adds to the residual stream, as HF's module outputs × multipliers:
    `embedding`, `{layer}.mamba`, `{layer}.attention`, `{layer}.mlp`, `final_norm` ([b, s, h], fp32, CPU).
    With µP folded the model's multipliers are 1.0 and the folded weights carry them, so both compare alike."""
    c = model.config
    modules = {"embedding": (model.embedding, c.embedding_multiplier)} if model.pre_process else {}
    for layer in model.decoder.layers:
        i = layer.layer_number - 1
        modules |= {f"{i}.mamba": (layer.mamba_mixer, c.ssm_out_multiplier),
                    f"{i}.attention": (layer.self_attention, c.attention_out_multiplier),
                    f"{i}.mlp": (layer.mlp, c.mlp_multipliers[1])}
    if model.post_process:
        modules["final_norm"] = (model.decoder.final_norm, 1.0)
    return record_scaled_outputs(modules, captured, megatron=True)


def megatron_logits_worker(rank: int, roots: list[str], tp: int, pp: int, tokens: torch.Tensor,
                           dtype_name: str | None, capture: bool = False) -> list | None:
    """For each checkpoint in `roots` (sharing one TP×PP process group): the logits [b, s, vocab] of our Megatron
    model on `tokens`, returned on global rank 0 — or, with capture, a dict of every block's branch outputs
    (see capture_branches) plus `logits`.

    The last pipeline stage's TP rank 0 holds the logits; with PP it sends them to global rank 0, and captured
    branches of every stage are gathered there.
    """
    from megatron.core import parallel_state as ps

    dtype = getattr(torch, dtype_name) if dtype_name else None
    device = init_distributed(rank, tp * pp, tp, pp)
    results = []
    try:
        for root in roots:
            provider, it_dir = provider_from_checkpoint(Path(root), dtype, tp, pp)
            model = load_model(provider, it_dir, device)
            captured: dict[str, torch.Tensor] = {}
            handles = capture_branches(model, captured) if capture else []
            logits = pipeline_forward(model, tokens.to(device), provider.arch.hidden_size, provider.params_dtype)
            for h in handles:
                h.remove()
            if pp > 1:
                last_stage = ps.get_pipeline_model_parallel_last_rank()
                if rank == last_stage and ps.get_tensor_model_parallel_rank() == 0:
                    torch.distributed.send(logits.float().contiguous(), dst=0)
                elif rank == 0:
                    logits = torch.empty((*tokens.shape, provider.layout.padded_vocab(provider.arch)),
                                         dtype=torch.float32, device=device)
                    torch.distributed.recv(logits, src=last_stage)
                if capture:
                    stages = [None] * (tp * pp) if rank == 0 else None
                    torch.distributed.gather_object(captured if ps.get_tensor_model_parallel_rank() == 0 else None,
                                                    stages, dst=0)
                    if rank == 0:
                        captured = {k: v for stage in stages if stage for k, v in stage.items()}
            if rank == 0:
                logits = logits[..., :provider.arch.vocab_size].float().cpu()
                results.append({**captured, "logits": logits} if capture else logits)
            del model
        return results if rank == 0 else None
    finally:
        shutdown_distributed()
