"""A small byte-level BPE tokenizer built offline for random checkpoints, so tools that take text (verify --prompt)
work on them. Its special tokens sit at the config's pad/bos/eos ids; its vocabulary is at most 1024 tokens (always
within the model's)."""

from __future__ import annotations

from pathlib import Path

from falcon_bridge.core.config import Arch

MIN_VOCAB = 512  # byte-level BPE needs the 256 byte symbols plus merges and specials
CORPUS = (
    "Falcon-H1 is a parallel hybrid language model. Every block normalizes its input once, runs attention and a "
    "Mamba-2 mixer side by side, adds both outputs to the residual stream and then applies a gated MLP. "
    "The toolkit moves checkpoints between Hugging Face and Megatron Core and proves with logits that the move "
    "changed nothing: the same tokens, the same numbers, at any tensor or pipeline parallel size. "
    "Tensors stream one at a time; nothing holds the whole model in memory. 0123456789 + - * / = ( ) [ ] { } . , ; : "
)


def build_tokenizer(arch: Arch, out_dir: Path) -> list[str]:
    """Write tokenizer.json and its configs into out_dir; return the file names (none for tiny vocabularies)."""
    if arch.vocab_size < MIN_VOCAB:
        return []
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # the tokenizer's one special token of each kind sits at the first id where a config lists several
    ids = {kind: value[0] if isinstance(value, tuple) else value
           for kind, value in (("pad", arch.pad_token_id), ("bos", arch.bos_token_id), ("eos", arch.eos_token_id))}
    known = {v: k for k, v in ids.items() if v is not None}
    specials = [f"<|{known[i]}|>" if i in known else f"<|reserved_{i}|>" for i in range(max(known, default=-1) + 1)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(arch.vocab_size, 1024), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{f"{k}_token": f"<|{k}|>" for k in known.values()})
    before = set(p.name for p in out_dir.iterdir())
    fast.save_pretrained(str(out_dir))
    return sorted(set(p.name for p in out_dir.iterdir()) - before)
