"""Training-step throughput on one GPU: our Megatron Falcon-H1 model against transformers' FalconH1ForCausalLM.

Both sides load the same checkpoint (a card's shapes, random bf16 weights: create-random, then import-hf at TP=1),
compute in bf16 and run forward + backward of the mean next-token loss on the same micro-batch (no optimizer step:
the optimizer is not part of either model). W warm-up steps, then N timed steps (synchronized wall clock), then one
step under torch.profiler whose CUDA kernels are grouped by kind, so the table says which kernels each side used.

Variants, each in its own process:
  hf-torch     transformers with mamba-ssm and causal-conv1d hidden: its PyTorch fallbacks (what a plain
               `pip install transformers` runs), SDPA attention
  hf-kernels   transformers with mamba-ssm + causal-conv1d importable: its fused Mamba-2 training kernel
               (only when causal_conv1d_cuda is built: bench/build_causal_conv1d.py)
  megatron     our model, local spec: SDPA core attention, mamba-ssm's fused kernel when causal_conv1d_cuda is
               built (use_mamba_mem_eff_path), else its Triton scan with F.conv1d
  megatron-unfused   our model with use_mamba_mem_eff_path=False (only when the fused path is available)
  megatron-folded    our model on an `import-hf --mup fold` checkpoint: no multiplier is applied at run time

    python bench/gpu_throughput.py [--cards falcon-h1-0.5b,falcon-h1-1.5b] [--seq 4096] [--batch 1] [--steps 10]
                                   [--variants a,b] [--workdir DIR] [--json FILE]
Runs on CPU too (for a smoke test on a tiny card); the numbers mean something only on a GPU.
"""

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import torch

from falcon_bridge.converters.create_random import create_random
from falcon_bridge.converters.import_hf import import_hf
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats.cards import load_card
from falcon_bridge.megatron.runtime import launch

KERNEL_KINDS = [  # (kind, pattern on the CUDA kernel name), first match wins (flash kernels name cutlass types)
    ("attention", r"flash|fmha|attention|sdpa"),
    ("conv1d", r"conv1d|depthwise|cudnn"),
    ("mamba scan (Triton)", r"_chunk|state_passing|ssd"),
    ("norm", r"norm|rms"),
    ("loss/softmax", r"softmax|cross_entropy|nll|logsumexp"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|sm90_"),
    ("copy/cast", r"direct_copy|copy_kernel|memcpy|memset|CatArray|(?<!no)cast"),  # not `gpu_kernel_impl_nocast`
]


def kernel_shares(prof) -> list[tuple[str, float]]:
    """Every CUDA kernel of the profiled step with its share of the kernel time (%), largest first."""
    events = [(e.key, getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0))
              for e in prof.key_averages()]
    total = sum(t for _, t in events) or 1.0
    return [(k, round(100 * t / total, 2)) for k, t in sorted(events, key=lambda kv: -kv[1]) if t > 0]


def kernel_breakdown(kernels: list[tuple[str, float]]) -> dict[str, float]:
    """The shares of kernel_shares summed per kind (KERNEL_KINDS)."""
    kinds: dict[str, float] = {}
    for name, share in kernels:
        kind = next((k for k, p in KERNEL_KINDS if re.search(p, name, re.I)), "elementwise/other")
        kinds[kind] = kinds.get(kind, 0.0) + share
    return {k: round(v, 1) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}


def mamba_kernels(kernels: list[tuple[str, float]]) -> str:
    """Which Mamba implementation ran, read off the kernel names."""
    names = " ".join(k for k, _ in kernels)
    scan = "mamba-ssm" if "_chunk_scan" in names else "torch"
    conv = "causal-conv1d" if "causal_conv1d" in names else "torch conv"
    return f"{scan} + {conv}"


def timed_training_steps(step, params, steps: int, warmup: int, device: torch.device) -> dict:
    """Run step() (forward + backward, returns the loss) warmup + steps times; then once under the profiler."""
    def run():
        for p in params:
            p.grad = None
        return step()

    first_loss = run().item()
    for _ in range(warmup - 1):
        run()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    result = {"first_loss": first_loss, "step_seconds": seconds,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            sync()
        result["all_kernels"] = kernel_shares(prof)
        result["kernels"] = kernel_breakdown(result["all_kernels"])
        result["mamba_kernels"] = mamba_kernels(result["all_kernels"])
    return result


def hf_worker(rank: int, hf_dir: str, tokens: torch.Tensor, steps: int, warmup: int, kernels: bool) -> dict:
    if not kernels:  # make transformers take its PyTorch fallbacks, as on a machine without these packages
        sys.modules.update({"mamba_ssm": None, "causal_conv1d": None})
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to(device).train()
    tokens = tokens.to(device)
    result = timed_training_steps(lambda: _backward(model(input_ids=tokens, labels=tokens).loss),
                                  list(model.parameters()), steps, warmup, device)
    return {**result, "transformers": transformers.__version__, "attention": model.config._attn_implementation}


def megatron_worker(rank: int, mg_root: str, tokens: torch.Tensor, steps: int, warmup: int, fused: bool | None
                    ) -> dict:
    from falcon_bridge.megatron.runtime import (
        init_distributed,
        load_model,
        next_token_loss,
        provider_from_checkpoint,
        shutdown_distributed,
    )

    device = init_distributed(rank, 1, 1, 1)
    try:
        provider, it_dir = provider_from_checkpoint(Path(mg_root), torch.bfloat16)
        if fused is not None:
            provider.use_mamba_mem_eff_path = fused
        model = load_model(provider, it_dir, device).train()
        tokens = tokens.to(device)
        result = timed_training_steps(lambda: _backward(next_token_loss(model, tokens).mean()),
                                      list(model.parameters()), steps, warmup, device)
        mixer = model.decoder.layers[0].mamba_mixer
        return {**result, "mamba_fused_path": bool(mixer.use_mem_eff_path),
                "attention": type(model.decoder.layers[0].self_attention.core_attention).__name__}
    finally:
        shutdown_distributed()


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def hf_checkpoint(card_name: str, work: Path) -> Path:
    """The card's random bf16 HF checkpoint (reused when present, e.g. from gpu_roundtrip)."""
    hf_dir = work / card_name / "hf"
    if not (hf_dir / "config.json").exists():
        create_random(load_card(card_name), hf_dir, seed=0, dtype=torch.bfloat16)
    return hf_dir


def megatron_checkpoint(hf_dir: Path, mup_mode: str) -> Path:
    """Its TP=1 import, µP preserved (the model applies the multipliers) or folded into the weights."""
    mg_dir = hf_dir.parent / ("tp1" if mup_mode == "preserve" else "tp1-fold")
    if not mg_dir.exists():
        import_hf(str(hf_dir), mg_dir, MegatronLayout(tp=1), mup_mode=mup_mode)
    return mg_dir


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", default="falcon-h1-0.5b,falcon-h1-1.5b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/fb-gpu")
    ap.add_argument("--variants", help="a subset, e.g. hf-kernels,megatron (default: all that can run)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    conv_built = importlib.util.find_spec("causal_conv1d_cuda") is not None
    rows = []
    for card_name in args.cards.split(","):
        hf_dir = hf_checkpoint(card_name, Path(args.workdir))
        vocab = load_card(card_name).arch.vocab_size
        tokens = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
        # variant → (worker, the checkpoint it loads: "hf" or the µP mode of the import, worker option)
        variants = {"hf-torch": (hf_worker, "hf", False)}
        if conv_built:
            variants["hf-kernels"] = (hf_worker, "hf", True)
        variants["megatron"] = (megatron_worker, "preserve", None)
        if conv_built:
            variants["megatron-unfused"] = (megatron_worker, "preserve", False)
        variants["megatron-folded"] = (megatron_worker, "fold", None)
        chosen = args.variants.split(",") if args.variants else list(variants)
        for variant, (worker, source, option) in ((v, variants[v]) for v in chosen if v in variants):
            path = hf_dir if source == "hf" else megatron_checkpoint(hf_dir, source)  # imported when first needed
            r = launch(worker, 1, str(path), tokens, args.steps, args.warmup, option)
            rows.append({"card": card_name, "variant": variant, "seq": args.seq, "batch": args.batch,
                         "steps": args.steps, "warmup": args.warmup,
                         "tokens_per_s": args.batch * args.seq / r["step_seconds"], **r})
            print(json.dumps(rows[-1]), flush=True)  # partial results survive a run cut short
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'card':16} {'variant':17} {'tokens/s':>10} {'× hf-torch':>10} {'× hf-kernels':>12} {'peak GiB':>9} "
          f"{'loss':>8}")
    for r in rows:
        base = {v["variant"]: v["tokens_per_s"] for v in rows if v["card"] == r["card"]}
        ratio = {k: f"{r['tokens_per_s'] / base[k]:.2f}" if k in base else "-" for k in ("hf-torch", "hf-kernels")}
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        print(f"{r['card']:16} {r['variant']:17} {r['tokens_per_s']:10.0f} {ratio['hf-torch']:>10} "
              f"{ratio['hf-kernels']:>12} {peak:>9} {r['first_loss']:8.4f}")
    for r in rows:
        if "kernels" in r:
            shares = ", ".join(f"{k} {v}%" for k, v in r["kernels"].items())
            print(f"{r['card']} {r['variant']} kernel time: {shares}")


if __name__ == "__main__":
    main()
