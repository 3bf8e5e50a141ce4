"""What our megatron-core models of HF checkpoints share, whatever the family (Falcon-H1: model.py, Llama:
llama.py): norms in HF's rounding order, the norm fused into a column-parallel linear, SDPA core attention, and
`HFLanguageModel`, the behaviour on top of megatron's LanguageModule that makes a model train and checkpoint as
the HF model does (vocabulary padding kept out of the checkpoint and the loss, the pad row out of the lookup's
gradient, the provider that built it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from falcon_bridge.errors import BadInput

VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _padding_idx(pad_token_id, vocab_size: int) -> int | None:
    """The embedding row HF's nn.Embedding(vocab_size, hidden, padding_idx=pad_token_id) keeps out of the lookup
    gradient: None for none, a negative id counted from the end of the (unpadded) vocabulary, as nn.Embedding
    counts it. HF cannot build an embedding for several pad ids or one outside the vocabulary, nor can we."""
    if pad_token_id is None:
        return None
    if not isinstance(pad_token_id, int) or not -vocab_size <= pad_token_id < vocab_size:
        raise BadInput(f"pad_token_id {pad_token_id!r}: the embedding's padding_idx must be one id within the "
                         f"vocabulary of {vocab_size}")
    return pad_token_id % vocab_size


class SDPAttention(MegatronModule):
    """Core attention through torch's scaled_dot_product_attention: megatron's DotProductAttention without
    Transformer Engine materializes the [b, heads, s, s] scores and softmax (and keeps them for backward); SDPA
    picks flash kernels for bf16/fp16 on GPU (fp32 may take its math path, which does build the scores).
    Our models' attention is causal over the whole sequence (no KV cache, no padding); GQA maps query head i to KV
    head i // (heads / kv_heads), as megatron's query groups do. No parameters, no checkpoint keys."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__(config)
        assert config.context_parallel_size == 1, "SDPAttention has no context parallelism"
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale  # None: 1/sqrt(head_dim), as HF's Falcon-H1
        # megatron's sharded_state_dict asks a module without a tp_group for the global parallel state's
        self.tp_group = pg_collection.tp if pg_collection is not None else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """query [s, b, heads, d], key/value [s, b, kv_heads, d] → [s, b, heads · d]."""
        assert attention_bias is None and packed_seq_params is None, "SDPAttention: no bias, no packed sequences"
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        if causal:
            assert attention_mask is None and query.shape[0] == key.shape[0], \
                "SDPAttention: causal attention takes no mask and no KV cache"
        else:
            assert mask_type in (AttnMaskType.no_mask, AttnMaskType.padding, AttnMaskType.arbitrary), mask_type
        # megatron masks are True where attention is not allowed; SDPA's boolean masks are True where it is.
        mask = None if attention_mask is None else ~attention_mask
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.permute(2, 0, 1, 3).flatten(2)


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm (Falcon-H1's and Llama's), in its rounding order: normalize in fp32, cast back, then scale by
    the weight."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * weight


def _mark_sequence_parallel(weight: torch.nn.Parameter, config) -> None:
    """A norm weight replicated over TP ranks: under sequence parallelism each rank normalizes its own chunk of
    the sequence, so each holds part of the gradient; megatron's finalize_model_grads sums the gradients of
    parameters marked `sequence_parallel` over the TP group."""
    weight.sequence_parallel = config.sequence_parallel


class HFRMSNorm(torch.nn.Module):
    """The block and final norms, in HF's rounding (hf_rms_norm). megatron's WrappedTorchNorm allocates fp32
    weights whatever params_dtype is (so bf16 models ran torch's unfused mixed-dtype path); this one is in
    params_dtype, like HF's."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        _mark_sequence_parallel(self.weight, config)

    def forward(self, x):
        return hf_rms_norm(x, self.weight, self.eps)


class NormColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """RMSNorm fused in front of a ColumnParallelLinear, without Transformer Engine.

    Same parameter names as TE's TELayerNormColumnParallelLinear (`layer_norm_weight`, `weight`), so a pre-norm
    is stored as `mlp.linear_fc1.layer_norm_weight` (and Llama's input norm as
    `self_attention.linear_qkv.layer_norm_weight`) whichever backend built the model.
    """

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.eps = config.layernorm_epsilon
        self.layer_norm_weight = torch.nn.Parameter(
            torch.ones(input_size, dtype=config.params_dtype, device=self.weight.device))
        _mark_sequence_parallel(self.layer_norm_weight, config)

    def forward(self, input_, *args, **kwargs):
        return super().forward(hf_rms_norm(input_, self.layer_norm_weight, self.eps), *args, **kwargs)


class HFLanguageModel:
    """Mixed in before megatron's LanguageModule (or a subclass of it, e.g. GPTModel): the checkpoint's vocabulary
    tensors hold the real rows only, the loss's softmax leaves out the TP padding columns, the lookup gives the pad
    row no gradient (HF's padding_idx), and `provider` names what built the model. The model sets
    `unpadded_vocab_size` (and `vocab_size`, padded for TP, as LanguageModule's models do) and masks its embedding
    output with `_pad_lookup_gradient_masked`."""

    pad_token_id: int | None = None  # set from the architecture when the provider attaches itself

    @property
    def provider(self):
        """The provider that built this model (the live bridge reads its arch and layout); an
        AttributeError until one attached itself, so hasattr(model, "provider") tells who built the model."""
        if "_provider" not in self.__dict__:
            raise AttributeError("provider")
        return self.__dict__["_provider"]

    @provider.setter
    def provider(self, provider) -> None:
        # The provider attaches itself right after building the model; its architecture's pad_token_id is the
        # embedding's padding_idx in HF, so it takes effect here (see _pad_lookup_gradient_masked).
        self.__dict__["_provider"] = provider
        self.pad_token_id = _padding_idx(provider.arch.pad_token_id, self.unpadded_vocab_size)

    def _pad_lookup_gradient_masked(self, embeddings: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding output with no gradient flowing back from the positions holding pad_token_id, as HF's
        nn.Embedding(padding_idx=pad_token_id) does: its backward skips those indices, so the pad row gets no
        gradient from the lookup. Only the lookup's: with tied embeddings the output layer's use of the same
        weight still trains the pad row in HF, so a hook on the whole weight would be wrong there; masking the
        lookup's output gradient leaves that path alone. At TP > 1 the positions are masked on every rank, but
        only the rank whose vocabulary shard holds the pad row ever had a gradient for them (the others looked up
        zeros). Elementwise and without host syncs or data-dependent Python branches, so it is fine under CUDA
        graphs; it acts in autograd before megatron's DDP accumulates into main_grad. Without a pad_token_id:
        the embeddings as they are."""
        if self.pad_token_id is None:
            return embeddings
        pad = (input_ids == self.pad_token_id).transpose(0, 1)  # [s, b], as the embedding output [s, b, h]
        if self.config.sequence_parallel:  # the embedding output holds this TP rank's chunk of the sequence
            tp = self.pg_collection.tp
            pad = pad.chunk(tp.size(), dim=0)[tp.rank()]
        return torch.where(pad.unsqueeze(-1), embeddings.detach(), embeddings)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """megatron's (vocab-parallel) cross entropy, over the real vocabulary only (see _without_vocab_padding)."""
        return super().compute_language_model_loss(labels, self._without_vocab_padding(logits))

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """As LanguageModule's, but the vocabulary tensors hold the real vocabulary only: TP pads it to a multiple
        of 128·TP, and a padding stored in the file would tie the checkpoint to a TP. On load, megatron's
        allow_shape_mismatch reads the real rows of whatever is stored (padded or not) and zeroes the rest."""
        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.vocab_size == self.unpadded_vocab_size:
            return sd
        for name, value in sd.items():
            if isinstance(value, ShardedTensor) and value.key.removeprefix(prefix) in VOCAB_KEYS:
                sd[name] = self._real_vocab_rows(value)
        return sd

    def _real_vocab_rows(self, padded: ShardedTensor) -> ShardedTensorFactory:
        rows, rest = padded.local_shape[0], padded.local_shape[1:]
        first = padded.global_offset[0]
        real = max(0, min(rows, self.unpadded_vocab_size - first))

        def build(key, data, replica_id, flattened_range):
            if real == 0:  # padding only: a placeholder on the last real row, never written (not a main replica)
                copy = (1, *replica_id[1:]) if isinstance(replica_id, tuple) else 1
                return [ShardedTensor(key, data[:1], data.dtype, (1, *rest), (self.unpadded_vocab_size, *rest),
                                      (self.unpadded_vocab_size - 1, *(0 for _ in rest)), None, copy,
                                      allow_shape_mismatch=True)]
            return [ShardedTensor(key, data[:real], data.dtype, (real, *rest), (self.unpadded_vocab_size, *rest),
                                  (first, *(0 for _ in rest)), None, replica_id, allow_shape_mismatch=True)]

        def merge(loaded):
            out = torch.zeros(rows, *rest, dtype=padded.dtype, device=padded.data.device)
            if real:
                out[:real] = loaded[0]
            return out

        return ShardedTensorFactory(padded.key, padded.data, build, merge, padded.replica_id)

    def _without_vocab_padding(self, logits: torch.Tensor) -> torch.Tensor:
        """The loss's softmax over the real vocabulary only, as HF's: the columns megatron pads the vocabulary
        with for TP have zero logits, which would add to the softmax denominator (a loss unlike HF's) and be
        trained. Masked to -inf they weigh nothing and get no gradient. `logits` is this rank's vocab shard
        (megatron's vocab-parallel loss needs parallel_output at TP > 1)."""
        tp = self.pg_collection.tp
        assert self.parallel_output or tp.size() == 1, "a loss at TP > 1 needs parallel_output=True"
        local = logits.shape[-1]
        first = tp.rank() * local
        if first + local <= self.unpadded_vocab_size:
            return logits
        padded = torch.arange(first, first + local, device=logits.device) >= self.unpadded_vocab_size
        return logits.masked_fill(padded, float("-inf"))
