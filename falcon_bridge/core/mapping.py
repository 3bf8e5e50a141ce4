"""THE Falcon-H1 map: Megatron checkpoint key ↔ HF tensor name(s) ↔ transform, in one table.

Read it next to transformers' modeling_falcon_h1.py: every HF tensor of FalconH1ForCausalLM appears once below,
with its shape. Megatron names follow Megatron-Bridge's Falcon-H1 model so checkpoints interoperate.

Megatron checkpoint tensors are *global* (dist_checkpointing reshards them for any TP at load time); a transform
turns HF tensors into one or more global Megatron tensors (`suffix → tensor`, e.g. in_proj's `.z .x .B .C .dt`
pieces, which is how megatron-core's MambaMixer stores them) and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from falcon_bridge.core import transforms as T
from falcon_bridge.core.config import CONV_SEGMENTS, SSM_SEGMENTS, FalconH1Arch
from falcon_bridge.core.parallel import MegatronLayout

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Ctx:
    """What a transform needs to know: the HF architecture and the Megatron layout it is stored in."""

    arch: FalconH1Arch
    layout: MegatronLayout

    @property
    def group_factor(self) -> int:
        return self.layout.group_factor(self.arch)


# ---- transforms: (HF tensors → {suffix: Megatron tensor}) and back ---------------------------------------------
class Transform:
    def to_megatron(self, ctx: Ctx, *hf: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_hf(self, ctx: Ctx, mg: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def to_hf_reporting(self, ctx: Ctx, mg: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], float]:
        """to_hf, plus how far copies that should be identical (replicated Mamba groups) had drifted apart."""
        return self.to_hf(ctx, mg), 0.0

    def megatron_shapes(self, ctx: Ctx, hf_shapes: list[Shape]) -> dict[str, Shape]:
        return {"": hf_shapes[0]}


class Copy(Transform):
    def to_megatron(self, ctx, t):
        return {"": t}

    def to_hf(self, ctx, mg):
        return (mg[""],)


class Vocab(Transform):
    """Vocab-parallel embedding / output layer: zero rows appended so the vocab splits evenly across TP."""

    def to_megatron(self, ctx, t):
        return {"": T.pad_vocab(t, ctx.layout.padded_vocab(ctx.arch))}

    def to_hf(self, ctx, mg):
        return (T.unpad_vocab(mg[""], ctx.arch.vocab_size),)

    def megatron_shapes(self, ctx, hf_shapes):
        return {"": (ctx.layout.padded_vocab(ctx.arch), *hf_shapes[0][1:])}


class QKV(Transform):
    """q, k, v → linear_qkv rows [q of group g | k_g | v_g] per KV group."""

    def to_megatron(self, ctx, q, k, v):
        return {"": T.qkv_interleave(q, k, v, ctx.arch.num_kv_heads, ctx.arch.head_dim)}

    def to_hf(self, ctx, mg):
        return T.qkv_split(mg[""], ctx.arch.num_heads, ctx.arch.num_kv_heads, ctx.arch.head_dim)

    def megatron_shapes(self, ctx, hf_shapes):
        return {"": (sum(s[0] for s in hf_shapes), *hf_shapes[0][1:])}


class GateUp(Transform):
    """gate, up → linear_fc1 = [gate; up] (megatron-core's SwiGLU layout)."""

    def to_megatron(self, ctx, gate, up):
        return {"": T.gate_up_fuse(gate, up)}

    def to_hf(self, ctx, mg):
        return T.gate_up_split(mg[""])

    def megatron_shapes(self, ctx, hf_shapes):
        return {"": (2 * hf_shapes[0][0], *hf_shapes[0][1:])}


@dataclass(frozen=True)
class MambaSegments(Transform):
    """in_proj rows z|x|B|C|dt (or conv1d channels x|B|C) → one Megatron piece per segment, B/C groups replicated
    when TP exceeds the HF group count."""

    segments: tuple[str, ...]

    def _sizes(self, ctx: Ctx) -> dict[str, int]:
        sizes = ctx.arch.in_proj_segments() if self.segments == SSM_SEGMENTS else ctx.arch.conv_segments()
        return {s: sizes[s] for s in self.segments}

    def to_megatron(self, ctx, t):
        parts = T.split_rows(t, self._sizes(ctx))
        for s in ("B", "C"):
            parts[s] = T.replicate_groups(parts[s], ctx.arch.mamba_n_groups, ctx.group_factor)
        return {f".{s}": p for s, p in parts.items()}

    def to_hf_reporting(self, ctx, mg):
        parts = {s: mg[f".{s}"] for s in self.segments}
        divergence = 0.0
        for s in ("B", "C"):
            parts[s], d = T.collapse_groups(parts[s], ctx.arch.mamba_n_groups, ctx.group_factor)
            divergence = max(divergence, d)
        return (T.join_rows(parts, self.segments),), divergence

    def megatron_shapes(self, ctx, hf_shapes):
        rest = hf_shapes[0][1:]
        sizes = self._sizes(ctx)
        return {f".{s}": (n * (ctx.group_factor if s in "BC" else 1), *rest) for s, n in sizes.items()}


COPY, VOCAB, QKV_, GATE_UP = Copy(), Vocab(), QKV(), GateUp()
IN_PROJ, CONV = MambaSegments(SSM_SEGMENTS), MambaSegments(CONV_SEGMENTS)


# ---- the table ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    megatron: str  # Megatron parameter name; checkpoint keys are megatron + each suffix of the transform
    hf: tuple[tuple[str, Callable[[FalconH1Arch], Shape]], ...]  # (HF name, HF shape) feeding it, in order
    transform: Transform
    when: Callable[[FalconH1Arch], bool] = lambda a: True


def R(megatron, hf, transform, when=lambda a: True) -> Rule:
    return Rule(megatron, hf if isinstance(hf[0], tuple) else (hf,), transform, when)


# Megatron "<name>"  ↔  HF "<name>"
MODEL_RULES = (
    R("embedding.word_embeddings.weight", ("model.embed_tokens.weight", lambda a: (a.vocab_size, a.hidden_size)),
      VOCAB),
    R("decoder.final_norm.weight", ("model.final_layernorm.weight", lambda a: (a.hidden_size,)), COPY),
    R("output_layer.weight", ("lm_head.weight", lambda a: (a.vocab_size, a.hidden_size)), VOCAB,
      when=lambda a: not a.tie_word_embeddings),
)

# Megatron "decoder.layers.{i}.<name>"  ↔  HF "model.layers.{i}.<name>"   (i = global layer index)
LAYER_RULES = (
    # shared pre-norm of the parallel Mamba and attention branches
    R("norm.weight", ("input_layernorm.weight", lambda a: (a.hidden_size,)), COPY),
    # attention
    R("self_attention.linear_qkv.weight", (("self_attn.q_proj.weight", lambda a: (a.q_width, a.hidden_size)),
                                           ("self_attn.k_proj.weight", lambda a: (a.kv_width, a.hidden_size)),
                                           ("self_attn.v_proj.weight", lambda a: (a.kv_width, a.hidden_size))), QKV_),
    R("self_attention.linear_qkv.bias", (("self_attn.q_proj.bias", lambda a: (a.q_width,)),
                                         ("self_attn.k_proj.bias", lambda a: (a.kv_width,)),
                                         ("self_attn.v_proj.bias", lambda a: (a.kv_width,))), QKV_,
      when=lambda a: a.attention_bias),
    R("self_attention.linear_proj.weight", ("self_attn.o_proj.weight", lambda a: (a.hidden_size, a.q_width)), COPY),
    R("self_attention.linear_proj.bias", ("self_attn.o_proj.bias", lambda a: (a.hidden_size,)), COPY,
      when=lambda a: a.attention_bias),
    # Mamba-2 mixer
    R("mamba_mixer.in_proj.weight", ("mamba.in_proj.weight", lambda a: (a.in_proj_rows, a.hidden_size)), IN_PROJ),
    R("mamba_mixer.conv1d.weight", ("mamba.conv1d.weight", lambda a: (a.conv_dim, 1, a.mamba_d_conv)), CONV),
    R("mamba_mixer.conv1d.bias", ("mamba.conv1d.bias", lambda a: (a.conv_dim,)), CONV),
    R("mamba_mixer.dt_bias", ("mamba.dt_bias", lambda a: (a.mamba_n_heads,)), COPY),
    R("mamba_mixer.A_log", ("mamba.A_log", lambda a: (a.mamba_n_heads,)), COPY),
    R("mamba_mixer.D", ("mamba.D", lambda a: (a.mamba_n_heads,)), COPY),
    R("mamba_mixer.norm.weight", ("mamba.norm.weight", lambda a: (a.mamba_d_ssm,)), COPY,
      when=lambda a: a.mamba_rms_norm),
    R("mamba_mixer.out_proj.weight", ("mamba.out_proj.weight", lambda a: (a.hidden_size, a.mamba_d_ssm)), COPY),
    # MLP (its pre-norm is fused into linear_fc1, as in Megatron-Bridge)
    R("mlp.linear_fc1.layer_norm_weight", ("pre_ff_layernorm.weight", lambda a: (a.hidden_size,)), COPY),
    R("mlp.linear_fc1.weight", (("feed_forward.gate_proj.weight", lambda a: (a.intermediate_size, a.hidden_size)),
                                ("feed_forward.up_proj.weight", lambda a: (a.intermediate_size, a.hidden_size))),
      GATE_UP),
    R("mlp.linear_fc1.bias", (("feed_forward.gate_proj.bias", lambda a: (a.intermediate_size,)),
                              ("feed_forward.up_proj.bias", lambda a: (a.intermediate_size,))), GATE_UP,
      when=lambda a: a.mlp_bias),
    R("mlp.linear_fc2.weight", ("feed_forward.down_proj.weight", lambda a: (a.hidden_size, a.intermediate_size)),
      COPY),
    R("mlp.linear_fc2.bias", ("feed_forward.down_proj.bias", lambda a: (a.hidden_size,)), COPY,
      when=lambda a: a.mlp_bias),
)


# HF linears that BitNet ternarizes (all but lm_head; embeddings, norms, conv1d, A_log, D, dt_bias stay float)
BITNET_LINEARS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mamba.in_proj.weight", "mamba.out_proj.weight",
                  "feed_forward.gate_proj.weight", "feed_forward.up_proj.weight", "feed_forward.down_proj.weight")


def is_bitnet_linear(hf_name: str) -> bool:
    return hf_name.startswith("model.layers.") and hf_name.endswith(BITNET_LINEARS)


def bitnet_scale_name(weight_name: str) -> str:
    """The packed format's companion of `X.weight`: `X.weight_scale`."""
    return weight_name.removesuffix("weight") + "weight_scale"


# Modules with an `_extra_state` object: megatron-core's parallel linears (None for the local backend, FP8 metadata
# for Transformer Engine) and, under the Transformer Engine spec Megatron-Bridge builds Falcon-H1 with, the norms
# (TENorm is TE's RMSNorm, whose extra state is empty without FP8). A checkpoint holds one per module (None) so a
# load by either spec finds every key it asks for; a model without the object ignores it.
MODEL_EXTRA_STATE_MODULES = ("output_layer", "decoder.final_norm")  # output_layer exists when tied too
LAYER_EXTRA_STATE_MODULES = ("norm", "mamba_mixer.in_proj", "mamba_mixer.out_proj", "self_attention.linear_qkv",
                             "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def megatron_extra_state_keys(arch: FalconH1Arch) -> list[str]:
    """The checkpoint keys of those `_extra_state` objects (ShardedObject key + '/shard_0_1', TP-independent)."""
    modules = [f"decoder.layers.{i}.{m}" for i in range(arch.num_layers) for m in LAYER_EXTRA_STATE_MODULES]
    modules += MODEL_EXTRA_STATE_MODULES
    return [f"{m}._extra_state/shard_0_1" for m in modules]


# ---- the table, expanded for one model ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One rule instantiated at one layer: concrete names and shapes."""

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[Shape, ...]
    transform: Transform
    layer: int | None  # global layer index, None for model-level tensors

    def megatron_keys(self, ctx: Ctx) -> dict[str, Shape]:
        """Checkpoint key → global shape."""
        shapes = self.transform.megatron_shapes(ctx, list(self.hf_shapes))
        return {self.megatron + suffix: shape for suffix, shape in shapes.items()}


def entries(arch: FalconH1Arch) -> list[Entry]:
    """Every tensor of the model, in forward order (embedding, layers, final norm, output layer)."""
    def make(rule: Rule, mg_prefix: str, hf_prefix: str, layer: int | None) -> Entry:
        return Entry(mg_prefix + rule.megatron, tuple(hf_prefix + n for n, _ in rule.hf),
                     tuple(shape(arch) for _, shape in rule.hf), rule.transform, layer)

    model = {r.megatron: r for r in MODEL_RULES if r.when(arch)}
    out = [make(model.pop("embedding.word_embeddings.weight"), "", "", None)]
    for i in range(arch.num_layers):
        out += [make(r, f"decoder.layers.{i}.", f"model.layers.{i}.", i) for r in LAYER_RULES if r.when(arch)]
    out += [make(r, "", "", None) for r in model.values()]
    return out


def hf_tensor_shapes(arch: FalconH1Arch) -> dict[str, Shape]:
    """Every tensor of the HF checkpoint and its shape."""
    return {n: s for e in entries(arch) for n, s in zip(e.hf, e.hf_shapes)}


def megatron_tensor_shapes(arch: FalconH1Arch, layout: MegatronLayout) -> dict[str, Shape]:
    """Every key of the Megatron checkpoint and its global shape."""
    ctx = Ctx(arch, layout)
    return {k: s for e in entries(arch) for k, s in e.megatron_keys(ctx).items()}
