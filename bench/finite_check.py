"""The NaN/Inf check of a conversion, three ways, on one tensor the size of the 1.5B card's embedding (256 MiB
bf16): isfinite(t).all(), an fp32-accumulated sum, and aminmax (what falcon_bridge.core.transforms.all_finite
uses). Prints milliseconds per call (mean of 3 after one warm-up) and the ratios to aminmax.

    python bench/finite_check.py [--rows 65536] [--cols 2048]
"""

import argparse
import time

import torch

from falcon_bridge.core.transforms import all_finite


def per_call_ms(fn, repeat: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1000


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--cols", type=int, default=2048)
    args = ap.parse_args()
    t = torch.randn(args.rows, args.cols).to(torch.bfloat16)
    times = {"isfinite(t).all()": per_call_ms(lambda: bool(torch.isfinite(t).all())),
             "fp32 sum": per_call_ms(lambda: bool(torch.isfinite(t.sum(dtype=torch.float32)))),
             "aminmax (all_finite)": per_call_ms(lambda: all_finite(t))}
    base = times["aminmax (all_finite)"]
    for name, ms in times.items():
        print(f"{name:22} {ms:8.1f} ms  {ms / base:6.1f} × aminmax")
