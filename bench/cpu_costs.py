"""The CPU costs a conversion pays beyond the I/O floor, each measured alone on this machine:
sha256 throughput (the provenance manifest hashes every source and output byte), torch.save with and without its
crc32 (DCP writes every tensor through torch.save), and process start-up imports (torch alone, the floor's; plus
torch.distributed.checkpoint; and the CLI with import-hf, a conversion's).

    python bench/cpu_costs.py [--mib 256] [--repeat 3]
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time

import torch

IMPORTS = {
    "torch (the floor)": "import torch",
    "torch + torch.distributed.checkpoint": "import torch, torch.distributed.checkpoint",
    "falcon-bridge CLI + import-hf": "import falcon_bridge.cli.app, falcon_bridge.converters.import_hf",
}


def best_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    data = os.urandom(args.mib << 20)
    sha = best_seconds(lambda: hashlib.sha256(data).hexdigest(), args.repeat)
    print(f"sha256: {len(data) / sha / 1e9:.2f} GB/s on one core")
    tensor = torch.frombuffer(bytearray(data), dtype=torch.bfloat16)
    for crc in (True, False):
        torch.serialization.set_crc32_options(crc)
        with tempfile.TemporaryFile() as f:  # into a file, as DCP writes it
            seconds = best_seconds(lambda f=f: (f.seek(0), torch.save(tensor, f)), args.repeat)
        print(f"torch.save of {args.mib} MiB into a file, crc32 {'on ' if crc else 'off'}: {1000 * seconds:.0f} ms")
    torch.serialization.set_crc32_options(True)
    for label, code in IMPORTS.items():
        seconds = best_seconds(lambda c=code: subprocess.run([sys.executable, "-c", c], check=True), args.repeat)
        print(f"start-up and imports, {label}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
