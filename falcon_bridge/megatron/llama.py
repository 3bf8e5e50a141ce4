"""Llama (HF's LlamaForCausalLM, plain or BitNet) in megatron-core: its own GPTModel, TransformerBlock and
TransformerLayer, built by `LlamaModelProvider` (provider.py) from a layer spec whose norms are fused into
linear_qkv and linear_fc1, as Megatron-LM's Transformer Engine spec stores them (core/llama.py's map).

    x = embedding(ids)
    per layer:  x = x + o_proj(attention(RoPE(qkv(norm(x)))))
                x = x + down(silu(gate(norm(x))) · up(norm(x)))
    logits = output_layer(final_norm(x))

What GPTModel does not do as HF does comes from HFLanguageModel (language_model.py).
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.enums import LayerType
from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

from falcon_bridge.megatron.language_model import HFLanguageModel


class RankPipelineLayout(PipelineParallelLayerLayout):
    """megatron-core's pipeline layout (chunks of layers in its interleaved order), answering for pipeline rank
    `pp_rank` when asked without one. megatron-core asks its layout for a chunk's layer count and offset without
    the rank, which it then reads off the global parallel state, and takes vp_stage as 0 unless that state has
    virtual stages: a model built over its own process groups (a pg_collection) would number its layers as some
    other rank's."""

    def __init__(self, layout: list, pipeline_model_parallel_size: int, pp_rank: int):
        super().__init__(layout, pipeline_model_parallel_size)
        self.pp_rank = pp_rank

    def get_num_layers_to_build(self, layer_type=LayerType.decoder, vp_stage=None, pp_rank=None):
        return self.layout[self.pp_rank if pp_rank is None else pp_rank][vp_stage or 0].count(layer_type)

    def get_layer_offset(self, layer_type=LayerType.decoder, vp_stage=None, pp_rank=None):
        """The layers of `layer_type` in every chunk before (pp_rank, vp_stage) in the interleaved order."""
        pp_rank, vp_stage = self.pp_rank if pp_rank is None else pp_rank, vp_stage or 0
        return sum(self.layout[r][v].count(layer_type) for v in range(vp_stage + 1)
                   for r in range(self.pipeline_model_parallel_size if v < vp_stage else pp_rank))


class LlamaModel(HFLanguageModel, GPTModel):
    """GPTModel for one pipeline stage, with HF's vocabulary padding, pad row and provider (HFLanguageModel).
    The decoder (TransformerBlock) names its layers by global index in checkpoints, so any PP split reads and
    writes the same checkpoint."""

    def __init__(self, *args, unpadded_vocab_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.unpadded_vocab_size = unpadded_vocab_size

    def _preprocess(self, input_ids, position_ids, decoder_input=None, **kwargs):
        """GPTModel's, with the embedding lookup's gradient kept away from pad positions (HF's padding_idx)."""
        looked_up = decoder_input is None and self.pre_process
        out = super()._preprocess(input_ids, position_ids, decoder_input, **kwargs)
        if not looked_up:
            return out
        return self._pad_lookup_gradient_masked(out[0], input_ids), *out[1:]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Every layer's tensors under its own global index (`decoder.layers.{i}.…`, as core/llama.py's map and
        Megatron-Bridge name them), not stacked along a layer axis (megatron's default for uniform layers)."""
        return super().sharded_state_dict(prefix, sharded_offsets, {**(metadata or {}), "non_homogeneous_layers": True})
