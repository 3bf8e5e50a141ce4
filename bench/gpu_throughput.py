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
  megatron-graph, megatron-folded-graph   the two above trained as Megatron does with
               cuda_graph_impl="full_iteration": megatron-core's schedule (get_forward_backward_func) wrapped in its
               FullCudaGraphWrapper, which runs the first step eagerly, captures the second and replays it after
  hf-kernels-graph   hf-kernels with its whole forward + backward captured by torch.cuda.graph (transformers has
               no training CUDA-graph option of its own), for a like-for-like comparison with the graphed variants

Graphed steps accumulate into the gradients they captured (a replay cannot hand out new .grad tensors, as
Megatron's DDP buffers are not reallocated either); eager steps set them to None first. Each row also gives the
profiled step's total kernel time and its share of the step's wall time ("GPU busy"): what launches and Python
leave idle is what a CUDA graph can recover.

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

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.distributed import launch

KERNEL_KINDS = [  # (kind, pattern on the CUDA kernel name), first match wins (flash kernels name cutlass types)
    ("attention", r"flash|fmha|attention|sdpa"),
    ("conv1d", r"conv1d|depthwise|cudnn"),
    ("mamba scan (Triton)", r"_chunk|state_passing|ssd"),
    ("norm", r"norm|rms"),
    ("loss/softmax", r"softmax|cross_entropy|nll|logsumexp"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|sm90_"),
    ("copy/cast", r"direct_copy|copy_kernel|memcpy|memset|CatArray|(?<!no)cast"),  # not `gpu_kernel_impl_nocast`
]


def _kernel_times(prof) -> list[tuple[str, float]]:
    """(kernel name, its CUDA time in µs) for every kernel of a profile."""
    return [(e.key, getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0))
            for e in prof.key_averages()]


def kernel_seconds(prof) -> float:
    """The profiled step's total CUDA kernel time."""
    return sum(t for _, t in _kernel_times(prof)) / 1e6


def kernel_shares(prof) -> list[tuple[str, float]]:
    """Every CUDA kernel of the profiled step with its share of the kernel time (%), largest first."""
    events = _kernel_times(prof)
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


def timed_training_steps(step, params, steps: int, warmup: int, device: torch.device, graphed: bool = False
                         ) -> dict:
    """Run step() (forward + backward, returns the loss) warmup + steps times; then once under the profiler.
    `graphed`: step() replays a CUDA graph, which accumulates into the gradients it captured (not reset)."""
    def run():
        if not graphed:
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
        last = run()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    result = {"first_loss": first_loss, "last_loss": last.item(), "step_seconds": seconds,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
              # a graph's private pool is reserved, not allocated, between replays: compare reserved for graphs
              "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None}
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            sync()
        result["kernel_seconds"] = kernel_seconds(prof)
        result["gpu_busy"] = result["kernel_seconds"] / seconds
        result["all_kernels"] = kernel_shares(prof)
        result["kernels"] = kernel_breakdown(result["all_kernels"])
        result["mamba_kernels"] = mamba_kernels(result["all_kernels"])
    return result


def cuda_graphed(step, warmup: int = 3):
    """step() captured once by torch.cuda.graph (after warm-up on a side stream, as capture requires) and replayed
    on every call of the returned function, which returns the captured step's loss."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = step()

    def replay():
        graph.replay()
        return loss
    return replay


def hf_worker(rank: int, hf_dir: str, tokens: torch.Tensor, steps: int, warmup: int, option: str) -> dict:
    """option: "torch" (no mamba-ssm / causal-conv1d), "kernels", or "kernels-graph"."""
    kernels = option != "torch"
    if not kernels:  # make transformers take its PyTorch fallbacks, as on a machine without these packages
        sys.modules.update({"mamba_ssm": None, "causal_conv1d": None})
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.to(device).train()
    tokens = tokens.to(device)
    step = lambda: _backward(model(input_ids=tokens, labels=tokens).loss)  # noqa: E731
    graphed = option == "kernels-graph"
    result = timed_training_steps(cuda_graphed(step) if graphed else step, list(model.parameters()), steps, warmup,
                                  device, graphed)
    return {**result, "transformers": transformers.__version__, "attention": model.config._attn_implementation}


def megatron_worker(rank: int, mg_root: str, tokens: torch.Tensor, steps: int, warmup: int, option: str) -> dict:
    """option: "default" (the fused Mamba path when available), "unfused", or "graph" (full-iteration CUDA graph)."""
    from falcon_bridge.megatron.checkpoint import load_model, provider_from_checkpoint
    from falcon_bridge.megatron.distributed import init_distributed, shutdown_distributed
    from falcon_bridge.megatron.training import next_token_loss

    graphed = option == "graph"
    device = init_distributed(rank, 1, 1, 1, cuda_graphs=graphed)
    try:
        provider, it_dir = provider_from_checkpoint(Path(mg_root), torch.bfloat16)
        if option == "unfused":
            provider.use_mamba_mem_eff_path = False
        model = load_model(provider, it_dir, device).train()
        tokens = tokens.to(device)
        step = (megatron_graphed_step(model, tokens) if graphed
                else lambda: _backward(next_token_loss(model, tokens).mean()))
        result = timed_training_steps(step, list(model.parameters()), steps, warmup, device, graphed)
        mixer = model.decoder.layers[0].mamba_mixer
        return {**result, "mamba_fused_path": bool(mixer.use_mem_eff_path),
                "attention": type(model.decoder.layers[0].self_attention.core_attention).__name__}
    finally:
        shutdown_distributed()


def megatron_graphed_step(model, tokens: torch.Tensor):
    """A training step as Megatron-LM runs it with cuda_graph_impl="full_iteration": megatron-core's schedule
    (get_forward_backward_func) wrapped in its FullCudaGraphWrapper. The loss is the mean next-token loss, as in
    the eager variants; the count is a device tensor made here because nothing may copy from the host during
    capture. Needs init_distributed(..., cuda_graphs=True): the wrapper registers the RNG tracker's generators with
    the graph."""
    from megatron.core.full_cuda_graph import FullCudaGraphWrapper
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from falcon_bridge.megatron.training import next_token_loss

    forward_backward = FullCudaGraphWrapper(get_forward_backward_func(), cuda_graph_warmup_steps=1)
    count = torch.tensor(tokens.shape[0] * (tokens.shape[1] - 1), dtype=torch.int, device=tokens.device)

    def loss_func(per_token: torch.Tensor):
        total = per_token.float().sum()
        return total, count, {"loss": total.detach() / count}  # the schedule divides `total` by `count` in place

    def forward_step(data_iterator, model):
        return next_token_loss(model, next(data_iterator)["tokens"]), loss_func

    def step() -> torch.Tensor:
        store = forward_backward(forward_step_func=forward_step, data_iterator=iter([{"tokens": tokens}]),
                                 model=[model], num_microbatches=1, seq_length=tokens.shape[1],
                                 micro_batch_size=tokens.shape[0], forward_only=False)
        return store[0]["loss"]
    return step


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def hf_checkpoint(card_name: str, work: Path) -> Path:
    """The card's random bf16 HF checkpoint (reused when present, e.g. from gpu_roundtrip)."""
    hf_dir = work / card_name / "hf"
    if not (hf_dir / "config.json").exists():
        create_random(CreateRandomOptions(load_card(card_name), hf_dir, seed=0, dtype=torch.bfloat16))
    return hf_dir


def megatron_checkpoint(hf_dir: Path, mup_mode: str) -> Path:
    """Its TP=1 import, µP preserved (the model applies the multipliers) or folded into the weights."""
    mg_dir = hf_dir.parent / ("tp1" if mup_mode == "preserve" else "tp1-fold")
    if not mg_dir.exists():
        import_hf(ImportOptions(str(hf_dir), mg_dir, MegatronLayout(tp=1), mup_mode=mup_mode))
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
        variants = {"hf-torch": (hf_worker, "hf", "torch")}
        if conv_built:
            variants["hf-kernels"] = (hf_worker, "hf", "kernels")
            variants["hf-kernels-graph"] = (hf_worker, "hf", "kernels-graph")
        variants["megatron"] = (megatron_worker, "preserve", "default")
        if conv_built:
            variants["megatron-unfused"] = (megatron_worker, "preserve", "unfused")
        variants["megatron-folded"] = (megatron_worker, "fold", "default")
        if torch.cuda.is_available():
            variants["megatron-graph"] = (megatron_worker, "preserve", "graph")
            variants["megatron-folded-graph"] = (megatron_worker, "fold", "graph")
        chosen = args.variants.split(",") if args.variants else list(variants)
        for variant, (worker, source, option) in ((v, variants[v]) for v in chosen if v in variants):
            path = hf_dir if source == "hf" else megatron_checkpoint(hf_dir, source)  # imported when first needed
            row = {"card": card_name, "variant": variant, "seq": args.seq, "batch": args.batch, "steps": args.steps,
                   "warmup": args.warmup}
            try:
                r = launch(worker, 1, str(path), tokens, args.steps, args.warmup, option)
                rows.append({**row, "tokens_per_s": args.batch * args.seq / r["step_seconds"], **r})
            except Exception as e:  # noqa: BLE001 - one variant that cannot run (e.g. a capture error) is a result too
                rows.append({**row, "error": str(e).strip().splitlines()[-1]})
            print(json.dumps(rows[-1]), flush=True)  # partial results survive a run cut short
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2))
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"\n{'card':16} {'variant':21} {'tokens/s':>10} {'× hf-torch':>10} {'× hf-kernels':>12} {'GPU busy':>8} "
          f"{'peak GiB':>9} {'loss 1st':>8} {'last':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['card']:16} {r['variant']:21} failed: {r['error']}")
            continue
        base = {v["variant"]: v["tokens_per_s"] for v in rows if v["card"] == r["card"] and "error" not in v}
        ratio = {k: f"{r['tokens_per_s'] / base[k]:.2f}" if k in base else "-" for k in ("hf-torch", "hf-kernels")}
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        busy = f"{100 * r['gpu_busy']:.0f} %" if "gpu_busy" in r else "-"
        print(f"{r['card']:16} {r['variant']:21} {r['tokens_per_s']:10.0f} {ratio['hf-torch']:>10} "
              f"{ratio['hf-kernels']:>12} {busy:>8} {peak:>9} {r['first_loss']:8.4f} {r['last_loss']:8.4f}")
    for r in rows:
        if "kernels" in r:
            shares = ", ".join(f"{k} {v}%" for k, v in r["kernels"].items())
            print(f"{r['card']} {r['variant']} kernel time: {shares}")


if __name__ == "__main__":
    main()
