"""What an HF export writes for each HF tensor of the map: µP unfolded or kept folded, BitNet linears latent, packed
(transformers' bitnet format: uint8 ternary + weight_scale, for its BitLinear or its AutoBitLinear) or dequantized,
in the target dtype. Shared by the file path (export-hf) and the live path (a running model's weights), so both write
the same bytes. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from falcon_bridge.core import mup, ternary
from falcon_bridge.core.choices import ExportFormat, MupExport, MupMode, one_of
from falcon_bridge.core.config import Arch
from falcon_bridge.core.mapping import is_bitnet_linear
from falcon_bridge.core.packed_ternary import DEFAULT_PACKED_FORMAT, PACKED_FORMATS, BitLinearFormat
from falcon_bridge.errors import BadInput

# the packed formats export-hf writes: transformers' default class, and AutoBitLinear offline
PACKINGS = {ExportFormat.PACKED: DEFAULT_PACKED_FORMAT,
            ExportFormat.PACKED_AUTOBITLINEAR: PACKED_FORMATS["autobitlinear"]}


@dataclass(frozen=True)
class HFExport:
    """arch: the HF architecture (original multipliers); mup_mode: how the weights hold them (preserve | fold);
    mup_export: unfold (restore the original weights and multipliers) or keep-folded; fmt: BitNet output format;
    dtype_of: the HF dtype each tensor is written in."""

    arch: Arch
    mup_mode: MupMode
    bitnet: bool
    dtype_of: Callable[[str], torch.dtype]
    mup_export: MupExport = MupExport.UNFOLD
    fmt: ExportFormat = ExportFormat.LATENT

    def __post_init__(self):
        for flag, value, choices in (("--mup", self.mup_export, MupExport), ("--format", self.fmt, ExportFormat)):
            if value not in tuple(choices):
                raise BadInput(f"{flag} {value}: expected {one_of(choices)}")
        if self.fmt != ExportFormat.LATENT and not self.bitnet:
            raise BadInput(f"--format {self.fmt}: not a BitNet checkpoint (import it with --bitnet)")
        if self.mup_export == MupExport.KEEP_FOLDED and self.mup_mode != MupMode.FOLD:
            raise BadInput(f"--mup {self.mup_export}: the weights hold no folded multipliers (mode "
                           f"{self.mup_mode}), so there is nothing to keep folded; leave --mup out")

    @property
    def unfolding(self) -> bool:
        return self.mup_mode == MupMode.FOLD and self.mup_export == MupExport.UNFOLD

    @property
    def config_arch(self) -> Arch:
        """The architecture config.json describes: the folded one when the weights stay folded."""
        return mup.folded_arch(self.arch) if self.mup_mode == MupMode.FOLD and not self.unfolding else self.arch

    @property
    def packing(self) -> BitLinearFormat | None:
        """The packed format the BitNet linears are written in; None when they are not packed."""
        return PACKINGS.get(self.fmt)

    @property
    def config_extra(self) -> dict | None:
        return {"quantization_config": self.packing.quantization_config} if self.packing else None

    def layout(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) of what is written for one HF tensor."""
        if self.packing and is_bitnet_linear(self.arch, name):
            return self.packing.stored(name, shape, self.dtype_of(name))
        return [(name, shape, self.dtype_of(name))]

    def tensors(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """What is written for one HF tensor, in the order of `layout`."""
        dtype = self.dtype_of(name)
        if self.unfolding:  # never with BitNet: import refuses --mup fold with --bitnet
            return [(name, mup.unfold(self.arch, name, tensor, dtype))]  # one rounding
        if self.packing and is_bitnet_linear(self.arch, name):
            return self.packing.pack(name, tensor, dtype)
        if self.fmt == ExportFormat.DEQUANTIZED and is_bitnet_linear(self.arch, name):
            return [(name, ternary.weight_fake_quant(tensor.float()).to(dtype))]
        return [(name, tensor.to(dtype))]
