"""µP fold: each Falcon-H1 forward multiplier multiplied into the weight next to it, and back. Which factor goes
into which tensor is the `fold` column of the map (core/mapping.py).

Every multiplier scales the input or the output of a linear map (and RoPE is linear); where that map has a bias
(the Mamba in_proj/out_proj biases), the table folds the output-side factors into the bias too, so the fold is
exact in real arithmetic.
Arithmetic: fp64, one rounding to the storage dtype. Unfolding divides by the same factor: bit-exact when the
factor is a power of two, within one ulp of the storage dtype otherwise.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from falcon_bridge.core.choices import MupMode
from falcon_bridge.core.config import Arch, FalconH1Arch, Multipliers
from falcon_bridge.core.mapping import fold_factor
from falcon_bridge.errors import BadInput


def _apply(t: torch.Tensor, factor, out_dtype: torch.dtype, divide: bool) -> torch.Tensor:
    """t·factor (or t/factor) computed in fp64 and rounded once to out_dtype: the fp64 product of an fp32 value is
    exact enough that unfolding lands within one ulp of the original (fp32 arithmetic could miss by two)."""
    f = factor.double() if isinstance(factor, torch.Tensor) else torch.tensor(factor, dtype=torch.float64)
    if isinstance(factor, torch.Tensor) and t.dim() > factor.dim():
        f = f.reshape(-1, *([1] * (t.dim() - 1)))
    x = t.double()
    return (x / f if divide else x * f).to(out_dtype)


def fold(arch: Arch, hf_name: str, t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    factor = fold_factor(arch, hf_name)
    return t.to(out_dtype) if factor is None else _apply(t, factor, out_dtype, divide=False)


def unfold(arch: Arch, hf_name: str, t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    factor = fold_factor(arch, hf_name)
    return t.to(out_dtype) if factor is None else _apply(t, factor, out_dtype, divide=True)


def folded_arch(arch: FalconH1Arch) -> FalconH1Arch:
    """The architecture whose model runs the folded weights: every multiplier 1.0 — except with tied embeddings,
    where the one shared matrix carries the embedding multiplier and lm_head keeps the ratio lm_head/embedding."""
    if arch.tie_word_embeddings:
        m = arch.multipliers
        ratio = m.lm_head / m.embedding
        ratio_f32, embedding_f32 = (torch.tensor(v, dtype=torch.float32) for v in (ratio, m.embedding))
        if ratio_f32 * embedding_f32 != torch.tensor(m.lm_head, dtype=torch.float32):  # the model runs in ≤ fp32
            raise BadInput(f"--mup fold: tied embeddings share one matrix, so embedding_multiplier "
                           f"({m.embedding}) and lm_head_multiplier ({m.lm_head}) cannot both be folded, and their "
                           "ratio is not exact in floating point; use --mup preserve")
        return replace(arch, multipliers=replace(Multipliers(), lm_head=ratio))
    return replace(arch, multipliers=Multipliers())


def run_config_entry(arch: Arch, mode: MupMode) -> dict:
    """The run config's `mup` record: the mode, what the model applies, and (fold) what the weights carry. A family
    without µP records no multipliers and has nothing to fold."""
    if not arch.has_mup:
        if mode != MupMode.PRESERVE:
            raise BadInput(f"--mup {mode}: the {arch.family} family has no µP multipliers to fold; leave --mup out")
        return {"mode": MupMode.PRESERVE.value, "applied_multipliers": {}}
    if mode == MupMode.PRESERVE:
        return {"mode": MupMode.PRESERVE.value, "applied_multipliers": arch.multipliers.to_hf()}
    assert mode == MupMode.FOLD, mode
    return {"mode": MupMode.FOLD.value, "applied_multipliers": folded_arch(arch).multipliers.to_hf(),
            "folded_multipliers": arch.multipliers.to_hf()}
