"""The Hugging Face packed ternary checkpoint formats of BitNet linears, one object per format, looked up by the
`linear_class` of config.json's `quantization_config`: how a latent weight is packed, the packed shape, the
`quantization_config` export writes, and how import reads a packed tensor back.

Packed format (transformers ``integrations/bitnet.py``, ``linear_class="bitlinear"``): uint8 ``[ceil(R/4), *rest]``.
Values are stored as ``u = T + 1`` in {0, 1, 2}; dim 0 is cut into 4 contiguous blocks of ``R4 = ceil(R/4)`` rows and
packed byte ``r`` is ``u[r] | u[R4+r] << 2 | u[2·R4+r] << 4 | u[3·R4+r] << 6``. The layout is planar (packed row r
mixes rows r, r+R4, r+2·R4, r+3·R4), so a packed tensor can't be sliced for tensor parallelism: unpack, slice, repack.

Checkpoint convention (``BitLinear``): ``weight_scale`` stores ``s = 1/mean|W|`` as a 1-element tensor in the model
dtype, and the forward is ``y = linear(x_q_int, T) / (s_a · weight_scale)``, i.e. ``linear(x_q, T / s)``.
``AutoBitLinear`` (``linear_class="autobitlinear"``, offline mode) stores the same packed bytes (or the ternary values
as floats) and multiplies by ``weight_scale``, so there it holds ``mean|W|``.

Written from the math of the project's BitNet reference notes (bitnet_ternary.md); no code is taken from
transformers or onebitllms.
"""

from __future__ import annotations

import math

import torch

from falcon_bridge.core.ternary import EPS, as_scale, ternarize
from falcon_bridge.errors import BadInput, shown

VALUES_PER_BYTE = 4
Shape = tuple[int, ...]


# ---- transformers' "bitlinear" bit layout ------------------------------------------------------------------
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
    s = as_scale(scale, w)
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


# ---- the formats ------------------------------------------------------------------------------------------------
def file_absmean(w: torch.Tensor) -> torch.Tensor:
    """``max(mean|W|, 1e-5)`` as the packed formats compute it for the `weight_scale` they write: summed in fp64
    and rounded once, so it depends on the values alone (a strided view, such as k split out of linear_qkv, sums
    in another order than a contiguous copy) and the magnitudes `read_back` chooses sum exactly. (The model's
    quantizers keep transformers' fp32 sum, core/ternary.py; the two differ by at most an ulp.)"""
    return w.detach().double().abs().mean().float().clamp(min=EPS)


NEIGHBOURS_TRIED = 4  # absmeans tried on each side of 1/weight_scale, in fp32 ulps


class BitLinearFormat:
    """transformers' `linear_class="bitlinear"`: each BitNet linear `X.weight` is stored as uint8 `X.weight`
    [out/4, in] plus `X.weight_scale` [1] in the model dtype, which BitLinear divides by (1/mean|W|). A second
    format is a subclass (its linear_class, its scale convention) whose instance joins PACKED_FORMATS."""

    linear_class = "bitlinear"

    @property
    def quantization_config(self) -> dict:
        """What config.json says of a checkpoint in this format (transformers reads it to build BitLinear layers)."""
        return {"quant_method": "bitnet", "linear_class": self.linear_class, "quantization_mode": "offline",
                "modules_to_not_convert": ["lm_head"]}

    @staticmethod
    def scale_name(weight_name: str) -> str:
        """The companion of `X.weight`: `X.weight_scale`."""
        return weight_name.removesuffix("weight") + "weight_scale"

    @staticmethod
    def stored_scale(w: torch.Tensor) -> torch.Tensor:
        """The `weight_scale` value of a weight, fp32 0-d: s = 1/mean|W| (what BitLinear divides by)."""
        return file_absmean(w).reciprocal()

    def shape_problem(self, name: str, shape: Shape) -> str | None:
        """Why a linear of this shape cannot be stored in the format (it stores out_features/4 packed rows), or
        None."""
        if shape[0] % VALUES_PER_BYTE:
            return f"{name} has {shape[0]} rows; the HF packed format needs a multiple of {VALUES_PER_BYTE}"
        return None

    def stored(self, name: str, shape: Shape, dtype: torch.dtype) -> list[tuple[str, Shape, torch.dtype]]:
        """(name, shape, dtype) of what is written for one BitNet linear of this shape."""
        return [(name, (shape[0] // VALUES_PER_BYTE, *shape[1:]), torch.uint8), (self.scale_name(name), (1,), dtype)]

    def pack(self, name: str, latent: torch.Tensor, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
        """What is written for one latent weight, in the order of `stored`: ternarized with its own absmean."""
        w = latent.float()
        packed, _ = pack_checkpoint_tensor(w, file_absmean(w).reciprocal())
        return [(name, packed), (self.scale_name(name), self.stored_scale(w).to(dtype).reshape(1))]

    @staticmethod
    def unpacked_shape(stored_shape: Shape, stored_dtype: torch.dtype) -> Shape:
        """The weight's shape: packed uint8 rows hold four rows each; a float weight holds its ternary values
        unpacked (autobitlinear's offline checkpoints may)."""
        if stored_dtype != torch.uint8:
            return stored_shape
        return (stored_shape[0] * VALUES_PER_BYTE, *stored_shape[1:])

    def read_back(self, stored: torch.Tensor, weight_scale: torch.Tensor, rows: int, dtype: torch.dtype
                  ) -> torch.Tensor:
        """A stored linear as the weight import hands on, in dtype: its ternary values times magnitudes chosen so
        that `pack` writes the same ternary values and the same weight_scale bits again — a packed model survives
        import → export byte for byte. Ternary × mean|W| itself would not: its absmean is smaller than the latent
        weights' (zeros count). So the k non-zero magnitudes must sum to S = N × m, m being the absmean whose scale
        is the stored one (N elements): the two neighbouring values of dtype around S/k, the upper one on the first
        `a` non-zeros, with `a` chosen so the sum is S to within half a step. Each |value| × the re-computed scale
        is then ≈ N/k ≥ 1, so every non-zero rounds back to ±1."""
        s = torch.as_tensor(weight_scale)
        if s.numel() != 1:
            raise ValueError(f"weight_scale must hold one value, got shape {tuple(s.shape)}")
        s = s.reshape(())
        if stored.dtype == torch.uint8:
            t = unpack_ternary(stored, rows=rows, dtype=torch.float32)
        else:
            t = stored.float()
            if not bool(((t == -1) | (t == 0) | (t == 1)).all()):
                raise ValueError("a float weight stored beside a weight_scale must hold ternary values (-1, 0, 1)")
        nonzero = t.flatten().nonzero()
        k = nonzero.numel()
        if k == 0:
            return t.to(dtype)
        total = self.absmean_for(s).double() * t.numel()  # exact in fp64: 24-bit m × N < 2^53
        near = (total / k).to(dtype)
        if near.double() * k > total:
            low, high = torch.nextafter(near, torch.tensor(0.0, dtype=dtype)), near
        else:
            low, high = near, torch.nextafter(near, torch.tensor(math.inf, dtype=dtype))
        a = int(((total - k * low.double()) / (high.double() - low.double())).round().clamp(0, k))
        magnitudes = torch.full((k,), low.item(), dtype=torch.float32)
        magnitudes[:a] = high.item()
        w = t.flatten()
        w[nonzero.flatten()] *= magnitudes
        return w.reshape(t.shape).to(dtype)

    def absmean_for(self, weight_scale: torch.Tensor) -> torch.Tensor:
        """The fp32 absmean m whose `stored_scale` is this weight_scale (in its dtype): 1/weight_scale, or the
        neighbour of it that reciprocal rounding maps back exactly."""
        m = weight_scale.float().reciprocal()
        up, down = torch.tensor(math.inf), torch.tensor(0.0)
        candidates, above, below = [m], m, m
        for _ in range(NEIGHBOURS_TRIED):
            above, below = torch.nextafter(above, up), torch.nextafter(below, down)
            candidates += [above, below]
        return next((c for c in candidates if c.reciprocal().to(weight_scale.dtype) == weight_scale), m)


class AutoBitLinearFormat(BitLinearFormat):
    """transformers' `linear_class="autobitlinear"`, offline mode: the same packed uint8 weight (or its ternary
    values as floats), but AutoBitLinear multiplies its output by `weight_scale`, so it stores mean|W|. (Online
    mode stores latent weights and no scale: nothing packed, read as an ordinary checkpoint of a BitNet model.)"""

    linear_class = "autobitlinear"

    @staticmethod
    def stored_scale(w: torch.Tensor) -> torch.Tensor:
        return file_absmean(w)

    def absmean_for(self, weight_scale: torch.Tensor) -> torch.Tensor:
        return weight_scale.float()


PACKED_FORMATS = {f.linear_class: f for f in (BitLinearFormat(), AutoBitLinearFormat())}
DEFAULT_PACKED_FORMAT = PACKED_FORMATS[BitLinearFormat.linear_class]  # what export-hf --format packed writes
QUANTIZATION_MODES = ("offline", "online")


def packed_format(quantization_config: dict, source: str) -> BitLinearFormat | None:
    """The format a config.json's `quantization_config` names (absent linear_class: transformers' default,
    bitlinear); None for autobitlinear's online mode, whose checkpoints hold latent weights."""
    linear_class = quantization_config.get("linear_class", BitLinearFormat.linear_class)
    fmt = PACKED_FORMATS.get(linear_class) if isinstance(linear_class, str) else None
    if fmt is None:
        raise BadInput(f"{source}: field quantization_config.linear_class: {shown(linear_class)} is not supported "
                       f"(only {', '.join(repr(k) for k in PACKED_FORMATS)})")
    mode = quantization_config.get("quantization_mode", "offline")
    if mode not in QUANTIZATION_MODES:
        raise BadInput(f"{source}: field quantization_config.quantization_mode: {shown(mode)} is not one of "
                       f"{', '.join(QUANTIZATION_MODES)}")
    # transformers ≥ 5 can put an RMSNorm inside every BitNet linear; our fused linear_qkv/fc1 have no place for one
    if quantization_config.get("use_rms_norm", False) is not False:
        raise BadInput(f"{source}: field quantization_config.use_rms_norm = "
                       f"{shown(quantization_config['use_rms_norm'])} is not supported (a norm inside each BitNet "
                       "linear); only false is")
    online = fmt.linear_class == AutoBitLinearFormat.linear_class and mode == "online"
    return None if online else fmt
