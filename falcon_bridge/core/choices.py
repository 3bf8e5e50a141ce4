"""The closed sets of values options take, one enum each: the CLI lists them in --help and the converters and the
export policy compare against them. StrEnum members equal their strings, so a library caller may pass either."""

from __future__ import annotations

from enum import StrEnum

import torch


class MupMode(StrEnum):
    """How a Megatron checkpoint holds the µP multipliers: applied by the model, or folded into the weights."""

    PRESERVE = "preserve"
    FOLD = "fold"


class MupExport(StrEnum):
    """What export-hf does with a folded checkpoint: restore the original weights and multipliers, or keep them."""

    UNFOLD = "unfold"
    KEEP_FOLDED = "keep-folded"


class ExportFormat(StrEnum):
    """How export-hf writes a BitNet checkpoint's linears."""

    LATENT = "latent"  # the full-precision weights training updates
    PACKED = "packed"  # transformers' bitnet format: uint8 ternary + weight_scale
    DEQUANTIZED = "dequantized"  # ternary × scale in the checkpoint dtype


class DType(StrEnum):
    BF16 = "bf16"
    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return _TORCH_DTYPES[self]

    @classmethod
    def of(cls, dtype: torch.dtype) -> DType:
        return next(d for d, t in _TORCH_DTYPES.items() if t == dtype)


_TORCH_DTYPES = {DType.BF16: torch.bfloat16, DType.FP32: torch.float32, DType.FP16: torch.float16}


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"
