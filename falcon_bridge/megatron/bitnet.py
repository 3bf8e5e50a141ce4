"""BitNet b1.58 tensor-parallel linears whose quantization does not depend on TP or on Megatron's fusions.

Forward: per-token int8 activations and ternary weights (fake-quantized, straight-through estimator: gradients
reach the full-precision latent weights as if quantization were the identity). The weight scale of each HF tensor
is its absmean over the *whole* HF tensor — although Megatron fuses q/k/v (and gate/up) into one weight and shards
every weight across TP ranks — so each rank sums |W| per HF tensor ("segment") over its rows, the sums are
all-reduced over the TP group, and rows replicated for TP (Mamba B/C groups) count once. Row-parallel inputs are
sharded along the hidden dimension, so their per-token absmax is all-reduced (max) too. Result: the same quantized
model at every TP, equal to HF's BitLinear inference.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from falcon_bridge.core import ternary
from falcon_bridge.core.mapping import Ctx, bitnet_row_sources, table_of
from falcon_bridge.megatron.language_model import NormColumnParallelLinear


@functools.cache
def onebitllms_activation_kernel():
    """TII's onebitllms Triton kernel for per-token int8 activation quantization, when it can run (CUDA and
    onebitllms importable), else None. Used for bf16/fp16 column-parallel inputs (their absmax is local), where it
    matches the torch reference except on exact .5 ties (it rounds floor(x + 0.5), transformers half to even:
    0.1 % of codes on an H200, docs/VALIDATION.md). Not for fp32: there 32 % of its codes differed from the
    reference at hidden size 3072 (measured), so fp32 keeps the reference. onebitllms' weight kernel is not used:
    it takes one scale over the tensor it is given, and a fused or TP-sharded Megatron weight needs one scale per
    HF tensor over the whole tensor."""
    if not torch.cuda.is_available():
        return None
    try:
        from onebitllms.kernels import activation_quant_triton
    except Exception:  # noqa: BLE001 - onebitllms imports transformers utilities at import time; any failure = no kernel
        return None
    return activation_quant_triton


def _all_reduce(t: torch.Tensor, group, op=torch.distributed.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and group.size() > 1:
        torch.distributed.all_reduce(t, op=op, group=group)
    return t


class _TernaryWeight:
    """Per-row view of which HF tensor each local row belongs to: `segment` (long [rows]), `copies` (long [rows]:
    how many copies of the row the rank holds), `numel` (long [segments], elements of each whole HF tensor). Integer
    buffers, so a bf16/fp16 cast of the model (Megatron-LM's Float16Module) leaves these counts exact."""

    def set_segments(self, segment: torch.Tensor, copies: torch.Tensor, numel: torch.Tensor) -> None:
        device = self.weight.device
        self.register_buffer("bitnet_segment", segment.to(device), persistent=False)
        self.register_buffer("bitnet_row_copies", copies.to(device, torch.long), persistent=False)
        self.register_buffer("bitnet_numel", numel.to(device, torch.long), persistent=False)

    def quantized_weight(self, weight: torch.Tensor) -> torch.Tensor:
        assert hasattr(self, "bitnet_segment"), \
            "BitNet linear without row segments: build the model with its provider's provide()"
        with torch.no_grad():
            # fp64 sums: the partial sums of each rank add up to the same scale, whatever the TP (fp32 sums in
            # another order can move the scale by an ulp and flip the rounding of weights sitting on a .5 boundary)
            abs_rows = weight.double().abs().reshape(weight.shape[0], -1).sum(1) / self.bitnet_row_copies
            sums = torch.zeros(self.bitnet_numel.shape, dtype=torch.float64, device=weight.device)
            sums.index_add_(0, self.bitnet_segment, abs_rows)
            mean = _all_reduce(sums, self.tp_group) / self.bitnet_numel
            scale = (1.0 / mean.clamp_min(ternary.EPS))[self.bitnet_segment].unsqueeze(1).float()
        return ternary.ste(weight, ternary.weight_fake_quant(weight, scale))


class BitNetColumnParallelLinear(_TernaryWeight, ColumnParallelLinear):
    """Column-parallel: the input is the full hidden vector on every rank, so its absmax is local."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        kernel = onebitllms_activation_kernel()
        with torch.no_grad():
            use_kernel = kernel and input.is_cuda and input.dim() == 3 and input.dtype in (torch.bfloat16,
                                                                                             torch.float16)
            q = kernel(input.contiguous()) if use_kernel else ternary.activation_fake_quant(input)
        x = ternary.ste(input, q)
        return super()._forward_impl(x, self.quantized_weight(weight), *args, **kwargs)


class BitNetNormColumnParallelLinear(NormColumnParallelLinear, BitNetColumnParallelLinear):
    """The MLP's fc1 (pre-norm fused) as a BitNet layer: norm, then quantize, then the linear."""


class BitNetRowParallelLinear(_TernaryWeight, RowParallelLinear):
    """Row-parallel: each rank holds a slice of the input's hidden dimension; the absmax is reduced across TP."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        with torch.no_grad():
            absmax = _all_reduce(input.float().abs().amax(-1, keepdim=True), self.tp_group,
                                 torch.distributed.ReduceOp.MAX)
        x = ternary.ste(input, ternary.activation_fake_quant(input, absmax))
        return super()._forward_impl(x, self.quantized_weight(weight), *args, **kwargs)


# ---- which HF tensor each local row belongs to ------------------------------------------------------------------
def assign_segments(model, ctx: Ctx, tp_rank: int) -> None:
    """Tell each BitNet linear of the model's layers which HF tensor each of its local rows comes from, as the map's
    BitNet rules say (q/k/v fused in linear_qkv, gate/up in fc1, replicated B/C rows in in_proj); `ctx` holds the
    architecture and the layout the model was built for."""
    for rule in table_of(ctx.arch).layer_rules:
        if rule.bitnet is None or not rule.when(ctx.arch):
            continue
        sources = bitnet_row_sources(rule, ctx, tp_rank)
        for layer in model.decoder.layers:
            layer.get_submodule(rule.megatron.removesuffix(".weight")).set_segments(*sources)
