"""BitNet b1.58 ternary quantization (weights and activations) and the straight-through estimator, as small pure tensor
functions. The HF packed checkpoint formats are in `packed_ternary.py`.

Quantizers (BitNet b1.58, as in transformers' ``WeightQuant``/``ActQuant`` and TII's onebitllms):

* weights, per **tensor**, absmean: ``s = 1 / max(mean|W|, 1e-5)``, ``T = clamp(round(W·s), -1, 1)``,
  fake-quant ``W_q = T / s`` (= T · mean|W|);
* activations, per **token** (last dim), int8 absmax: ``s_a = 127 / max(absmax, 1e-5)``,
  ``x_q = clamp(round(x·s_a), -128, 127) / s_a``.

All quantizer arithmetic is fp32 and ``torch.round`` rounds half to even (TII's Triton kernels use floor(x + 0.5)
instead, and onebitllms' Python path rounds in bf16; neither is reproduced here).

Written from the math of the project's BitNet reference notes (bitnet_ternary.md); no code is taken from
transformers or onebitllms.
"""

from __future__ import annotations

import torch

EPS = 1e-5  # clamp on mean|W| and on the activation absmax, as in BitNet b1.58 / transformers / onebitllms
_ACT_QMIN, _ACT_QMAX = -128, 127


# ---- quantizers -----------------------------------------------------------------------------------------------
def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """absmean scale ``1 / max(mean|W|, 1e-5)`` over the whole tensor, as a 0-d fp32 tensor.

    One scale per tensor: the HF format stores exactly one ``weight_scale`` per Linear, so a fused or TP-sharded
    tensor must be given its scale from the full HF tensor (pass ``scale=`` to the functions below), not recompute it.
    The mean is accumulated in fp32 so a bf16 weight doesn't lose precision in the sum.
    """
    return w.detach().float().abs().mean().clamp(min=EPS).reciprocal()


def as_scale(scale: torch.Tensor | float | None, w: torch.Tensor) -> torch.Tensor:
    """A given scale as fp32 on w's device: a Python number or a 1-element tensor (such as a checkpoint's [1]
    weight_scale) as 0-d; or one scale per row ([rows, 1, ...], for fused tensors whose rows come from several HF
    tensors, each with its own scale); or weight_scale(w) when none is given."""
    if scale is None:
        return weight_scale(w)
    s = torch.as_tensor(scale, device=w.device).detach()
    if s.numel() == 1:
        return s.float().reshape(())
    if s.dim() != w.dim() or s.shape[0] != w.shape[0] or any(n != 1 for n in s.shape[1:]):
        raise ValueError(f"weight scale must hold one value, or one per row of a {tuple(w.shape)} weight; "
                         f"got shape {tuple(s.shape)}")
    return s.float()


def ternarize(w: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """``T = clamp(round(W·s), -1, 1)`` as int8, values in {-1, 0, 1}.

    ``scale`` is s (= 1/mean|W|, the HF "bitlinear" ``weight_scale``); default ``weight_scale(w)``. Passing it lets a
    shard or a sub-tensor of a fused weight be ternarized with the scale of the full HF tensor it belongs to.
    Computed in fp32; ``torch.round`` is round-half-to-even.
    """
    s = as_scale(scale, w)
    return (w.detach().float() * s).round().clamp(-1, 1).to(torch.int8)


def weight_fake_quant(w: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """``T / s`` in w's dtype: the dequantized weight a BitNet forward multiplies with (= T · mean|W| by default).

    Not differentiable through the rounding; wrap with ``ste(w, weight_fake_quant(w))`` for training.
    """
    s = as_scale(scale, w)
    return (ternarize(w, s).float() / s).to(w.dtype)


def activation_fake_quant(x: torch.Tensor, absmax: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token int8 absmax fake quantization: ``clamp(round(x·s_a), -128, 127) / s_a``, ``s_a = 127/max(absmax,
    1e-5)``, in x's dtype, computed in fp32.

    ``absmax`` defaults to ``|x|.amax(-1, keepdim=True)``. When x is sharded along the hidden dim (the input of a
    row-parallel linear), the caller passes the absmax all-reduced (max) across the tensor-parallel ranks, otherwise
    each rank would quantize with its own local scale and the result would depend on the TP degree.
    """
    xf = x.float()
    if absmax is None:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    s_a = _ACT_QMAX / absmax.detach().float().clamp(min=EPS)
    return ((xf * s_a).round().clamp(_ACT_QMIN, _ACT_QMAX) / s_a).to(x.dtype)


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator ``x + (q - x).detach()``: forward value q (up to one rounding), gradient identity.

    Lets the latent full-precision tensor x be trained through a non-differentiable quantizer q = Q(x).
    """
    return x + (q - x).detach()
