"""The closed sets of values options take, one enum each, and the defaults the converters' options and the CLI
share. The CLI lists the enums in --help and the converters and the export policy compare against them; StrEnum
members equal their strings, so a library caller may pass either. Torch-free at import, so the CLI starts fast."""

from __future__ import annotations

from enum import StrEnum


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
    PACKED = "packed"  # transformers' bitnet format: uint8 ternary + weight_scale (BitLinear: 1/mean|W|)
    DEQUANTIZED = "dequantized"  # ternary × scale in the checkpoint dtype
    PACKED_AUTOBITLINEAR = "packed-autobitlinear"  # the same bytes for AutoBitLinear, offline: weight_scale = mean|W|


class DType(StrEnum):
    BF16 = "bf16"
    FP32 = "fp32"
    FP16 = "fp16"

    @property
    def torch(self):
        import torch

        return getattr(torch, {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}[self.value])


class Device(StrEnum):
    CPU = "cpu"
    CUDA = "cuda"


def one_of(enum: type[StrEnum]) -> str:
    """'a or b' / 'a, b or c': an enum's values for an error message."""
    values = [e.value for e in enum]
    return ", ".join(values[:-1]) + " or " + values[-1]


# ---- defaults the converters' options and the CLI share ---------------------------------------------------------
CREATE_RANDOM_DTYPE = DType.BF16
CREATE_RANDOM_MAX_SHARD_BYTES = 2 * 1024**3
EXPORT_MAX_SHARD_BYTES = 5 * 10**9
IMPORT_CHECK_FINITE = False  # import reads a checkpoint someone published; export reads one we trained
EXPORT_CHECK_FINITE = True
VERIFY_DTYPE = DType.FP32
VERIFY_SEQ_LEN = 32
