"""The live bridge in one script: an HF checkpoint straight into our Megatron Falcon-H1 model at TP=2, one training
step, then the trained weights streamed out as HF tensors (what an RL loop hands its rollout engine) and saved as
an HF checkpoint — no Megatron checkpoint on disk.

    python examples/live_bridge.py HF_DIR OUT_DIR [--tp 2]

Runs on CPU (gloo) or on GPUs (NCCL, one per rank). Without HF_DIR's weights at hand, make some first:
    falcon-bridge create-random tiny-one-group HF_DIR --dtype fp32
"""

import argparse
from pathlib import Path

import torch

from falcon_bridge.converters.live import hf_weights, model_from_hf, save_hf_pretrained
from falcon_bridge.megatron.distributed import init_distributed, launch, shutdown_distributed
from falcon_bridge.megatron.training import next_token_loss


def worker(rank: int, hf_dir: str, out: str, tp: int) -> dict | None:
    device = init_distributed(rank, tp, tp, 1)  # your training script has done this already
    try:
        model = model_from_hf(hf_dir, device=device)  # each rank reads only its slices
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        tokens = torch.randint(0, model.provider.arch.vocab_size, (2, 32), device=device)
        next_token_loss(model, tokens).mean().backward()
        optimizer.step()

        # every rank iterates the stream; each gets the full HF tensors, here moved to CPU one at a time
        total = sum(t.numel() for _, t in hf_weights(model, dtype=torch.bfloat16, device="cpu"))
        summary = save_hf_pretrained(model, Path(out), tokenizer_from=Path(hf_dir), overwrite=True)
        return {"streamed_parameters": total, **(summary or {})} if rank == 0 else None
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("hf_dir")
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args()
    print(launch(worker, args.tp, args.hf_dir, args.out, args.tp))
