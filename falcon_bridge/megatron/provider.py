"""FalconH1ModelProvider: a Falcon-H1 architecture + a TP/PP layout → megatron-core config, specs and model."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

from falcon_bridge.core.choices import MupMode
from falcon_bridge.core.config import FalconH1Arch, Multipliers
from falcon_bridge.core.parallel import MegatronLayout


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def have_causal_conv1d_cuda() -> bool:
    """mamba-ssm's fused training kernel needs causal-conv1d's compiled CUDA extension."""
    return importlib.util.find_spec("causal_conv1d_cuda") is not None


@dataclass
class FalconH1ModelProvider:
    arch: FalconH1Arch
    layout: MegatronLayout = field(default_factory=MegatronLayout)
    params_dtype: torch.dtype = torch.float32
    # Multipliers the model applies at run time: the architecture's own (µP preserved), or all 1.0 when the
    # checkpoint has them folded into its weights.
    multipliers: Multipliers | None = None
    seq_length: int = 4096
    use_te: bool | None = None  # None: use Transformer Engine modules when TE is importable
    use_mamba_mem_eff_path: bool | None = None  # None: fused kernel when it can run (CPU reference, or CUDA + conv)
    bitnet: bool = False  # BitNet b1.58 linears in attention, Mamba and MLP (not embedding, lm_head, norms, conv)
    # TransformerConfig fields a training loop sets beyond the architecture (sequence parallel, recompute, CUDA
    # graphs, dtype flags: `falcon-bridge train` passes those Megatron-LM's flags give and our model honours)
    run_settings: dict = field(default_factory=dict)

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
        on_gpu = torch.cuda.is_available()
        mem_eff = self.use_mamba_mem_eff_path
        if mem_eff is None:
            mem_eff = not on_gpu or have_causal_conv1d_cuda()
        architecture = dict(
            num_layers=a.num_layers,
            hidden_size=a.hidden_size,
            ffn_hidden_size=a.intermediate_size,
            num_attention_heads=a.num_heads,
            num_query_groups=a.num_kv_heads,
            kv_channels=a.head_dim,
            normalization="RMSNorm",
            layernorm_epsilon=a.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu if m.mlp[0] == 1.0 else partial(scaled_silu, gate_multiplier=m.mlp[0]),
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
            pipeline_dtype=self.params_dtype,
            params_dtype=self.params_dtype,
            bf16=self.params_dtype == torch.bfloat16,
            use_cpu_initialization=not on_gpu,  # on GPU megatron initializes on the device (RoPE needs it)
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

    def _backend(self):
        """(norm, column-parallel, row-parallel, norm+column-parallel, core attention) module classes."""
        use_te = have_transformer_engine() if self.use_te is None else self.use_te
        if self.bitnet:
            from falcon_bridge.megatron.bitnet import (
                BitNetColumnParallelLinear,
                BitNetNormColumnParallelLinear,
                BitNetRowParallelLinear,
            )
            from falcon_bridge.megatron.model import FalconH1RMSNorm, SDPAttention

            return FalconH1RMSNorm, BitNetColumnParallelLinear, BitNetRowParallelLinear, \
                BitNetNormColumnParallelLinear, SDPAttention
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

        from falcon_bridge.megatron.model import FalconH1RMSNorm, NormColumnParallelLinear, SDPAttention

        return FalconH1RMSNorm, ColumnParallelLinear, RowParallelLinear, NormColumnParallelLinear, SDPAttention

    # ---- the model -------------------------------------------------------------------------------------------
    def provide(self, pp_rank: int | None = None, parallel_output: bool = True, pg_collection=None):
        """Build this process's pipeline stage (needs megatron's model-parallel state initialized)."""
        from megatron.core import parallel_state
        from megatron.core.process_groups_config import ProcessGroupCollection

        from falcon_bridge.megatron.model import FalconH1Model

        a, lay = self.arch, self.layout
        if pp_rank is None:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        norm = self._backend()[0]
        model = FalconH1Model(
            self.transformer_config(), self.layer_spec(), norm, vocab_size=lay.padded_vocab(a),
            max_sequence_length=self.seq_length, stage_layers=lay.stage_layers(a.num_layers)[pp_rank],
            layer_offset=lay.stage_offset(a.num_layers, pp_rank), pre_process=pp_rank == 0,
            post_process=pp_rank == lay.pp - 1, parallel_output=parallel_output,
            share_embeddings_and_output_weights=a.tie_word_embeddings, rotary_base=a.rope_theta,
            unpadded_vocab_size=a.vocab_size, pg_collection=pg_collection)
        if self.bitnet:  # BitNet scales are per HF tensor: each linear learns which HF tensor its rows come from
            from falcon_bridge.core.mapping import Ctx
            from falcon_bridge.megatron.bitnet import assign_segments

            assign_segments(model, Ctx(a, lay), pg_collection.tp.rank())
        model.provider = self  # what the live bridge (converters/live.py) needs to map the weights back to HF
        return model
