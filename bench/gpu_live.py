"""Live bridge timing: all weights of a live bf16 model streamed out as HF tensors (hf_weights) to GPU 0 and to CPU,
against what the file path takes for the same weights (dist_checkpointing.save + export-hf), with the peak extra
GPU memory per rank while streaming. Ratios are measured in one run (these machines are noisy).

    python bench/gpu_live.py [--card falcon-h1-0.5b] [--tp 2] [--json F]
CPU smoke test:  CUDA_VISIBLE_DEVICES= python bench/gpu_live.py --card tiny-one-group --tp 2
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.live import hf_weights
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.megatron.checkpoint import load_model, provider_from_checkpoint, save_checkpoint
from falcon_bridge.megatron.distributed import init_distributed, launch, shutdown_distributed


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def worker(rank: int, root: str, tp: int, save_dir: str) -> dict | None:
    provider, it_dir = provider_from_checkpoint(root, tp=tp)
    device = init_distributed(rank, tp, tp, 1)
    try:
        model = load_model(provider, it_dir, device)
        on_gpu = device.type == "cuda"
        out = {}
        for target in (["cuda", "cpu"] if on_gpu else ["cpu"]):
            if on_gpu:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            torch.distributed.barrier()
            t0 = time.perf_counter()
            n = 0
            for _, tensor in hf_weights(model, dtype=torch.bfloat16, device=target if target == "cpu" else device):
                n += tensor.numel()
            synchronize()
            torch.distributed.barrier()
            out[f"stream_to_{target}_s"] = time.perf_counter() - t0
            out["parameters"] = n
            if on_gpu:
                out[f"stream_to_{target}_peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        torch.distributed.barrier()
        t0 = time.perf_counter()
        save_checkpoint(model, Path(save_dir), it_dir)
        torch.distributed.barrier()
        out["dist_checkpointing_save_s"] = time.perf_counter() - t0
        return out if rank == 0 else None
    finally:
        shutdown_distributed()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--card", default="falcon-h1-0.5b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        create_random(CreateRandomOptions(load_card(args.card), work / "hf", dtype=torch.bfloat16))
        import_hf(ImportOptions(str(work / "hf"), work / "mg", MegatronLayout()))
        row = launch(worker, args.tp, str(work / "mg"), args.tp, str(work / "saved"))
        t0 = time.perf_counter()
        export_hf(ExportOptions(work / "saved", work / "exported"))
        row["export_hf_s"] = time.perf_counter() - t0
    row |= {"card": args.card, "tp": args.tp,
            "file_path_s": row["dist_checkpointing_save_s"] + row["export_hf_s"]}
    for target in ("cuda", "cpu"):
        if f"stream_to_{target}_s" in row:
            row[f"file_path_over_stream_to_{target}"] = row["file_path_s"] / row[f"stream_to_{target}_s"]
    print(f"{args.card} at TP={args.tp}: {row['parameters']:,} parameters")
    for key, value in row.items():
        if key.endswith(("_s", "_gib")) or key.startswith("file_path_over"):
            print(f"  {key:40s} {value:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")
    return row


if __name__ == "__main__":
    main()
