"""verify: the HF model and our Megatron model on the same tokens, compared block by block.

Both sides record what each part adds to the residual stream — the embedding, every layer's branches as its
family has them (Falcon-H1: Mamba, attention and MLP, module outputs × their µP multipliers; Llama: attention and
MLP), the final norm — and the logits. The report points at the first place where the two models part ways.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from falcon_bridge.core.choices import VERIFY_DTYPE, VERIFY_SEQ_LEN, Device, MupMode, one_of
from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.llama import LlamaArch
from falcon_bridge.errors import BadInput, shown

# max |Δ| / max |reference| accepted per compute dtype (fp32: the CPU suite's bar; bf16: a few ulps of the logits)
DEFAULT_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}
# fp32 on cuda: Triton computes fp32 dot products in TF32 unless TRITON_F32_DEFAULT=ieee, and mamba-ssm's SSD
# kernels (which both models run there) do not ask otherwise, so the Mamba branch is only as exact as TF32's 10-bit
# mantissa: 2^-10. bench/ssd_precision.py measured the kernel alone at 5.8e-4–7.0e-4 of the fp32 reference
# (6e-6 with ieee).
TF32_TOLERANCE = 1e-3
MAX_VERIFY_TOKENS = 4096  # both models' logits (vocab × tokens, in fp64 for the comparison) stay in memory


def default_tolerance(dtype: torch.dtype, device: str) -> float:
    if dtype == torch.float32 and device == "cuda" and os.environ.get("TRITON_F32_DEFAULT", "tf32") != "ieee":
        return TF32_TOLERANCE
    return DEFAULT_TOLERANCE[str(dtype).removeprefix("torch.")]


@dataclass
class LogitComparison:
    max_abs_diff: float
    mean_abs_diff: float
    max_abs_logit: float
    relative: float  # max_abs_diff / max_abs_logit
    argmax_agreement: float
    tolerance: float
    cosine: float

    @property
    def passed(self) -> bool:
        return self.relative <= self.tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def difference(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """max and mean |Δ|, max |reference|, max |Δ| / max |reference| and cosine of two same-shaped tensors."""
    ref, cand = reference.double(), candidate.double()  # fp32 sums over millions of values drift past cosine 1
    diff = (ref - cand).abs()
    scale = ref.abs().max().item()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(), "max_abs_reference": scale,
            "relative": diff.max().item() / max(scale, 1e-30),
            "cosine": torch.nn.functional.cosine_similarity(ref.flatten(), cand.flatten(), dim=0).item()}


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor, tolerance: float) -> LogitComparison:
    d = difference(reference, candidate)
    return LogitComparison(
        max_abs_diff=d["max_abs_diff"], mean_abs_diff=d["mean_abs_diff"], max_abs_logit=d["max_abs_reference"],
        relative=d["relative"], cosine=d["cosine"], tolerance=tolerance,
        argmax_agreement=(reference.argmax(-1) == candidate.argmax(-1)).float().mean().item())


def hf_reference(arch) -> str:
    return f"transformers' {arch.hf_architecture} on the HF checkpoint"


@dataclass
class VerifyReport:
    tolerance: float
    logits: LogitComparison
    layers: list[dict]  # one row per compared component, in forward order
    reference: str  # what the Megatron model was compared with
    # µP-folded checkpoints: how far the fold's own rounding moves the logits from the unfolded HF model's
    # (not judged: folding into the storage dtype rounds each folded weight once, by design)
    fold_rounding: LogitComparison | None = None
    tp: int = 1  # the layout the Megatron model ran at
    pp: int = 1

    @property
    def first_divergence(self) -> dict | None:
        for row in self.layers:
            if row["relative"] > self.tolerance:
                return {"layer": row["layer"], "component": row["component"]}
        return None

    @property
    def passed(self) -> bool:
        return self.logits.passed and self.first_divergence is None

    def to_json(self) -> dict:
        return {"passed": self.passed, "tolerance": self.tolerance, "first_divergence": self.first_divergence,
                "argmax_agreement": self.logits.argmax_agreement, "logits": self.logits.to_json(),
                "reference": self.reference,
                "fold_rounding": self.fold_rounding.to_json() if self.fold_rounding else None,
                "tp": self.tp, "pp": self.pp, "layers": self.layers}


def sample_tokens(vocab_size: int, batch: int = 2, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    """Fixed pseudo-random ids (the same for both models and every run)."""
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def hf_model(hf_dir: Path, dtype: torch.dtype, device: str):
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()  # the CPU fallback notices are expected here
    transformers.logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()


def hf_logits(hf_dir: Path, tokens: torch.Tensor, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    model = hf_model(hf_dir, dtype, device)
    with torch.no_grad():
        return model(tokens.to(device)).logits.float().cpu()


def folded_hf_model(hf_dir: Path, arch, stored_dtype: torch.dtype, dtype: torch.dtype, device: str):
    """What a correct µP fold into `stored_dtype` computes: HF's weights times their multipliers, rounded once to
    the stored dtype exactly as import-hf rounds them, in a transformers model applying the folded multipliers."""
    from transformers import AutoModelForCausalLM

    from falcon_bridge.core import mup

    source = hf_model(hf_dir, torch.float32, "cpu")  # exact for bf16/fp16/fp32 checkpoints
    state = {name: mup.fold(arch, name, t, stored_dtype) for name, t in source.state_dict().items()}
    if arch.tie_word_embeddings:  # one matrix: it carries the embedding's fold (lm_head applies the ratio)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    del source
    model = AutoModelForCausalLM.from_config(mup.folded_arch(arch).to_hf_config())
    model.load_state_dict(state)
    return model.to(dtype=dtype, device=device).eval()


def _falcon_h1_parts(model) -> dict:
    c, inner = model.config, model.model
    parts = {"embedding": (inner.embed_tokens, c.embedding_multiplier)}
    for i, layer in enumerate(inner.layers):
        parts |= {f"{i}.mamba": (layer.mamba, c.ssm_out_multiplier),
                  f"{i}.attention": (layer.self_attn, c.attention_out_multiplier),
                  f"{i}.mlp": (layer.feed_forward, 1.0)}  # FalconH1MLP applies its down multiplier
    return parts | {"final_norm": (inner.final_layernorm, 1.0)}


def _llama_parts(model) -> dict:
    inner = model.model
    parts = {"embedding": (inner.embed_tokens, 1.0)}
    for i, layer in enumerate(inner.layers):
        parts |= {f"{i}.attention": (layer.self_attn, 1.0), f"{i}.mlp": (layer.mlp, 1.0)}
    return parts | {"final_norm": (inner.norm, 1.0)}


# Per family: what transformers' model adds to the residual stream, under the names (and in the forward order)
# megatron/forward.py's capture_branches records for ours
HF_PARTS = {FalconH1Arch.family: _falcon_h1_parts, LlamaArch.family: _llama_parts}


def hf_capture(model, arch, tokens: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    """The HF side of capture_branches (falcon_bridge.megatron.forward): same names, same quantities, in forward
    order (the branches first, then `logits`)."""
    from falcon_bridge.megatron.forward import record_scaled_outputs

    parts = HF_PARTS[arch.family](model)
    captured: dict[str, torch.Tensor] = {}
    record_scaled_outputs(parts, captured, megatron=False)
    with torch.no_grad():
        logits = model(tokens.to(device)).logits.float().cpu()
    return {name: captured[name] for name in parts} | {"logits": logits}


def compare_branches(reference: dict, candidate: dict, tolerance: float) -> list[dict]:
    """One row per part `reference` recorded (hf_capture's order: forward order), `logits` aside."""
    rows = []
    for name in reference:
        if name == "logits":
            continue
        layer, _, component = name.rpartition(".")
        d = difference(reference[name], candidate[name])
        rows.append({"layer": int(layer) if layer else None, "component": component,
                     "max_abs_diff": d["max_abs_diff"], "mean_abs_diff": d["mean_abs_diff"], "cosine": d["cosine"],
                     "relative": d["relative"]})
    return rows


def read_tokens(path: Path, vocab_size: int) -> torch.Tensor:
    """Token ids from a file: a JSON list (or list of equally long lists), or whitespace-separated integers."""
    import json

    from falcon_bridge.formats.untrusted import read_text

    text = read_text(Path(path), 8 * MAX_VERIFY_TOKENS + 4096, "token file")
    problem = BadInput(f"{path}: expected token ids (a JSON list of integers, a list of equally long lists of them, "
                       "or whitespace-separated integers)")
    try:
        ids = json.loads(text) if text.lstrip().startswith("[") else [int(t) for t in text.split()]
    except (ValueError, RecursionError):  # RecursionError: lists nested deeper than the parser's stack
        raise problem from None
    rows = ids if ids and all(isinstance(r, list) for r in ids) else [ids]
    if not rows or any(not r or len(r) != len(rows[0]) or any(type(i) is not int for i in r) for r in rows):
        raise problem
    if len(rows) * len(rows[0]) > MAX_VERIFY_TOKENS:
        raise BadInput(f"{path}: {len(rows) * len(rows[0]):,} token ids; verify compares at most "
                       f"{MAX_VERIFY_TOKENS:,} (the logits of both models are held in memory)")
    outside = next((i for r in rows for i in r if not 0 <= i < vocab_size), None)
    if outside is not None:
        raise BadInput(f"{path}: token id {shown(outside)} is outside the vocabulary [0, {vocab_size})")
    return torch.tensor(rows, dtype=torch.long)


def choose_tokens(hf_dir: Path, vocab_size: int, tokens_file: Path | None, prompt: str | None,
                  seq_len: int) -> torch.Tensor:
    if tokens_file is not None:
        return read_tokens(tokens_file, vocab_size)
    if prompt is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        except Exception:  # noqa: BLE001 - any tokenizer failure means the same thing to the user
            raise BadInput(f"{hf_dir}: --prompt needs a tokenizer in the checkpoint; pass --tokens instead") from None
        tokens = tokenizer(prompt, return_tensors="pt").input_ids
        if tokens.numel() > MAX_VERIFY_TOKENS:
            raise BadInput(f"--prompt: {tokens.numel():,} tokens; verify compares at most {MAX_VERIFY_TOKENS:,}")
        if tokens.numel() == 0:
            raise BadInput("--prompt: the tokenizer gives no token ids for it")
        if tokens.min() < 0 or tokens.max() >= vocab_size:
            raise BadInput(f"--prompt: the tokenizer gives ids outside the vocabulary [0, {vocab_size})")
        return tokens
    return sample_tokens(vocab_size, 2, seq_len)


@contextmanager
def gpus_hidden(hide: bool):
    """With --device cpu on a GPU machine, the spawned Megatron processes must not see the GPUs."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hide:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if hide:
            if saved is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved


@dataclass(frozen=True)
class VerifyOptions:
    """hf_dir vs megatron_dir, the Megatron model run as tp × pp processes, both computing in `dtype`. tolerance:
    max |Δ| / max |reference| accepted (default: default_tolerance). device: default cuda when a GPU is visible.
    The tokens: `tokens_file`, else `prompt` (tokenized with the HF checkpoint's tokenizer), else two rows of
    `seq_len` fixed random ids. tp/pp: default, the layout recorded at import (or reshard; 1 for checkpoints
    without our run config)."""

    hf_dir: Path
    megatron_dir: Path
    tp: int | None = None
    pp: int | None = None
    dtype: torch.dtype = VERIFY_DTYPE.torch
    tolerance: float | None = None
    seq_len: int = VERIFY_SEQ_LEN
    device: Device | None = None
    tokens_file: Path | None = None
    prompt: str | None = None


def verify(options: VerifyOptions) -> VerifyReport:
    from falcon_bridge.converters.megatron_source import open_megatron_checkpoint
    from falcon_bridge.formats.hf import HFCheckpoint
    from falcon_bridge.megatron.checkpoint import provider_from_checkpoint
    from falcon_bridge.megatron.distributed import launch
    from falcon_bridge.megatron.forward import megatron_logits_worker

    hf_dir, megatron_dir, tp, pp, dtype = options.hf_dir, options.megatron_dir, options.tp, options.pp, options.dtype
    tolerance, seq_len, device = options.tolerance, options.seq_len, options.device
    source = open_megatron_checkpoint(Path(megatron_dir))  # every file checked before the HF forward and the spawn
    recorded = (source.run_config or {}).get("layout", {})
    tp = recorded.get("tp", 1) if tp is None else tp
    pp = recorded.get("pp", 1) if pp is None else pp
    if device is not None and device not in tuple(Device):
        raise BadInput(f"--device {device}: expected {one_of(Device)}")
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if value < 1:
            raise BadInput(f"{flag} {value}: expected a positive integer")
    if not 1 <= seq_len <= MAX_VERIFY_TOKENS // 2:  # two rows of fixed random ids
        raise BadInput(f"--seq-len {seq_len}: expected 1 to {MAX_VERIFY_TOKENS // 2}")
    if tolerance is not None and not (0 < tolerance < float("inf")):
        raise BadInput(f"--tolerance {tolerance}: expected a positive number")
    arch = HFCheckpoint(Path(hf_dir)).arch
    device = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: no GPU is visible")
    provider, _ = provider_from_checkpoint(Path(megatron_dir), dtype, tp, pp)  # validates TP/PP before any spawn
    if provider.arch.to_hf() != arch.to_hf():
        raise BadInput(f"{megatron_dir}: its architecture differs from {hf_dir}/config.json")
    if device == "cuda" and tp * pp > torch.cuda.device_count():
        raise BadInput(f"--tp {tp} × --pp {pp} needs {tp * pp} GPUs, {torch.cuda.device_count()} visible")
    tokens = choose_tokens(Path(hf_dir), arch.vocab_size, options.tokens_file, options.prompt, seq_len)
    if tolerance is None:
        tolerance = default_tolerance(dtype, device)
    reference_name, fold_rounding = hf_reference(arch), None
    if source.mup_mode == MupMode.FOLD:
        # Folding rounds each folded weight once to the stored dtype (in bf16 that moves logits by ~1e-3, more
        # than the fp32 bar): the conversion is judged against the same fold and rounding done on HF's weights,
        # at the usual bar, and the rounding's own effect on the logits is reported beside it.
        stored = getattr(torch, source.run_config["dtype"])
        unfolded_logits = hf_logits(Path(hf_dir), tokens, dtype, device)
        model = folded_hf_model(Path(hf_dir), arch, stored, dtype, device)
        reference_name = (f"HF's weights µP-folded into {source.run_config['dtype']} as import-hf folds them (one "
                          f"rounding each), in transformers' {arch.hf_architecture}")
    else:
        model = hf_model(Path(hf_dir), dtype, device)
    reference = hf_capture(model, arch, tokens, device)
    del model
    if source.mup_mode == MupMode.FOLD:
        fold_rounding = compare_logits(unfolded_logits, reference["logits"], tolerance)
    with gpus_hidden(device == "cpu" and torch.cuda.is_available()):
        (candidate,) = launch(megatron_logits_worker, tp * pp, [str(megatron_dir)], tp, pp, tokens,
                              str(dtype).removeprefix("torch."), True)
    return VerifyReport(tolerance, compare_logits(reference["logits"], candidate["logits"], tolerance),
                        compare_branches(reference, candidate, tolerance), reference_name,
                        fold_rounding, tp, pp)
