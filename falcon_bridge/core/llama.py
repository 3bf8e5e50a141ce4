"""The Llama family: `LlamaForCausalLM` (plain, or BitNet 1.58-bit as Falcon-E and Falcon3-1.58bit ship it) ↔
megatron-core's GPT layout. Its architecture and its map table, one module: a family plug-in.

Megatron names are those of megatron-core's GPTModel under the Transformer Engine spec (the input norm fused into
linear_qkv, the MLP norm into linear_fc1), as Megatron-LM and Megatron-Bridge's Llama bridge store them. The
transforms are Falcon-H1's (QKV interleave, gate/up fuse, vocabulary padding); there is no µP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from falcon_bridge.core import random_init as rnd
from falcon_bridge.core.config import Arch, refuse_unsupported
from falcon_bridge.core.mapping import COLUMN, COPY, GATE_UP, QKV_, ROW, VOCAB, R, Table, hf, register


@dataclass(frozen=True, kw_only=True)
class LlamaArch(Arch):
    """Everything that fixes tensor shapes and forward arithmetic of a Llama model; defaults are transformers'
    LlamaConfig's (absent config.json keys take them), in its declaration order."""

    family: ClassVar[str] = "llama"
    model_type: ClassVar[str] = "llama"
    hf_architecture: ClassVar[str] = "LlamaForCausalLM"
    hf_config_class: ClassVar[str] = "LlamaConfig"
    required_hf_keys: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float  # transformers 4 and 5 default it differently: a config must say
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | tuple[int, ...] | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | tuple[int, ...] | None = None

    @classmethod
    def from_hf_fields(cls, hf: dict[str, Any], kw: dict[str, Any], source: str) -> dict[str, Any]:
        refuse_unsupported(hf, source, {
            # transformers 4 splits each projection into pretraining_tp slices (the same product, other rounding)
            "pretraining_tp": (hf.get("pretraining_tp", 1), lambda v: type(v) is int and v == 1,
                               "projections computed in slices"),
        })
        return kw


def _vocab_rows(a: LlamaArch) -> tuple[int, int]:
    return (a.vocab_size, a.hidden_size)


# Megatron "<name>"  ↔  HF "<name>"
MODEL_RULES = (
    R("embedding.word_embeddings.weight", hf("model.embed_tokens.weight", _vocab_rows, init=rnd.embedding), VOCAB),
    R("decoder.final_layernorm.weight", hf("model.norm.weight", lambda a: (a.hidden_size,), init=rnd.norm), COPY),
    R("output_layer.weight", hf("lm_head.weight", _vocab_rows), VOCAB, when=lambda a: not a.tie_word_embeddings),
)

# Megatron "decoder.layers.{i}.<name>"  ↔  HF "model.layers.{i}.<name>"
LAYER_RULES = (
    R("self_attention.linear_qkv.layer_norm_weight", hf("input_layernorm.weight", lambda a: (a.hidden_size,),
                                                        init=rnd.norm), COPY),
    R("self_attention.linear_qkv.weight",
      (hf("self_attn.q_proj.weight", lambda a: (a.q_width, a.hidden_size)),
       hf("self_attn.k_proj.weight", lambda a: (a.kv_width, a.hidden_size)),
       hf("self_attn.v_proj.weight", lambda a: (a.kv_width, a.hidden_size))),
      QKV_, bitnet=COLUMN),
    R("self_attention.linear_qkv.bias",
      (hf("self_attn.q_proj.bias", lambda a: (a.q_width,)), hf("self_attn.k_proj.bias", lambda a: (a.kv_width,)),
       hf("self_attn.v_proj.bias", lambda a: (a.kv_width,))),
      QKV_, when=lambda a: a.attention_bias),
    R("self_attention.linear_proj.weight", hf("self_attn.o_proj.weight", lambda a: (a.hidden_size, a.q_width)),
      COPY, bitnet=ROW),
    R("self_attention.linear_proj.bias", hf("self_attn.o_proj.bias", lambda a: (a.hidden_size,)), COPY,
      when=lambda a: a.attention_bias),
    R("mlp.linear_fc1.layer_norm_weight", hf("post_attention_layernorm.weight", lambda a: (a.hidden_size,),
                                             init=rnd.norm), COPY),
    R("mlp.linear_fc1.weight",
      (hf("mlp.gate_proj.weight", lambda a: (a.intermediate_size, a.hidden_size)),
       hf("mlp.up_proj.weight", lambda a: (a.intermediate_size, a.hidden_size))),
      GATE_UP, bitnet=COLUMN),
    R("mlp.linear_fc1.bias",
      (hf("mlp.gate_proj.bias", lambda a: (a.intermediate_size,)),
       hf("mlp.up_proj.bias", lambda a: (a.intermediate_size,))),
      GATE_UP, when=lambda a: a.mlp_bias),
    R("mlp.linear_fc2.weight", hf("mlp.down_proj.weight", lambda a: (a.hidden_size, a.intermediate_size)), COPY,
      bitnet=ROW),
    R("mlp.linear_fc2.bias", hf("mlp.down_proj.bias", lambda a: (a.hidden_size,)), COPY,
      when=lambda a: a.mlp_bias),
)

# the parallel linears' `_extra_state` (under the TE spec the norms are fused into them: no module of their own)
LLAMA = register(Table(LlamaArch.family, MODEL_RULES, LAYER_RULES, ("output_layer",),
                       ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                        "mlp.linear_fc2")))
