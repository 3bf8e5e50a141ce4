"""The map: Megatron checkpoint key ↔ HF tensor name(s) ↔ transform, one table per model family; Falcon-H1's is
here, the Llama family's in `core/llama.py`.

Read Falcon-H1's next to transformers' modeling_falcon_h1.py: every HF tensor of FalconH1ForCausalLM appears once
below, with its shape, the µP multiplier folded into it (`--mup fold`), how create-random initialises it, and
whether BitNet ternarizes it. Megatron names follow Megatron-Bridge's Falcon-H1 model so checkpoints interoperate.
Everything else that is per tensor (the fold, BitNet's per-HF-tensor scales, random weights, the packed format's
list of linears) is read off the table of the architecture's family (`table_of(arch)`).

Megatron checkpoint tensors are *global* (dist_checkpointing reshards them for any TP at load time); a transform
turns HF tensors into one or more global Megatron tensors (`suffix → tensor`, e.g. in_proj's `.z .x .B .C .dt`
pieces, which is how megatron-core's MambaMixer stores them) and back.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

from falcon_bridge.core import random_init as rnd
from falcon_bridge.core import transforms as T
from falcon_bridge.core.config import CONV_SEGMENTS, GROUP_SEGMENTS, SSM_SEGMENTS, Arch, FalconH1Arch
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput, shown

Shape = tuple[int, ...]
Factor = float | torch.Tensor  # a µP fold factor: a scalar, or one per row ([rows, 1])


@dataclass(frozen=True)
class Ctx:
    """What a transform needs to know: the HF architecture and the Megatron layout it is stored in."""

    arch: Arch
    layout: MegatronLayout

    @property
    def group_factor(self) -> int:
        return self.layout.group_factor(self.arch)


# ---- transforms: (HF tensors → {suffix: Megatron tensor}) and back ---------------------------------------------
class Transform:
    # Equal blocks of each Megatron tensor that tensor parallelism splits separately (fc1's [gate; up]: each rank
    # holds [gate_r; up_r]); megatron-core's MambaMixer splits each in_proj/conv1d piece, which are separate keys.
    tp_blocks = 1

    def to_megatron(self, ctx: Ctx, *hf: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def to_hf(self, ctx: Ctx, mg: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def to_hf_reporting(self, ctx: Ctx, mg: dict[str, torch.Tensor]) -> tuple[tuple[torch.Tensor, ...], float]:
        """to_hf, plus how far copies that should be identical (replicated Mamba groups) had drifted apart."""
        return self.to_hf(ctx, mg), 0.0

    def megatron_shapes(self, ctx: Ctx, hf_shapes: list[Shape]) -> dict[str, Shape]:
        return {"": hf_shapes[0]}

    def rank_rows(self, ctx: Ctx, hf_rows: list[int], tp_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each row a column-parallel TP rank holds of the Megatron weight (its pieces' rank slices, in piece
        order): the global index of the HF row it holds, counting through the rule's HF tensors in order; and how
        many times that HF row appears in the whole Megatron weight (replicated Mamba groups: more than once).
        Found by sending row indices through `to_megatron`, so it follows every fusion, interleave and replication
        the checkpoint layout makes."""
        pieces = list(self.to_megatron(ctx, *torch.arange(sum(hf_rows)).split(hf_rows)).values())
        local = torch.cat([block.chunk(ctx.layout.tp)[tp_rank] for piece in pieces
                           for block in piece.chunk(self.tp_blocks)])
        return local, torch.bincount(torch.cat(pieces), minlength=sum(hf_rows))[local]


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

    tp_blocks = 2

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
        for s in GROUP_SEGMENTS:
            parts[s] = T.replicate_groups(parts[s], ctx.arch.mamba_n_groups, ctx.group_factor)
        return {f".{s}": p for s, p in parts.items()}

    def to_hf_reporting(self, ctx, mg):
        parts = {s: mg[f".{s}"] for s in self.segments}
        divergence = 0.0
        for s in GROUP_SEGMENTS:
            parts[s], d = T.collapse_groups(parts[s], ctx.arch.mamba_n_groups, ctx.group_factor)
            divergence = max(divergence, d)
        return (T.join_rows(parts, self.segments),), divergence

    def megatron_shapes(self, ctx, hf_shapes):
        rest = hf_shapes[0][1:]
        sizes = self._sizes(ctx)
        return {f".{s}": (n * (ctx.group_factor if s in GROUP_SEGMENTS else 1), *rest) for s, n in sizes.items()}


COPY, VOCAB, QKV_, GATE_UP = Copy(), Vocab(), QKV(), GateUp()
IN_PROJ, CONV = MambaSegments(SSM_SEGMENTS), MambaSegments(CONV_SEGMENTS)


# ---- the table ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFTensor:
    name: str  # relative to "model.layers.{i}." for layer rules
    shape: Callable[[Arch], Shape]
    fold: Callable[[Arch], Factor] | None  # µP multiplier(s) `--mup fold` multiplies into it; None: none
    init: Callable  # create-random's initialiser, from core/random_init.py


def hf(name: str, shape: Callable[[Arch], Shape], fold: Callable[[Arch], Factor] | None = None,
       init: Callable | None = None) -> HFTensor:
    """An HF tensor of a rule. create-random initialises it as a linear layer's weight (or, for `.bias`, as a bias)
    unless the rule names another initialiser."""
    return HFTensor(name, shape, fold, init or (rnd.bias if name.endswith(".bias") else rnd.linear))


@dataclass(frozen=True)
class Rule:
    megatron: str  # Megatron parameter name; checkpoint keys are megatron + each suffix of the transform
    hf: tuple[HFTensor, ...]  # the HF tensors feeding it, in the transform's order
    transform: Transform
    when: Callable[[Arch], bool] = lambda a: True
    # BitNet linears (ternary in BitNet models, packed in the HF format) say how TP splits the Megatron weight:
    # COLUMN its rows, ROW its columns. None: not a BitNet linear.
    bitnet: str | None = None


COLUMN, ROW = "column", "row"


def R(megatron, hf_tensors, transform, when=lambda a: True, bitnet=None) -> Rule:
    return Rule(megatron, hf_tensors if isinstance(hf_tensors, tuple) else (hf_tensors,), transform, when, bitnet)


def mult(name: str, index: int | None = None) -> Callable[[FalconH1Arch], float]:
    """The fold factor that is one µP multiplier (`index`: one entry of a list multiplier)."""
    return lambda a: getattr(a.multipliers, name) if index is None else getattr(a.multipliers, name)[index]


def in_proj_bias_fold(a: FalconH1Arch) -> torch.Tensor:
    """in_proj bias's per-row fold factor [rows]: each segment's ssm_multiplier, which HF applies to the in_proj
    output, bias included (ssm_in multiplies only the input)."""
    return torch.cat([torch.full((n,), s, dtype=torch.float64) for n, s in zip(a.in_proj_segments().values(),
                                                                              a.multipliers.ssm)])


def in_proj_fold(a: FalconH1Arch) -> torch.Tensor:
    """in_proj's per-row fold factor [rows, 1]: ssm_in (its input's multiplier) × each segment's ssm_multiplier."""
    return (a.multipliers.ssm_in * in_proj_bias_fold(a)).unsqueeze(1)


# Megatron "<name>"  ↔  HF "<name>"
MODEL_RULES = (
    R("embedding.word_embeddings.weight",
      hf("model.embed_tokens.weight", lambda a: (a.vocab_size, a.hidden_size), mult("embedding"), rnd.embedding),
      VOCAB),
    R("decoder.final_norm.weight", hf("model.final_layernorm.weight", lambda a: (a.hidden_size,), init=rnd.norm),
      COPY),
    R("output_layer.weight", hf("lm_head.weight", lambda a: (a.vocab_size, a.hidden_size), mult("lm_head")), VOCAB,
      when=lambda a: not a.tie_word_embeddings),
)

# Megatron "decoder.layers.{i}.<name>"  ↔  HF "model.layers.{i}.<name>"   (i = global layer index)
MEGATRON_LAYER_PREFIX, HF_LAYER_PREFIX = "decoder.layers.", "model.layers."
LAYER_RULES = (
    # shared pre-norm of the parallel Mamba and attention branches
    R("norm.weight", hf("input_layernorm.weight", lambda a: (a.hidden_size,), init=rnd.norm), COPY),
    # attention (attention_in multiplies its input: folded into q, k, v; key_multiplier scales K)
    R("self_attention.linear_qkv.weight",
      (hf("self_attn.q_proj.weight", lambda a: (a.q_width, a.hidden_size), mult("attention_in")),
       hf("self_attn.k_proj.weight", lambda a: (a.kv_width, a.hidden_size),
          lambda a: a.multipliers.attention_in * a.multipliers.key),
       hf("self_attn.v_proj.weight", lambda a: (a.kv_width, a.hidden_size), mult("attention_in"))),
      QKV_, bitnet=COLUMN),
    R("self_attention.linear_qkv.bias",
      (hf("self_attn.q_proj.bias", lambda a: (a.q_width,)),
       hf("self_attn.k_proj.bias", lambda a: (a.kv_width,), mult("key")),
       hf("self_attn.v_proj.bias", lambda a: (a.kv_width,))),
      QKV_, when=lambda a: a.attention_bias),
    R("self_attention.linear_proj.weight",
      hf("self_attn.o_proj.weight", lambda a: (a.hidden_size, a.q_width), mult("attention_out")), COPY, bitnet=ROW),
    R("self_attention.linear_proj.bias", hf("self_attn.o_proj.bias", lambda a: (a.hidden_size,),
                                            mult("attention_out")), COPY, when=lambda a: a.attention_bias),
    # Mamba-2 mixer
    R("mamba_mixer.in_proj.weight", hf("mamba.in_proj.weight", lambda a: (a.in_proj_rows, a.hidden_size),
                                       in_proj_fold), IN_PROJ, bitnet=COLUMN),
    R("mamba_mixer.in_proj.bias", hf("mamba.in_proj.bias", lambda a: (a.in_proj_rows,), in_proj_bias_fold),
      IN_PROJ, when=lambda a: a.mamba_proj_bias),
    R("mamba_mixer.conv1d.weight", hf("mamba.conv1d.weight", lambda a: (a.conv_dim, 1, a.mamba_d_conv),
                                      init=rnd.conv), CONV),
    R("mamba_mixer.conv1d.bias", hf("mamba.conv1d.bias", lambda a: (a.conv_dim,), init=rnd.conv), CONV),
    R("mamba_mixer.dt_bias", hf("mamba.dt_bias", lambda a: (a.mamba_n_heads,), init=rnd.dt_bias), COPY),
    R("mamba_mixer.A_log", hf("mamba.A_log", lambda a: (a.mamba_n_heads,), init=rnd.a_log), COPY),
    R("mamba_mixer.D", hf("mamba.D", lambda a: (a.mamba_n_heads,), init=rnd.skip), COPY),
    R("mamba_mixer.norm.weight", hf("mamba.norm.weight", lambda a: (a.mamba_d_ssm,), init=rnd.norm), COPY,
      when=lambda a: a.mamba_rms_norm),
    R("mamba_mixer.out_proj.weight", hf("mamba.out_proj.weight", lambda a: (a.hidden_size, a.mamba_d_ssm),
                                        mult("ssm_out")), COPY, bitnet=ROW),
    R("mamba_mixer.out_proj.bias", hf("mamba.out_proj.bias", lambda a: (a.hidden_size,), mult("ssm_out")), COPY,
      when=lambda a: a.projectors_bias),
    # MLP (its pre-norm is fused into linear_fc1, as in Megatron-Bridge; mlp_multipliers: gate, down)
    R("mlp.linear_fc1.layer_norm_weight", hf("pre_ff_layernorm.weight", lambda a: (a.hidden_size,), init=rnd.norm),
      COPY),
    R("mlp.linear_fc1.weight",
      (hf("feed_forward.gate_proj.weight", lambda a: (a.intermediate_size, a.hidden_size), mult("mlp", 0)),
       hf("feed_forward.up_proj.weight", lambda a: (a.intermediate_size, a.hidden_size))),
      GATE_UP, bitnet=COLUMN),
    R("mlp.linear_fc1.bias",
      (hf("feed_forward.gate_proj.bias", lambda a: (a.intermediate_size,), mult("mlp", 0)),
       hf("feed_forward.up_proj.bias", lambda a: (a.intermediate_size,))),
      GATE_UP, when=lambda a: a.mlp_bias),
    R("mlp.linear_fc2.weight", hf("feed_forward.down_proj.weight", lambda a: (a.hidden_size, a.intermediate_size),
                                  mult("mlp", 1)), COPY, bitnet=ROW),
    R("mlp.linear_fc2.bias", hf("feed_forward.down_proj.bias", lambda a: (a.hidden_size,),
                                mult("mlp", 1)), COPY, when=lambda a: a.mlp_bias),
)


# Modules with an `_extra_state` object: megatron-core's parallel linears (None for the local backend, FP8 metadata
# for Transformer Engine) and, under the Transformer Engine spec Megatron-Bridge builds Falcon-H1 with, the norms
# (TENorm is TE's RMSNorm, whose extra state is empty without FP8). A checkpoint holds one per module (None) so a
# load by either spec finds every key it asks for; a model without the object ignores it.
MODEL_EXTRA_STATE_MODULES = ("output_layer", "decoder.final_norm")  # output_layer exists when tied too
LAYER_EXTRA_STATE_MODULES = ("norm", "mamba_mixer.in_proj", "mamba_mixer.out_proj", "self_attention.linear_qkv",
                             "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


# ---- a family's table and the per-tensor facts read off it ------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """One family's map: its model-level rules (the embedding first), its per-layer rules (Megatron
    `decoder.layers.{i}.<name>` ↔ HF `model.layers.{i}.<name>`), and the modules holding an `_extra_state`."""

    family: str
    model_rules: tuple[Rule, ...]
    layer_rules: tuple[Rule, ...]
    model_extra_state_modules: tuple[str, ...]
    layer_extra_state_modules: tuple[str, ...]

    def hf_rule(self, hf_name: str) -> tuple[Rule, HFTensor] | None:
        """The rule of a full HF tensor name (`model.layers.7.mamba.D` → the mamba_mixer.D rule), None if
        unknown."""
        in_layer = hf_name.startswith(HF_LAYER_PREFIX)
        key = hf_name.split(".", 3)[-1] if in_layer else hf_name
        found = self._hf_tensors.get(key)
        # a layer tensor's relative name never collides with a model-level one, but it is only valid under layers
        return found if found and (found[0] in self.layer_rules) == in_layer else None

    @functools.cached_property  # written into the instance's __dict__, which a frozen dataclass allows
    def _hf_tensors(self) -> dict[str, tuple[Rule, HFTensor]]:
        return {t.name: (rule, t) for rule in self.model_rules + self.layer_rules for t in rule.hf}


# Every family's table, by `Arch.family`: a family module registers its own when imported (its architecture class
# lives there too, so an architecture of the family never exists without its table).
TABLES: dict[str, Table] = {}


def register(table: Table) -> Table:
    TABLES[table.family] = table
    return table


def table_of(arch: Arch) -> Table:
    return TABLES[arch.family]


FALCON_H1 = register(Table(FalconH1Arch.family, MODEL_RULES, LAYER_RULES, MODEL_EXTRA_STATE_MODULES,
                           LAYER_EXTRA_STATE_MODULES))


def hf_rule(arch: Arch, hf_name: str) -> tuple[Rule, HFTensor] | None:
    """The rule of a full HF tensor name in the architecture's family, None if unknown."""
    return table_of(arch).hf_rule(hf_name)


def fold_factor(arch: Arch, hf_name: str) -> Factor | None:
    """The µP factor folded into this HF tensor, or None when none is (norms, conv1d, A_log, D, dt_bias, up_proj;
    every tensor of a family without µP)."""
    found = hf_rule(arch, hf_name)
    return None if found is None or found[1].fold is None else found[1].fold(arch)


def is_bitnet_linear(arch: Arch, hf_name: str) -> bool:
    """Whether BitNet ternarizes this HF tensor (every linear weight of the blocks; not embeddings, lm_head, norms,
    conv1d, A_log, D, dt_bias, biases)."""
    found = hf_rule(arch, hf_name)
    return found is not None and found[0].bitnet is not None


def bitnet_row_sources(rule: Rule, ctx: Ctx, tp_rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a BitNet linear's weight on one TP rank: which of the rule's HF tensors each local row comes from
    (long [rows]), how many copies of each row the rank's weight holds (long [rows]: replicated Mamba B/C rows
    count once), and each HF tensor's element count (long) — what per-HF-tensor absmean scales need, whatever TP
    fuses and splits."""
    shapes = [t.shape(ctx.arch) for t in rule.hf]
    rows = [s[0] for s in shapes]
    numel = torch.tensor([math.prod(s) for s in shapes])
    if rule.bitnet == ROW:  # TP splits the columns: every rank holds all rows, of one HF tensor
        return torch.zeros(rows[0], dtype=torch.long), torch.ones(rows[0], dtype=torch.long), numel
    local, copies = rule.transform.rank_rows(ctx, rows, tp_rank)
    return torch.bucketize(local, torch.tensor(rows).cumsum(0), right=True), copies.long(), numel


def megatron_extra_state_keys(arch: Arch) -> list[str]:
    """The checkpoint keys of the `_extra_state` objects (ShardedObject key + '/shard_0_1', TP-independent)."""
    table = table_of(arch)
    modules = [f"{MEGATRON_LAYER_PREFIX}{i}.{m}" for i in range(arch.num_layers)
               for m in table.layer_extra_state_modules]
    modules += table.model_extra_state_modules
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


def entries(arch: Arch) -> list[Entry]:
    """Every tensor of the model, in forward order (embedding, layers, final norm, output layer)."""
    table = table_of(arch)
    def make(rule: Rule, mg_prefix: str, hf_prefix: str, layer: int | None) -> Entry:
        return Entry(mg_prefix + rule.megatron, tuple(hf_prefix + t.name for t in rule.hf),
                     tuple(t.shape(arch) for t in rule.hf), rule.transform, layer)

    model = {r.megatron: r for r in table.model_rules if r.when(arch)}
    out = [make(model.pop("embedding.word_embeddings.weight"), "", "", None)]
    for i in range(arch.num_layers):
        out += [make(r, f"{MEGATRON_LAYER_PREFIX}{i}.", f"{HF_LAYER_PREFIX}{i}.", i) for r in table.layer_rules
                if r.when(arch)]
    out += [make(r, "", "", None) for r in model.values()]
    return out


def refuse_more_layers_than_stored(arch: Arch, names: Iterable[str], prefix: str, field: str) -> None:
    """Everything built per layer (the entries, the expected tensors, the model) loops over the layer count a config
    claims: it is checked first against the layers a checkpoint's tensor names hold (the distinct `i` of names
    `prefix{i}.…`). `field` names where the count came from."""
    stored = len({index for name in names if name.startswith(prefix)
                  and (index := name[len(prefix):].split(".", 1)[0]).isdigit()})
    if arch.num_layers > stored:
        raise BadInput(f"{field} is {shown(arch.num_layers)}, but the checkpoint holds tensors of {stored} layers")


def hf_tensor_shapes(arch: Arch) -> dict[str, Shape]:
    """Every tensor of the HF checkpoint and its shape."""
    return {n: s for e in entries(arch) for n, s in zip(e.hf, e.hf_shapes)}


def num_parameters(arch: Arch) -> int:
    """Counted from one layer (every layer holds the same tensors), so that a card claiming 10**9 layers is counted,
    and refused for its size, without a loop over its layers."""
    sizes = [(e.layer is None, sum(math.prod(s) for s in e.hf_shapes)) for e in entries(replace(arch, num_layers=1))]
    return sum(n for model_level, n in sizes if model_level) + arch.num_layers * sum(
        n for model_level, n in sizes if not model_level)


def megatron_tensor_shapes(arch: Arch, layout: MegatronLayout) -> dict[str, Shape]:
    """Every key of the Megatron checkpoint and its global shape."""
    ctx = Ctx(arch, layout)
    return {k: s for e in entries(arch) for k, s in e.megatron_keys(ctx).items()}
