"""Model providers: an architecture + a TP/PP layout → megatron-core config, specs and model, one class per family
(`FalconH1ModelProvider`, `LlamaModelProvider`; `provider_class(arch)` picks it) over what they share
(`ModelProvider`: fields, the architecture's common TransformerConfig fields, the module backend, the finish)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from functools import partial

import torch
import torch.nn.functional as F

from falcon_bridge.core.choices import MupMode
from falcon_bridge.core.config import Arch, FalconH1Arch, Multipliers
from falcon_bridge.core.llama import LlamaArch
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def have_causal_conv1d_cuda() -> bool:
    """mamba-ssm's fused training kernel needs causal-conv1d's compiled CUDA extension."""
    return importlib.util.find_spec("causal_conv1d_cuda") is not None


def _groups(pg_collection):
    """(process groups, TP group, PP group): megatron's global parallel state's when pg_collection is None."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()
    return pg_collection, pg_collection.tp, pg_collection.pp


@dataclass(frozen=True)
class Stage:
    """One model chunk to build: its process groups, pipeline rank, virtual stage (None without virtual stages, as
    megatron-core takes it), its layers and the global index of the first, and whether it holds the embedding
    (pre_process) and the output layer (post_process)."""

    pg_collection: object
    pp_rank: int
    vp_stage: int | None
    layers: int
    layer_offset: int
    pre_process: bool
    post_process: bool


@dataclass
class ModelProvider:
    """What every family's provider holds and does; a family's provider adds `transformer_config`, `provide` and
    `mup_mode`."""

    arch: Arch
    layout: MegatronLayout = field(default_factory=MegatronLayout)
    params_dtype: torch.dtype = torch.float32
    # Multipliers the model applies at run time (µP families): the architecture's own (µP preserved), or all 1.0
    # when the checkpoint has them folded into its weights. None: the architecture's own, or a family without µP.
    multipliers: Multipliers | None = None
    seq_length: int = 4096
    use_te: bool | None = None  # None: use Transformer Engine modules when TE is importable
    bitnet: bool = False  # BitNet b1.58 linears in attention, Mamba and MLP (not embedding, lm_head, norms, conv)
    # TransformerConfig fields a training loop sets beyond the architecture (sequence parallel, recompute, CUDA
    # graphs, dtype flags: `falcon-bridge train` passes those Megatron-LM's flags give and our model honours)
    run_settings: dict = field(default_factory=dict)

    def _architecture_config(self) -> dict:
        """The TransformerConfig fields every family's decoder takes from the architecture and the layout."""
        a, lay = self.arch, self.layout
        return dict(
            num_layers=a.num_layers,
            hidden_size=a.hidden_size,
            ffn_hidden_size=a.intermediate_size,
            num_attention_heads=a.num_heads,
            num_query_groups=a.num_kv_heads,
            kv_channels=a.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=a.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=a.mlp_bias,
            add_qkv_bias=a.attention_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_dropout_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,  # this and the softmax setting below matter to TE's attention only
            apply_rope_fusion=False,
            gradient_accumulation_fusion=False,
            attention_softmax_in_fp32=True,
            persist_layer_norm=False,
            tensor_model_parallel_size=lay.tp,
            pipeline_model_parallel_size=lay.pp,
            virtual_pipeline_model_parallel_size=lay.vpp if lay.vpp > 1 else None,
            pipeline_dtype=self.params_dtype,
            params_dtype=self.params_dtype,
            bf16=self.params_dtype == torch.bfloat16,
            use_cpu_initialization=not torch.cuda.is_available(),  # on GPU megatron initializes on the device (RoPE
            # needs it)
        )

    def _backend(self):
        """(norm, column-parallel, row-parallel, norm+column-parallel, core attention) module classes."""
        use_te = have_transformer_engine() if self.use_te is None else self.use_te
        if self.bitnet:
            from falcon_bridge.megatron.bitnet import (
                BitNetColumnParallelLinear,
                BitNetNormColumnParallelLinear,
                BitNetRowParallelLinear,
            )
            from falcon_bridge.megatron.language_model import HFRMSNorm, SDPAttention

            return HFRMSNorm, BitNetColumnParallelLinear, BitNetRowParallelLinear, BitNetNormColumnParallelLinear, \
                SDPAttention
        if use_te:
            from megatron.core.extensions.transformer_engine import (
                TEColumnParallelLinear,
                TEDotProductAttention,
                TELayerNormColumnParallelLinear,
                TENorm,
                TERowParallelLinear,
            )

            return TENorm, TEColumnParallelLinear, TERowParallelLinear, TELayerNormColumnParallelLinear, \
                TEDotProductAttention
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        from falcon_bridge.megatron.language_model import HFRMSNorm, NormColumnParallelLinear, SDPAttention

        return HFRMSNorm, ColumnParallelLinear, RowParallelLinear, NormColumnParallelLinear, SDPAttention

    def lay_out_over(self, pg_collection=None, vpp: int = 1) -> ModelProvider:
        """Set the layout to the TP and PP sizes of `pg_collection`'s groups (megatron's global parallel state's
        when None), with `vpp` virtual pipeline stages per pipeline rank; an uneven PP split (pp_layers) is kept
        when the PP size stays. Returns the provider."""
        tp, pp = (g.size() for g in _groups(pg_collection)[1:3])
        pp_layers = self.layout.pp_layers if pp == self.layout.pp else None
        self.layout = replace(self.layout, tp=tp, pp=pp, vpp=vpp, pp_layers=pp_layers).validate(self.arch)
        return self

    def _stage(self, pp_rank: int | None, vp_stage: int | None, pg_collection) -> Stage:
        """The model chunk `provide` builds: pipeline rank (pg_collection's PP rank when None) and virtual stage of
        the layout, over process groups that match it."""
        pg_collection, tp, pp = _groups(pg_collection)
        lay = self.layout
        if (tp.size(), pp.size()) != (lay.tp, lay.pp):
            raise BadInput(f"the provider is laid out for TP {lay.tp}, PP {lay.pp} but the process groups are TP "
                           f"{tp.size()}, PP {pp.size()}: call provider.lay_out_over(pg_collection) first")
        pp_rank = pp.rank() if pp_rank is None else pp_rank
        if vp_stage is None and lay.vpp > 1:
            raise BadInput(f"the layout has {lay.vpp} virtual pipeline stages: provide() builds one chunk per call, "
                           "pass vp_stage")
        vp_stage = vp_stage or 0
        if not (0 <= pp_rank < lay.pp and 0 <= vp_stage < lay.vpp):
            raise BadInput(f"pp_rank {pp_rank}, vp_stage {vp_stage}: outside the layout (PP {lay.pp}, "
                           f"{lay.vpp} virtual stages)")
        layers, offset = lay.chunk(self.arch.num_layers, pp_rank, vp_stage)
        return Stage(pg_collection, pp_rank, vp_stage if lay.vpp > 1 else None, layers, offset,
                     pre_process=pp_rank == 0 and vp_stage == 0,
                     post_process=pp_rank == lay.pp - 1 and vp_stage == lay.vpp - 1)

    def _finish(self, model, pg_collection):
        """The built stage, told what it needs of the provider: BitNet's per-HF-tensor row segments (each linear
        learns which HF tensor its rows come from, for its scales) and the provider itself."""
        if self.bitnet:
            from falcon_bridge.core.mapping import Ctx
            from falcon_bridge.megatron.bitnet import assign_segments

            assign_segments(model, Ctx(self.arch, self.layout), pg_collection.tp.rank())
        model.provider = self  # what the live bridge (converters/live.py) needs to map the weights back to HF
        return model


@dataclass
class FalconH1ModelProvider(ModelProvider):
    """Falcon-H1 as our FalconH1Model (megatron/model.py): parallel Mamba and attention branches per block, µP."""

    arch: FalconH1Arch
    use_mamba_mem_eff_path: bool | None = None  # None: fused kernel when it can run (CPU reference, or CUDA + conv)

    @property
    def mup_mode(self) -> MupMode:
        """fold: the weights carry the multipliers (the model applies the folded ones); preserve: the model applies
        the architecture's own."""
        return MupMode.PRESERVE if self.multipliers in (None, self.arch.multipliers) else MupMode.FOLD

    # ---- megatron-core config -------------------------------------------------------------------------------
    def transformer_config(self):
        from falcon_bridge.megatron.model import FalconH1TransformerConfig, scaled_silu

        a, lay = self.arch, self.layout
        m = self.multipliers if self.multipliers is not None else a.multipliers
        mem_eff = self.use_mamba_mem_eff_path
        if mem_eff is None:
            mem_eff = not torch.cuda.is_available() or have_causal_conv1d_cuda()
        architecture = self._architecture_config() | dict(
            activation_func=F.silu if m.mlp[0] == 1.0 else partial(scaled_silu, gate_multiplier=m.mlp[0]),
            mamba_state_dim=a.mamba_d_state,
            mamba_head_dim=a.mamba_d_head,
            mamba_num_heads=a.mamba_n_heads,
            mamba_num_groups=lay.mamba_groups(a),
            use_mamba_mem_eff_path=mem_eff,
            mamba_d_conv=a.mamba_d_conv,
            mamba_chunk_size=a.mamba_chunk_size,
            mamba_rms_norm=a.mamba_rms_norm,
            mamba_norm_before_gate=a.mamba_norm_before_gate,
            mamba_hf_num_groups=a.mamba_n_groups,
            embedding_multiplier=m.embedding,
            lm_head_multiplier=m.lm_head,
            attention_in_multiplier=m.attention_in,
            attention_out_multiplier=m.attention_out,
            key_multiplier=m.key,
            ssm_in_multiplier=m.ssm_in,
            ssm_out_multiplier=m.ssm_out,
            ssm_multipliers=tuple(m.ssm),
            mlp_multipliers=tuple(m.mlp),
        )
        return FalconH1TransformerConfig(**(architecture | self.run_settings))

    def layer_spec(self):
        from megatron.core.ssm.mamba_mixer import MambaMixerSubmodules
        from megatron.core.transformer.attention import SelfAttentionSubmodules
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.mlp import MLP, MLPSubmodules
        from megatron.core.transformer.spec_utils import ModuleSpec

        from falcon_bridge.megatron.model import (
            FalconH1Layer,
            FalconH1LayerSubmodules,
            FalconH1MambaMixer,
            FalconH1SelfAttention,
            with_bias,
        )

        a = self.arch
        norm, column, row, norm_column, core_attention = self._backend()
        return ModuleSpec(module=FalconH1Layer, submodules=FalconH1LayerSubmodules(
            norm=norm,
            mamba_mixer=ModuleSpec(module=FalconH1MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=with_bias(column) if a.mamba_proj_bias else column,
                out_proj=with_bias(row) if a.projectors_bias else row)),
            self_attention=ModuleSpec(module=FalconH1SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(linear_qkv=column,
                                                                         core_attention=core_attention,
                                                                         linear_proj=row)),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=norm_column, linear_fc2=row)),
        ))

    # ---- the model -------------------------------------------------------------------------------------------
    def provide(self, pp_rank: int | None = None, vp_stage: int | None = None, parallel_output: bool = True,
                pg_collection=None):
        """Build the model chunk of pipeline rank `pp_rank` (this process's when None) and virtual stage
        `vp_stage` (one call per chunk when the layout has virtual stages) over `pg_collection`'s process groups
        (megatron's global parallel state's when None)."""
        from falcon_bridge.megatron.model import FalconH1Model

        a, lay = self.arch, self.layout
        stage = self._stage(pp_rank, vp_stage, pg_collection)
        norm = self._backend()[0]
        model = FalconH1Model(
            self.transformer_config(), self.layer_spec(), norm, vocab_size=lay.padded_vocab(a),
            max_sequence_length=self.seq_length, stage_layers=stage.layers, layer_offset=stage.layer_offset,
            pre_process=stage.pre_process, post_process=stage.post_process, parallel_output=parallel_output,
            share_embeddings_and_output_weights=a.tie_word_embeddings, rotary_base=a.rope_theta,
            unpadded_vocab_size=a.vocab_size, pg_collection=stage.pg_collection, vp_stage=stage.vp_stage)
        return self._finish(model, stage.pg_collection)


@dataclass
class LlamaModelProvider(ModelProvider):
    """Llama as megatron-core's GPTModel (megatron/llama.py): TransformerLayers of SelfAttention and MLP, the
    input norm fused into linear_qkv and the MLP norm into linear_fc1 (checkpoint keys as core/llama.py maps them)."""

    arch: LlamaArch

    @property
    def mup_mode(self) -> MupMode:
        """Llama has no µP multipliers: nothing is folded."""
        return MupMode.PRESERVE

    def transformer_config(self, pp_rank: int = 0):
        """The config of pipeline rank `pp_rank`'s chunks."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        from falcon_bridge.megatron.llama import RankPipelineLayout

        architecture = self._architecture_config()
        lay = self.layout
        if lay.pp > 1:
            # megatron's TransformerBlock numbers its chunk's layers itself: the layout's split (even or
            # --pp-layers, each stage's layers split over its virtual stages), in its terms, chunk by chunk in its
            # interleaved order
            chunks = [["decoder"] * lay.chunk(self.arch.num_layers, r, v)[0] for v in range(lay.vpp)
                      for r in range(lay.pp)]
            chunks[0].insert(0, "embedding")
            chunks[-1].append("loss")
            architecture["pipeline_model_parallel_layout"] = RankPipelineLayout(chunks, lay.pp, pp_rank)
        return TransformerConfig(**(architecture | self.run_settings))

    def layer_spec(self):
        from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
        from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.transformer.mlp import MLP, MLPSubmodules
        from megatron.core.transformer.spec_utils import ModuleSpec
        from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

        _, column, row, norm_column, core_attention = self._backend()
        return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(linear_qkv=norm_column,
                                                                         core_attention=core_attention,
                                                                         linear_proj=row)),
            self_attn_bda=get_bias_dropout_add,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=norm_column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ))

    def provide(self, pp_rank: int | None = None, vp_stage: int | None = None, parallel_output: bool = True,
                pg_collection=None):
        """Build the model chunk of pipeline rank `pp_rank` (this process's when None) and virtual stage
        `vp_stage` (one call per chunk when the layout has virtual stages) over `pg_collection`'s process groups
        (megatron's global parallel state's when None)."""
        from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

        from falcon_bridge.megatron.llama import LlamaModel

        a, lay = self.arch, self.layout
        stage = self._stage(pp_rank, vp_stage, pg_collection)
        # TransformerBlock asks its PP group for the rank whose layers it numbers
        if stage.pp_rank != stage.pg_collection.pp.rank():
            raise BadInput(f"pp_rank {stage.pp_rank}: a Llama chunk is built on its own pipeline rank "
                           f"({stage.pg_collection.pp.rank()})")
        block = TransformerBlockSubmodules(layer_specs=[self.layer_spec()] * stage.layers,
                                           layer_norm=self._backend()[0])
        model = LlamaModel(
            self.transformer_config(stage.pp_rank), block, vocab_size=lay.padded_vocab(a),
            max_sequence_length=self.seq_length, pre_process=stage.pre_process, post_process=stage.post_process,
            parallel_output=parallel_output, share_embeddings_and_output_weights=a.tie_word_embeddings,
            position_embedding_type="rope", rotary_base=a.rope_theta, pg_collection=stage.pg_collection,
            vp_stage=stage.vp_stage, unpadded_vocab_size=a.vocab_size)
        return self._finish(model, stage.pg_collection)


PROVIDERS: dict[str, type[ModelProvider]] = {FalconH1Arch.family: FalconH1ModelProvider,
                                             LlamaArch.family: LlamaModelProvider}


def provider_class(arch: Arch) -> type[ModelProvider]:
    """The provider of the architecture's family."""
    return PROVIDERS[arch.family]
