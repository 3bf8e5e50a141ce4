"""µP fold: each Falcon-H1 forward multiplier multiplied into the weight next to it, and back.

Every multiplier sits beside a bias-free linear map (and RoPE is linear), so the fold is exact in real arithmetic.
Arithmetic: fp64, one rounding to the storage dtype. Unfolding divides by the same factor: bit-exact when the
factor is a power of two, within one ulp of the storage dtype otherwise.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from falcon_bridge.core.config import FalconH1Arch, Multipliers
from falcon_bridge.errors import BadInput


def _in_proj_rows(a: FalconH1Arch, with_input: bool) -> torch.Tensor:
    """Per-row factor of in_proj (segments z|x|B|C|dt, as ssm_multipliers are ordered): ssm_in (input side, so
    weights only) × the segment's ssm_multiplier."""
    m = a.multipliers
    scale = m.ssm_in if with_input else 1.0
    return torch.cat([torch.full((n, 1), scale * s, dtype=torch.float64)
                      for n, s in zip(a.in_proj_segments().values(), m.ssm)])


# HF tensor (model.layers.{i}. prefix dropped) → its fold factor: a scalar, or a [rows, 1] tensor
FOLD_FACTORS = {
    "model.embed_tokens.weight": lambda a: a.multipliers.embedding,
    "lm_head.weight": lambda a: a.multipliers.lm_head,
    "self_attn.q_proj.weight": lambda a: a.multipliers.attention_in,
    "self_attn.k_proj.weight": lambda a: a.multipliers.attention_in * a.multipliers.key,
    "self_attn.k_proj.bias": lambda a: a.multipliers.key,
    "self_attn.v_proj.weight": lambda a: a.multipliers.attention_in,
    "self_attn.o_proj.weight": lambda a: a.multipliers.attention_out,
    "self_attn.o_proj.bias": lambda a: a.multipliers.attention_out,
    "mamba.in_proj.weight": lambda a: _in_proj_rows(a, with_input=True),
    "mamba.in_proj.bias": lambda a: _in_proj_rows(a, with_input=False)[:, 0],
    "mamba.out_proj.weight": lambda a: a.multipliers.ssm_out,
    "mamba.out_proj.bias": lambda a: a.multipliers.ssm_out,
    "feed_forward.gate_proj.weight": lambda a: a.multipliers.mlp[0],
    "feed_forward.gate_proj.bias": lambda a: a.multipliers.mlp[0],
    "feed_forward.down_proj.weight": lambda a: a.multipliers.mlp[1],
    "feed_forward.down_proj.bias": lambda a: a.multipliers.mlp[1],
}


def fold_factor(arch: FalconH1Arch, hf_name: str):
    """The factor folded into this HF tensor, or None when none is (norms, conv1d, A_log, D, dt_bias, up_proj)."""
    key = hf_name.split(".", 3)[3] if hf_name.startswith("model.layers.") else hf_name
    fn = FOLD_FACTORS.get(key)
    return None if fn is None else fn(arch)


def _apply(t: torch.Tensor, factor, out_dtype: torch.dtype, divide: bool) -> torch.Tensor:
    """t·factor (or t/factor) computed in fp64 and rounded once to out_dtype: the fp64 product of an fp32 value is
    exact enough that unfolding lands within one ulp of the original (fp32 arithmetic could miss by two)."""
    f = factor.double() if isinstance(factor, torch.Tensor) else torch.tensor(factor, dtype=torch.float64)
    if isinstance(factor, torch.Tensor) and t.dim() > factor.dim():
        f = f.reshape(-1, *([1] * (t.dim() - 1)))
    x = t.double()
    return (x / f if divide else x * f).to(out_dtype)


def fold(arch: FalconH1Arch, hf_name: str, t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    factor = fold_factor(arch, hf_name)
    return t.to(out_dtype) if factor is None else _apply(t, factor, out_dtype, divide=False)


def unfold(arch: FalconH1Arch, hf_name: str, t: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
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


def run_config_entry(arch: FalconH1Arch, mode: str) -> dict:
    """The run config's `mup` record: the mode, what the model applies, and (fold) what the weights carry."""
    if mode == "preserve":
        return {"mode": "preserve", "applied_multipliers": arch.multipliers.to_hf()}
    return {"mode": "fold", "applied_multipliers": folded_arch(arch).multipliers.to_hf(),
            "folded_multipliers": arch.multipliers.to_hf()}
