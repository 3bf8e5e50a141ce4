"""How create-random initialises each kind of tensor (the map's rules name one per HF tensor).

Values are kept away from the trivial initial ones (norms ≠ 1, A_log ≠ log(1..n), D ≠ 1, dt_bias ≠ 1) so that a
misplaced or dropped tensor changes the logits. Each takes (shape, generator, arch) and returns fp32.
"""

from __future__ import annotations

import math

import torch

from falcon_bridge.core.config import Arch

Shape = tuple[int, ...]


def linear(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])  # unit-variance outputs


def embedding(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    return torch.randn(shape, generator=g)


def bias(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    return 0.02 * torch.randn(shape, generator=g)


def norm(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    return 1.0 + 0.2 * torch.randn(shape, generator=g)


def a_log(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    return torch.empty(shape).uniform_(1.0, 16.0, generator=g).log()


def dt_bias(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    """softplus⁻¹ of a time step drawn log-uniformly in [1e-3, 0.1], as Mamba-2 initializes it."""
    dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(0.1), generator=g).exp()
    return dt + torch.log(-torch.expm1(-dt))


def skip(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    """The Mamba D skip connection."""
    return torch.empty(shape).uniform_(0.5, 1.5, generator=g)


def conv(shape: Shape, g: torch.Generator, arch: Arch) -> torch.Tensor:
    """conv1d weight and bias: PyTorch's default bound for a depthwise kernel of mamba_d_conv taps."""
    bound = 1.0 / math.sqrt(arch.mamba_d_conv)
    return torch.empty(shape).uniform_(-bound, bound, generator=g)
