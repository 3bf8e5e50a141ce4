"""verify: the HF model and our Megatron model on the same tokens; logits must agree within a tolerance."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from falcon_bridge.errors import BadInput

# max |Δlogit| / max |logit| accepted per compute dtype (fp32: the CPU suite's bar; bf16: a few ulps of the logits)
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


@dataclass
class LogitComparison:
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_logit: float
    relative: float  # max_abs_diff / max_abs_logit
    argmax_agreement: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float) -> LogitComparison:
    ref, cand = reference.float(), candidate.float()
    diff = (ref - cand).abs()
    scale = ref.abs().max().item()
    return LogitComparison(
        max_abs_diff=diff.max().item(), mean_abs_diff=diff.mean().item(), max_abs_logit=scale,
        relative=diff.max().item() / max(scale, 1e-30),
        argmax_agreement=(ref.argmax(-1) == cand.argmax(-1)).float().mean().item(), tolerance=tolerance)


def sample_tokens(vocab_size: int, batch: int = 2, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random ids (the same for both models and every run)."""
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def hf_logits(hf_dir: Path, tokens: torch.Tensor, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # the CPU fallback notices are expected here
    transformers.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    with torch.no_grad():
        return model(tokens.to(device)).logits.float().cpu()


def megatron_logits(megatron_dir: Path, tokens: torch.Tensor, tp: int, pp: int, dtype: torch.dtype) -> torch.Tensor:
    from falcon_bridge.megatron.runtime import launch, megatron_logits_worker, provider_from_checkpoint

    provider, _ = provider_from_checkpoint(megatron_dir, dtype, tp, pp)  # validates TP/PP before any spawn
    if torch.cuda.is_available() and tp * pp > torch.cuda.device_count():
        raise BadInput(f"--tp {tp} × --pp {pp} needs {tp * pp} GPUs, {torch.cuda.device_count()} visible")
    (logits,) = launch(megatron_logits_worker, tp * pp, [str(megatron_dir)], tp, pp, tokens,
                       str(provider.params_dtype).removeprefix("torch."))
    return logits


def verify(hf_dir: Path, megatron_dir: Path, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32,
           tolerance: float | None = None, seq_len: int = 32, batch: int = 2) -> LogitComparison:
    from falcon_bridge.formats.hf import HFCheckpoint

    with HFCheckpoint(Path(hf_dir)) as ckpt:
        vocab = ckpt.arch.vocab_size
    tokens = sample_tokens(vocab, batch, seq_len)
    reference = hf_logits(Path(hf_dir), tokens, dtype, "cuda" if torch.cuda.is_available() else "cpu")
    candidate = megatron_logits(Path(megatron_dir), tokens, tp, pp, dtype)
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE[str(dtype).removeprefix("torch.")]
    return compare_logits(reference, candidate, tolerance)
