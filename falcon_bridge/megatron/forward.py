"""Forward passes of our Megatron model across TP×PP ranks, and what verify records of them: the pipeline forward
(hidden states sent between stages), hooks capturing each block's branch outputs, and the worker that returns
a checkpoint's logits on global rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.llama import LlamaArch
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


def _stage_parts(model, embedding_multiplier: float, layer_branches, final_norm) -> dict:
    """name → (module, multiplier) of what this stage adds to the residual stream: the embedding, each layer's
    branches (`layer_branches(layer)`: branch name → (module, multiplier), in forward order), the final norm
    (`final_norm(decoder)`)."""
    parts = {"embedding": (model.embedding, embedding_multiplier)} if model.pre_process else {}
    for layer in model.decoder.layers:
        parts |= {f"{layer.layer_number - 1}.{name}": part for name, part in layer_branches(layer).items()}
    if model.post_process:
        parts["final_norm"] = (final_norm(model.decoder), 1.0)
    return parts


def _falcon_h1_parts(model) -> dict:
    c = model.config
    return _stage_parts(model, c.embedding_multiplier, lambda layer: {
        "mamba": (layer.mamba_mixer, c.ssm_out_multiplier),
        "attention": (layer.self_attention, c.attention_out_multiplier),
        "mlp": (layer.mlp, c.mlp_multipliers[1])}, lambda decoder: decoder.final_norm)


def _llama_parts(model) -> dict:
    return _stage_parts(model, 1.0, lambda layer: {"attention": (layer.self_attention, 1.0), "mlp": (layer.mlp, 1.0)},
                        lambda decoder: decoder.final_layernorm)


# Per family: what its model's stage adds to the residual stream; verify's HF side (converters/verify.py) records
# the same names for transformers' model of the family.
STAGE_PARTS = {FalconH1Arch.family: _falcon_h1_parts, LlamaArch.family: _llama_parts}


def capture_branches(model, captured: dict[str, torch.Tensor]) -> list:
    """Forward hooks recording what each block adds to the residual stream, as HF's module outputs × multipliers:
    `embedding`, `{layer}.{branch}` for the family's branches (Falcon-H1: mamba, attention, mlp; Llama: attention,
    mlp), `final_norm` ([b, s, h], fp32, CPU). With µP folded the model's multipliers are 1.0 and the folded
    weights carry them, so both compare alike."""
    return record_scaled_outputs(STAGE_PARTS[model.provider.arch.family](model), captured, megatron=True)


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
