"""BitNet b1.58 ternary quantization and the Hugging Face packed ternary format, as small pure tensor functions.

Quantizers (BitNet b1.58, as in transformers' ``WeightQuant``/``ActQuant`` and TII's onebitllms):

* weights, per **tensor**, absmean: ``s = 1 / max(mean|W|, 1e-5)``, ``T = clamp(round(W·s), -1, 1)``,
  fake-quant ``W_q = T / s`` (= T · mean|W|);
* activations, per **token** (last dim), int8 absmax: ``s_a = 127 / max(absmax, 1e-5)``,
  ``x_q = clamp(round(x·s_a), -128, 127) / s_a``.

All quantizer arithmetic is fp32 and ``torch.round`` rounds half to even (TII's Triton kernels use floor(x + 0.5)
instead, and onebitllms' Python path rounds in bf16; neither is reproduced here).

Packed format (transformers ``integrations/bitnet.py``, ``linear_class="bitlinear"``): uint8 ``[ceil(R/4), *rest]``.
Values are stored as ``u = T + 1`` in {0, 1, 2}; dim 0 is cut into 4 contiguous blocks of ``R4 = ceil(R/4)`` rows and
packed byte ``r`` is ``u[r] | u[R4+r] << 2 | u[2·R4+r] << 4 | u[3·R4+r] << 6``. The layout is planar (packed row r
mixes rows r, r+R4, r+2·R4, r+3·R4), so a packed tensor can't be sliced for tensor parallelism: unpack, slice, repack.

Checkpoint convention (``BitLinear``): ``weight_scale`` stores ``s = 1/mean|W|`` as a 1-element tensor in the model
dtype, and the forward is ``y = linear(x_q_int, T) / (s_a · weight_scale)``, i.e. ``linear(x_q, T / s)``.

Written from the math of the project's BitNet reference notes (bitnet_ternary.md); no code is taken from
transformers or onebitllms.
"""

from __future__ import annotations

import torch

VALUES_PER_BYTE = 4
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


def _as_scale(scale: torch.Tensor | float | None, w: torch.Tensor) -> torch.Tensor:
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
    s = _as_scale(scale, w)
    return (w.detach().float() * s).round().clamp(-1, 1).to(torch.int8)


def weight_fake_quant(w: torch.Tensor, scale: torch.Tensor | float | None = None) -> torch.Tensor:
    """``T / s`` in w's dtype: the dequantized weight a BitNet forward multiplies with (= T · mean|W| by default).

    Not differentiable through the rounding; wrap with ``ste(w, weight_fake_quant(w))`` for training.
    """
    s = _as_scale(scale, w)
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


# ---- packed format --------------------------------------------------------------------------------------------
def _packed_rows(rows: int) -> int:
    return (rows + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def pack_ternary(t: torch.Tensor, *, allow_padding: bool = False) -> torch.Tensor:
    """Pack ternary values {-1, 0, 1} along dim 0 into transformers' BitNet uint8 layout ``[ceil(R/4), *rest]``.

    Byte r = u[r] | u[R4+r]<<2 | u[2·R4+r]<<4 | u[3·R4+r]<<6 with u = T + 1, R4 = ceil(R/4). The input is not
    modified (transformers' ``pack_weights`` adds 1 to its argument in place).

    HF ``BitLinear`` allocates ``out_features // 4`` packed rows, so by default R must be a multiple of 4 and a
    ValueError says otherwise. ``allow_padding=True`` packs any R like transformers does: the missing trailing rows
    are zero bits, which unpack as -1 (``unpack_ternary(..., rows=R)`` trims them).
    """
    if t.dim() == 0:
        raise ValueError("cannot pack a 0-d tensor: packing runs along dim 0")
    rows = t.shape[0]
    if rows % VALUES_PER_BYTE and not allow_padding:
        raise ValueError(
            f"cannot pack a tensor with {rows} rows (dim 0, shape {tuple(t.shape)}): the HF BitNet packed format "
            f"needs the row count (out_features) to be a multiple of {VALUES_PER_BYTE}"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        ok = (t == -1) | (t == 0) | (t == 1)
    else:
        ok = (t >= -1) & (t <= 1)
    if not bool(ok.all()):
        raise ValueError(f"pack_ternary expects values in {{-1, 0, 1}}, got a tensor of shape {tuple(t.shape)} "
                         "with other values")
    r4 = _packed_rows(rows)
    u = torch.zeros((VALUES_PER_BYTE * r4, *t.shape[1:]), dtype=torch.uint8, device=t.device)
    u[:rows] = (t.to(torch.int16) + 1).to(torch.uint8)  # out of place: t itself is never written
    blocks = u.reshape(VALUES_PER_BYTE, r4, *t.shape[1:])
    packed = blocks[0].clone()
    for i in range(1, VALUES_PER_BYTE):
        packed |= blocks[i] << (2 * i)
    return packed


def unpack_ternary(p: torch.Tensor, rows: int | None = None, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of ``pack_ternary``: uint8 ``[R4, *rest]`` → values {-1, 0, 1} of shape ``[rows, *rest]`` in dtype.

    Row i·R4 + r is ``((p[r] >> 2i) & 3) - 1``. Without ``rows`` all 4·R4 rows are returned (as transformers'
    ``unpack_weights`` does); ``rows`` (the true out_features) drops trailing padding rows and must satisfy
    ceil(rows/4) == R4.
    """
    if p.dtype != torch.uint8:
        raise ValueError(f"packed ternary tensor must be uint8, got {p.dtype}")
    if p.dim() == 0:
        raise ValueError("cannot unpack a 0-d tensor: packing runs along dim 0")
    if dtype in (torch.uint8, torch.bool) or dtype.is_complex:
        raise ValueError(f"cannot represent -1 in dtype {dtype}")
    r4 = p.shape[0]
    if rows is None:
        rows = VALUES_PER_BYTE * r4
    elif _packed_rows(rows) != r4:
        raise ValueError(f"{rows} rows don't fit a packed tensor of {r4} rows (expected ceil(rows/4) == {r4})")
    shifts = torch.arange(0, 2 * VALUES_PER_BYTE, 2, dtype=torch.uint8, device=p.device)
    shifts = shifts.reshape(VALUES_PER_BYTE, *([1] * p.dim()))
    u = (p.unsqueeze(0) >> shifts) & 3  # [4, R4, *rest]: block i holds rows i·R4 .. i·R4 + R4 - 1
    return (u.reshape(VALUES_PER_BYTE * r4, *p.shape[1:])[:rows].to(torch.int8) - 1).to(dtype)


# ---- HF "bitlinear" checkpoint tensors ---------------------------------------------------------------------------
def pack_checkpoint_tensor(w: torch.Tensor, scale: torch.Tensor | float | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent weight → (``X.weight`` uint8 ``[out/4, *rest]``, ``X.weight_scale``) for ``linear_class="bitlinear"``.

    ``weight_scale`` is s = 1/mean|W| (onebitllms' s_w; what HF ``BitLinear`` divides by), stored as a 1-element
    ``[1]`` tensor in w's dtype, like the ``weight_scale`` buffer of ``BitLinear``. ``scale`` overrides s (e.g. the
    scale of the full tensor when w is a slice). Raises ValueError when w's row count is not a multiple of 4.
    """
    if w.dim() == 0 or w.shape[0] % VALUES_PER_BYTE:
        raise ValueError(
            f"cannot pack weight of shape {tuple(w.shape)} for HF BitLinear: out_features (dim 0) = "
            f"{w.shape[0] if w.dim() else 'none'} is not a multiple of {VALUES_PER_BYTE}"
        )
    s = _as_scale(scale, w)
    return pack_ternary(ternarize(w, s)), s.to(w.dtype).reshape(1)


def unpack_checkpoint_tensor(packed: torch.Tensor, weight_scale: torch.Tensor, out_features: int,
                             dtype: torch.dtype) -> torch.Tensor:
    """``X.weight`` uint8 + ``X.weight_scale`` (= 1/mean|W|) → the dequantized weight ``T / weight_scale`` (=
    T · mean|W|) of shape ``[out_features, *rest]`` in dtype, computed in fp32 with one final rounding.

    The latent weight is not recoverable from a packed checkpoint; this is the bf16 "dequantized" variant's tensor.
    """
    s = torch.as_tensor(weight_scale)
    if s.numel() != 1:
        raise ValueError(f"weight_scale must hold one value, got shape {tuple(s.shape)}")
    t = unpack_ternary(packed, rows=out_features, dtype=torch.float32)
    return (t / s.to(device=t.device, dtype=torch.float32).reshape(())).to(dtype)
