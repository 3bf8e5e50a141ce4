"""How exact is mamba-ssm's Triton SSD kernel in fp32? (GPU; explains verify's tolerance on cuda.)

Runs `mamba_chunk_scan_combined` on fp32 inputs of each card's Mamba shapes and compares it with mamba-ssm's own
PyTorch reference (fp32, TF32 off), once per Triton fp32 dot mode (Triton computes fp32 `tl.dot` in TF32 unless
TRITON_F32_DEFAULT says otherwise, and mamba-ssm does not say). Each mode runs in its own process because Triton
reads the setting when it compiles.

    python bench/ssd_precision.py [--cards falcon-h1-0.5b,falcon-h1-1.5b] [--modes tf32,ieee] [--seq 512]
"""

import argparse
import json
import os
import subprocess
import sys

import torch


def measure(card: str, seq: int) -> dict:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, ssd_chunk_scan_combined_ref

    from falcon_bridge.cards import load_card

    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's einsums in true fp32
    arch = load_card(card).arch
    heads, head_dim, groups, state = arch.mamba_n_heads, arch.mamba_d_head, arch.mamba_n_groups, arch.mamba_d_state
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "dtype": torch.float32, "generator": g}
    x = torch.randn(2, seq, heads, head_dim, **kw)
    dt = torch.randn(2, seq, heads, **kw)
    B = torch.randn(2, seq, groups, state, **kw) / state ** 0.5
    C = torch.randn(2, seq, groups, state, **kw) / state ** 0.5
    A = -torch.arange(1, heads + 1, device="cuda", dtype=torch.float32)
    D, dt_bias = torch.ones(heads, device="cuda"), torch.ones(heads, device="cuda")
    args = (x, dt, A, B, C, arch.mamba_chunk_size)
    kernel = mamba_chunk_scan_combined(*args, D=D, dt_bias=dt_bias, dt_softplus=True)
    reference = ssd_chunk_scan_combined_ref(*args, D=D, dt_bias=dt_bias, dt_softplus=True)
    diff = (kernel - reference).abs().max().item()
    return {"card": card, "mode": os.environ.get("TRITON_F32_DEFAULT", "tf32"), "d_state": state,
            "relative": diff / reference.abs().max().item()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", default="falcon-h1-0.5b,falcon-h1-1.5b")
    ap.add_argument("--modes", default="tf32,ieee")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per card and mode")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # one card in this process's Triton mode
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.seq)))
        return
    print(f"{'card':16} {'d_state':>7} {'mode':>5} {'max|Δ|/max|ref| vs PyTorch':>28}")
    for mode in args.modes.split(","):
        for card in args.cards.split(","):
            try:
                proc = subprocess.run([sys.executable, __file__, "--measure", card, "--seq", str(args.seq)],
                                      env={**os.environ, "TRITON_F32_DEFAULT": mode}, capture_output=True,
                                      text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{card:16} {'':>7} {mode:>5} not done in {args.timeout} s (compilation and autotuning)")
                continue
            if proc.returncode:
                print(f"{card:16} {'':>7} {mode:>5} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(proc.stdout.splitlines()[-1])
            print(f"{card:16} {row['d_state']:>7} {mode:>5} {row['relative']:>28.2e}")


if __name__ == "__main__":
    main()
