"""Falcon-H1 in megatron-core: one readable file, built from stock megatron-core modules.

    x = embedding(ids) · embedding_multiplier
    per block:  n = norm(x)
                x = x + Mamba(n · ssm_in) · ssm_out + Attention(n · attention_in) · attention_out
                x = x + MLP(x) · mlp_down            (MLP pre-norm fused into linear_fc1; SiLU(gate · mlp_gate))
    logits = output_layer(final_norm(x)) · lm_head_multiplier

Attention applies key_multiplier to K before RoPE; the mixer applies ssm_multipliers to the z|x|B|C|dt segments of
its in_proj output. With µP folded into the weights all multipliers are 1.0 and every scaling is skipped.
Module names follow Megatron-Bridge's Falcon-H1 model so checkpoints interoperate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache, partial

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.ssm.mamba_mixer import ExtendedRMSNorm, MambaMixer
from megatron.core.ssm.utils import _split_tensor_factory
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import sharded_state_dict_default

from falcon_bridge.core.config import CONV_SEGMENTS, GROUP_SEGMENTS, SSM_SEGMENTS, mamba_segment_sizes
from falcon_bridge.megatron.language_model import HFLanguageModel


@dataclass
class FalconH1TransformerConfig(TransformerConfig):
    """TransformerConfig plus what Falcon-H1 adds: the µP forward multipliers and the Mamba-2 mixer settings."""

    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    key_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)  # z, x, B, C, dt
    mlp_multipliers: tuple[float, float] = (1.0, 1.0)  # gate, down
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 128
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = False  # the gated norm's order (HF's; megatron-core's mixer only normalizes after)
    # B/C groups of the HF model; megatron's mamba_num_groups is larger when they were replicated to reach a TP
    # beyond them (the gated norm's groups and BitNet's weight scales still follow HF's).
    mamba_hf_num_groups: int | None = None


# sharded_state_dict metadata: the B/C group count a checkpoint stores, when it is not the HF count (checkpoints
# written before group replication moved out of the file stored their TP's replicated groups).
STORED_MAMBA_GROUPS = "falcon_h1_stored_mamba_groups"


def scaled_silu(x: torch.Tensor, gate_multiplier: float) -> torch.Tensor:
    """MLP activation with Falcon-H1's gate multiplier: megatron's SwiGLU computes act(gate) · up."""
    return F.silu(x * gate_multiplier)


def _scale(t: torch.Tensor, m: float) -> torch.Tensor:
    return t if m == 1.0 else t * m


def _bias_added(output: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """A megatron module's (output, bias) as one tensor: row-parallel linears return their bias unadded."""
    out, bias = output
    return out if bias is None else out + bias


@cache
def with_bias(linear: type) -> type:
    """`linear`, built with a bias whatever its builder asks: megatron-core's MambaMixer asserts bias=False for
    in_proj and out_proj, while HF's Falcon-H1 mixer has one for each flag (mamba_proj_bias: in_proj,
    projectors_bias: out_proj). The bias is the linear's own: TP-split with a column-parallel weight's rows, whole
    on every rank beside a row-parallel one."""
    class Biased(linear):
        def __init__(self, *args, bias=None, **kwargs):
            super().__init__(*args, bias=True, **kwargs)

    Biased.__name__ = Biased.__qualname__ = f"Biased{linear.__name__}"
    return Biased


class FalconH1SelfAttention(SelfAttention):
    """SelfAttention with Falcon-H1's key multiplier on K (before RoPE, which is applied later in forward)."""

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        if self.config.key_multiplier == 1.0:
            return out
        assert split_qkv, "key_multiplier needs the split-QKV path"
        query, key, *rest = out
        return (query, key * self.config.key_multiplier, *rest)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group, forward and backward: each rank's input feeds every rank's output, so the
    gradient of each input is the sum of all ranks' output gradients."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        t = t.clone()
        torch.distributed.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class HFGroupedGatedRMSNorm(ExtendedRMSNorm):
    """The gated Mamba norm as HF's FalconH1RMSNormGated computes it: rmsnorm(y · silu(z)) · w, or with
    norm_before_gate rmsnorm(y) · w · silu(z), over HF's norm groups (d_ssm / HF n_groups channels) with HF's eps.

    megatron-core's own norm cannot always: its eps is fixed at 1e-5, it only normalizes after the gate, and its
    groups are d_inner / mamba_num_groups, which is wrong once B/C groups were replicated (TP > n_groups). When a
    rank holds whole HF groups the statistic is local; when one group spans several TP
    ranks, each rank sums its squares, the sums are all-reduced over the TP group (one slot per norm group, so
    ranks of other groups add zeros) with gradients flowing back through the shared statistic, and each rank
    divides by the full group size. Same parameter (`weight`, TP-sharded on dim 0) and checkpoint key as
    megatron's norm.
    """

    def __init__(self, local: int, group_size: int, tp_group, eps: float, norm_before_gate: bool, dtype):
        super().__init__(local, eps=eps, group_size=min(local, group_size), norm_before_gate=norm_before_gate,
                         device=torch.cuda.current_device(), dtype=dtype)
        self.tp_group = tp_group
        self.full_group_size = group_size
        self.weight.tensor_model_parallel = True
        self.weight.partition_dim = 0

    def forward(self, x, z=None):
        h = x.float()
        gate = None if z is None else F.silu(z.float())
        if gate is not None and not self.norm_before_gate:
            h = h * gate
        local = h.shape[-1]
        if self.full_group_size <= local:  # whole groups on this rank
            g = h.unflatten(-1, (local // self.full_group_size, self.full_group_size))
            normed = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        else:
            ranks_per_group = self.full_group_size // local
            rank, size = self.tp_group.rank(), self.tp_group.size()
            slots = h.new_zeros(*h.shape[:-1], size // ranks_per_group)
            slots[..., rank // ranks_per_group] = 1.0
            sums = _AllReduceSum.apply(slots * h.square().sum(-1, keepdim=True), self.tp_group)
            mine = rank // ranks_per_group
            normed = h * torch.rsqrt(sums[..., mine:mine + 1] / self.full_group_size + self.eps)
        out = normed * self.weight.float()
        if gate is not None and self.norm_before_gate:
            out = out * gate
        return out.to(x.dtype)


class FalconH1MambaMixer(MambaMixer):
    """MambaMixer with Falcon-H1's ssm_multipliers on the z|x|B|C|dt segments of the in_proj output, and the gated
    norm as HF computes it (its eps and gate order, over HF's norm groups even when one group spans several TP
    ranks). in_proj and out_proj have a bias when their spec's linear is `with_bias`'s.

    The scaling hooks the in_proj output (bias included, as in HF), so it holds on every path that consumes it
    (fused training kernel, prefill, decode).
    """

    def __init__(self, config: FalconH1TransformerConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        hf_groups = self.hf_groups = config.mamba_hf_num_groups or self.ngroups
        # (HF group, copy index) of each local B/C group: groups are replicated in place, copies of one HF group
        # being consecutive Megatron groups
        first = self.pg_collection.tp.rank() * self.ngroups_local_tp
        self.local_group_copies = [divmod(first + j, self.ngroups // hf_groups) for j in range(self.ngroups_local_tp)]
        group = self.d_inner // hf_groups
        if self.rmsnorm and (group != self.d_inner_local_tp // self.ngroups_local_tp or config.mamba_norm_before_gate
                             or config.layernorm_epsilon != self.norm.eps):
            self.norm = HFGroupedGatedRMSNorm(self.d_inner_local_tp, group, self.pg_collection.tp,
                                              config.layernorm_epsilon, config.mamba_norm_before_gate,
                                              config.params_dtype)
        if self.rmsnorm and config.mamba_norm_before_gate:
            # the fused path gates inside the scan kernel, before its norm; the unfused one hands the norm the gate
            self.use_mem_eff_path = False
        if self.ngroups > hf_groups:
            self._sum_replica_gradients(hf_groups)
        if all(m == 1.0 for m in config.ssm_multipliers):
            return
        vector = torch.cat([torch.full((n,), m, dtype=torch.float32)
                            for n, m in zip(self.local_segment_rows().values(), config.ssm_multipliers)])
        self.register_buffer("mup_vector", vector.to(self.in_proj.weight.device), persistent=False)
        self.in_proj.register_forward_hook(self._scale_zxbcdt)

    def _sum_replica_gradients(self, hf_groups: int) -> None:
        """B/C groups replicated for TP (more Megatron groups than HF groups) are copies of one HF parameter, used
        by the heads of different ranks: each copy's gradient holds only its own heads' part, and the HF group's
        gradient is their sum. Hooks on in_proj's weight and conv1d's weight and bias replace each copy's B/C
        gradient by that sum (one all-reduce over TP) before it is accumulated, so every copy gets the same,
        complete gradient and optimizer steps keep the copies identical. Being inside the backward, this holds
        for megatron's DDP, distributed optimizer and CUDA graphs alike; wgrad fused into main_grad would bypass
        the hooks, hence the assert."""
        assert not self.config.gradient_accumulation_fusion, \
            "replicated Mamba groups need gradient_accumulation_fusion=False (their gradients are summed in a hook)"
        hf_group = torch.tensor([g for g, _ in self.local_group_copies])
        self.register_buffer("hf_group_of_local", hf_group.to(self.in_proj.weight.device), persistent=False)
        for param, starts in self._group_rows():
            if param is not None:
                param.register_hook(partial(self._replica_gradient_sum, hf_groups, starts))

    def _replica_gradient_sum(self, hf_groups: int, starts: tuple[int, int], grad: torch.Tensor) -> torch.Tensor:
        """grad with its B and C rows (local groups starting at `starts`) replaced by the sum, over every copy on
        every TP rank, of the gradient of the HF group each local group copies."""
        rows = self.ngroups_local_tp * self.d_state
        copies = torch.stack([grad[s:s + rows] for s in starts]).unflatten(1, (self.ngroups_local_tp, self.d_state))
        total = copies.new_zeros(2, hf_groups, *copies.shape[2:]).index_add_(1, self.hf_group_of_local, copies)
        torch.distributed.all_reduce(total, group=self.pg_collection.tp)
        grad = grad.clone()
        for i, s in enumerate(starts):
            grad[s:s + rows] = total[i, self.hf_group_of_local].flatten(0, 1)
        return grad

    @torch.no_grad()
    def group_copy_spread(self) -> float:
        """The largest |Δ| between copies of one HF B/C group (in_proj rows, conv1d weight and bias channels)
        across the TP ranks: 0 when the replicas trained in step. Every TP rank calls it (one all-gather per
        parameter). Copies of an HF group are consecutive Megatron groups, so the rank-ordered groups unflatten to
        [HF group, copy]."""
        group, rows = self.pg_collection.tp, self.ngroups_local_tp * self.d_state
        spread = 0.0
        for param, starts in self._group_rows():
            local = torch.stack([param[s:s + rows] for s in starts]).unflatten(1, (self.ngroups_local_tp,
                                                                                   self.d_state))
            parts = [torch.empty_like(local) for _ in range(group.size())]
            torch.distributed.all_gather(parts, local, group=group)
            copies = torch.cat(parts, 1).unflatten(1, (self.hf_groups, -1))  # [B|C, HF group, copy, d_state, ...]
            spread = max(spread, (copies - copies[:, :, :1]).abs().max().item())
        return spread

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint B/C pieces hold the HF groups (or, for checkpoints written that way, `metadata`'s
        STORED_MAMBA_GROUPS copies of them), whatever this run replicated them to: each local group is read from,
        and saved as, the first stored copy of its HF group, with a replica id per run copy (only the first is
        written). So one checkpoint loads at any TP, and a model trained at TP > groups saves what HF has."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if f"{prefix}in_proj.bias" in sd:  # megatron splits the weight only; the bias is stored as its rows are
            sd[f"{prefix}in_proj.bias"] = _split_tensor_factory(sd[f"{prefix}in_proj.bias"],
                                                                list(self.local_segment_rows().values()),
                                                                list(SSM_SEGMENTS), 0)
        stored = (metadata or {}).get(STORED_MAMBA_GROUPS) or self.hf_groups
        if stored == self.ngroups:  # megatron's own sharding already says it
            return sd
        assert not sharded_offsets, "FalconH1Stack passes no sharded offsets"
        for name in ("in_proj.weight", "in_proj.bias", "conv1d_weight", "conv1d_bias"):
            factory = sd.get(f"{prefix}{name}")
            if factory is not None:
                sd[f"{prefix}{name}"] = replace(factory, build_fn=partial(self._build_onto_stored_groups,
                                                                          factory.build_fn, stored))
        return sd

    def _build_onto_stored_groups(self, build_fn, stored: int, key, data, replica_id, flattened_range):
        """megatron's z|x|B|C|dt (or x|B|C) pieces, with each B/C piece cut into its local groups and each group
        placed on its HF group's first copy among the `stored` groups of the checkpoint."""
        stored_copies = stored // self.hf_groups
        pieces = []
        for piece in build_fn(key, data, replica_id, flattened_range):
            if not piece.key.endswith((".B", ".C")):
                pieces.append(piece)
                continue
            rest = piece.local_shape[1:]
            for j, (hf_group, copy) in enumerate(self.local_group_copies):
                rid = piece.replica_id
                pieces.append(replace(
                    piece, data=piece.data.narrow(0, j * self.d_state, self.d_state),
                    local_shape=(self.d_state, *rest), global_shape=(stored * self.d_state, *rest),
                    global_offset=(hf_group * stored_copies * self.d_state, *(0 for _ in rest)),
                    axis_fragmentations=(stored, *(1 for _ in rest)),
                    replica_id=(rid[0], copy, *rid[2:]) if isinstance(rid, tuple) else (rid, copy)))
        return pieces

    def local_segment_rows(self) -> dict[str, int]:
        """This rank's in_proj output rows per segment z|x|B|C|dt (each rank holds its slice of every segment)."""
        return mamba_segment_sizes(self.d_inner_local_tp, self.ngroups_local_tp * self.d_state, self.nheads_local_tp)

    def _group_rows(self):
        """(parameter, (first local B row, first local C row)) for in_proj's weight (and bias, if any) and conv1d's
        weight and bias: where the group-shared rows sit in this rank's z|x|B|C|dt and x|B|C slices."""
        sizes = self.local_segment_rows()

        def starts(order: tuple[str, ...]) -> tuple[int, ...]:
            return tuple(sum(sizes[s] for s in order[:order.index(g)]) for g in GROUP_SEGMENTS)

        ssm, conv = starts(SSM_SEGMENTS), starts(CONV_SEGMENTS)
        in_proj = [(p, ssm) for p in (self.in_proj.weight, getattr(self.in_proj, "bias", None)) if p is not None]
        return *in_proj, (self.conv1d_weight, conv), (self.conv1d_bias, conv)

    def _scale_zxbcdt(self, module, inputs, output):
        zxbcdt, bias = output
        return zxbcdt * self.mup_vector.to(zxbcdt.dtype), bias


@dataclass
class FalconH1LayerSubmodules:
    norm: ModuleSpec | type
    mamba_mixer: ModuleSpec | type
    self_attention: ModuleSpec | type
    mlp: ModuleSpec | type


class FalconH1Layer(MegatronModule):
    """One Falcon-H1 block: a shared norm feeding parallel Mamba and attention branches, then a gated MLP."""

    def __init__(self, config: FalconH1TransformerConfig, submodules: FalconH1LayerSubmodules, layer_number: int,
                 pg_collection, pp_layer_offset: int = 0):
        super().__init__(config)
        self.tp_group = pg_collection.tp  # for the replica ids of the TP-replicated norm in sharded_state_dict
        self.layer_number = layer_number  # 1-based, global
        self.norm = build_module(submodules.norm, config=config, hidden_size=config.hidden_size,
                                 eps=config.layernorm_epsilon)
        self.mamba_mixer = build_module(
            submodules.mamba_mixer, config, d_model=config.hidden_size, d_conv=config.mamba_d_conv,
            rmsnorm=config.mamba_rms_norm, chunk_size=config.mamba_chunk_size, layer_number=layer_number,
            pg_collection=pg_collection, pp_layer_offset=pp_layer_offset)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number,
                                           pg_collection=pg_collection, pp_layer_offset=pp_layer_offset)
        self.mlp = build_module(submodules.mlp, config=config, tp_group=pg_collection.tp)

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None, **_):
        c = self.config
        normed = self.norm(hidden_states)
        mamba = _bias_added(self.mamba_mixer(_scale(normed, c.ssm_in_multiplier)))
        attn = _bias_added(self.self_attention(_scale(normed, c.attention_in_multiplier), attention_mask,
                                               rotary_pos_emb=rotary_pos_emb))
        hidden_states = (hidden_states + _scale(mamba, c.ssm_out_multiplier)
                         + _scale(attn, c.attention_out_multiplier))
        mlp = _bias_added(self.mlp(hidden_states))
        return hidden_states + _scale(mlp, c.mlp_multipliers[1])


class FalconH1Stack(MegatronModule):
    """The blocks of one pipeline stage (global layers [offset, offset + num_layers)) and, on the last stage,
    the final norm."""

    def __init__(self, config, layer_spec: ModuleSpec, norm_spec, num_layers: int, layer_offset: int,
                 post_process: bool, pg_collection):
        super().__init__(config)
        self.tp_group = pg_collection.tp
        self.layers = torch.nn.ModuleList([
            build_module(layer_spec, config=config, layer_number=layer_offset + i + 1, pg_collection=pg_collection,
                         pp_layer_offset=layer_offset)
            for i in range(num_layers)])
        if post_process:
            self.final_norm = build_module(norm_spec, config=config, hidden_size=config.hidden_size,
                                           eps=config.layernorm_epsilon)
        self.post_process = post_process
        self.input_tensor = None
        self.spans = self._layer_spans()

    def _layer_spans(self) -> list[tuple[int, int, bool]]:
        """The stage's layers as (first, last, recomputed) spans run one after the other, following megatron's
        full activation recompute (--recompute-granularity full): "uniform" checkpoints every span of
        recompute_num_layers layers (only a span's input is kept; its forward is redone in the backward),
        "block" checkpoints the first recompute_num_layers layers one by one and runs the rest normally. Without
        full recompute: one span, not checkpointed."""
        c, n = self.config, len(self.layers)
        if c.recompute_granularity != "full":
            return [(0, n, False)]
        k = c.recompute_num_layers
        if c.recompute_method == "uniform":
            return [(i, min(i + k, n), True) for i in range(0, n, k)]
        return [(i, i + 1, True) for i in range(min(k, n))] + ([(k, n, False)] if k < n else [])

    def _run_layers(self, first: int, last: int, hidden_states, attention_mask, rotary_pos_emb=None):
        for layer in self.layers[first:last]:
            hidden_states = layer(hidden_states, attention_mask, rotary_pos_emb=rotary_pos_emb)
        return hidden_states

    def set_input_tensor(self, input_tensor):
        """Pipeline stages after the first receive their input here instead of from the embedding."""
        self.input_tensor = input_tensor

    def forward(self, hidden_states, attention_mask, rotary_pos_emb=None):
        if hidden_states is None:
            hidden_states = self.input_tensor
        for first, last, recomputed in self.spans:
            run = partial(self._run_layers, first, last, rotary_pos_emb=rotary_pos_emb)
            if recomputed:
                hidden_states = tensor_parallel.checkpoint(run, self.config.distribute_saved_activations,
                                                           hidden_states, attention_mask)
            else:
                hidden_states = run(hidden_states, attention_mask)
        if self.post_process:
            hidden_states = self.final_norm(hidden_states)
        return hidden_states

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Checkpoint keys use global layer indices, so any PP split reads and writes the same checkpoint."""
        out = {}
        for local, layer in enumerate(self.layers):
            local_prefix, global_prefix = f"{prefix}layers.{local}.", f"{prefix}layers.{layer.layer_number - 1}."
            sd = layer.sharded_state_dict(local_prefix, (), metadata)
            replace_prefix_for_sharding(sd, local_prefix, global_prefix)
            out.update(sd)
        for name, module in self.named_children():
            if module is not self.layers:
                out.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                      tp_group=self.tp_group))
        return out


class FalconH1Model(HFLanguageModel, LanguageModule):
    """Embedding → FalconH1Stack → output layer, for one pipeline stage or virtual pipeline chunk (the embedding on
    the first, the output layer on the last; HFLanguageModel: vocabulary padding, pad row and provider as HF's model
    has them)."""

    def __init__(self, config: FalconH1TransformerConfig, layer_spec: ModuleSpec, norm_spec, vocab_size: int,
                 max_sequence_length: int, stage_layers: int, layer_offset: int, pre_process: bool = True,
                 post_process: bool = True, parallel_output: bool = True,
                 share_embeddings_and_output_weights: bool = False, rotary_base: float = 1e11,
                 unpadded_vocab_size: int | None = None, pg_collection=None, vp_stage: int | None = None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.vp_stage = vp_stage  # the virtual pipeline stage (None: none), before the tied embedding is set up
        self.pre_process, self.post_process = pre_process, post_process
        self.parallel_output = parallel_output
        self.share_embeddings_and_output_weights = share_embeddings_and_output_weights
        self.vocab_size = vocab_size  # padded for TP
        self.unpadded_vocab_size = unpadded_vocab_size or vocab_size
        self.model_type = None
        if pre_process:
            self.embedding = LanguageModelEmbedding(config=config, vocab_size=vocab_size,
                                                    max_sequence_length=max_sequence_length,
                                                    position_embedding_type="none", tp_group=self.pg_collection.tp)
        self.rotary_pos_emb = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                              rotary_base=rotary_base,
                                              use_cpu_initialization=config.use_cpu_initialization,
                                              cp_group=self.pg_collection.cp)
        self.decoder = FalconH1Stack(config, layer_spec, norm_spec, stage_layers, layer_offset, post_process,
                                     self.pg_collection)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=not parallel_output,
                skip_weight_param_allocation=pre_process and share_embeddings_and_output_weights,
                tp_group=self.pg_collection.tp)
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor):
        if isinstance(input_tensor, list):
            (input_tensor,) = input_tensor
        self.decoder.set_input_tensor(input_tensor)

    def forward(self, input_ids, position_ids, attention_mask, labels=None, decoder_input=None):
        """Returns logits [b, s, V/TP] (full V if parallel_output=False), or the per-token loss if labels given;
        on stages other than the last, the hidden states [s, b, h]."""
        c = self.config
        if decoder_input is None and self.pre_process:
            decoder_input = self._pad_lookup_gradient_masked(
                self.embedding(input_ids=input_ids, position_ids=position_ids), input_ids)
            decoder_input = _scale(decoder_input, c.embedding_multiplier)
        seq_len = (decoder_input if decoder_input is not None else self.decoder.input_tensor).shape[0]
        if c.sequence_parallel:  # the stage's input holds this rank's chunk of the sequence; RoPE spans all of it
            seq_len *= self.pg_collection.tp.size()
        hidden = self.decoder(decoder_input, attention_mask, rotary_pos_emb=self.rotary_pos_emb(seq_len))
        if not self.post_process:
            # sent to the next stage by megatron's p2p ops, which need a contiguous tensor; the branch sums take
            # the Mamba output's layout, a transposed [b, s, h] (contiguous only when b = 1)
            return hidden.contiguous()
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden, weight=weight)
        logits = _scale(logits, c.lm_head_multiplier)
        if labels is None:
            return logits.transpose(0, 1).contiguous()
        return self.compute_language_model_loss(labels, logits)
