"""Conversion speed and memory against the I/O floor, measured in one run.

    python bench/conversion.py [--cards falcon-h1-0.5b,falcon-h1-1.5b] [--workdir /tmp/fb-bench] [--repeat 3]
                               [--env KEY=VALUE ...]

For each card: create-random (bf16), then the I/O floor (bench/io_floor.py), import-hf --tp 2, reshard --tp 1
--pp 2, export-hf, each as its own process under /usr/bin/time (wall time, peak RSS), the whole sequence repeated
--repeat times (default 3) keeping each step's best wall time (with that run's CPU time, user + sys) and highest
peak RSS (these machines are noisy: the 0.5B floor varied between 5.0 and 8.2 s within an hour). Prints each
command's wall time, CPU time and peak RSS, the ratio to the floor, and the RSS bound 2 × largest tensor + 1 GiB.
Ratios only: compare numbers from one run. --env sets variables for every step, the floor included (e.g.
THP_MEM_ALLOC_ENABLE=1: transparent huge pages in torch's CPU allocator).
"""

import argparse
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from falcon_bridge.cards import load_card
from falcon_bridge.core.mapping import hf_tensor_shapes

CLI = [sys.executable, "-m", "falcon_bridge.cli.app"]


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds (user + sys), peak RSS bytes) of one command run in a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", *cmd], capture_output=True, text=True,
                          env={**os.environ, **env})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    rss_kib, user, system = proc.stderr.strip().splitlines()[-1].split()
    return wall, float(user) + float(system), int(rss_kib) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", default="falcon-h1-0.5b,falcon-h1-1.5b")
    ap.add_argument("--workdir", default="/tmp/fb-bench")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    env = dict(item.split("=", 1) for item in args.env)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name in args.cards.split(","):
        arch = load_card(name).arch
        largest = max(math.prod(s) for s in hf_tensor_shapes(arch).values()) * 2  # bf16
        d = work / name
        subprocess.run([*CLI, "create-random", name, str(d / "hf"), "--dtype", "bf16", "--json"], check=True,
                       capture_output=True)
        steps = {
            "io-floor": [sys.executable, str(Path(__file__).parent / "io_floor.py"), str(d / "hf"), str(d / "floor")],
            "import-hf": [*CLI, "import-hf", str(d / "hf"), str(d / "mg"), "--tp", "2", "--json"],
            "reshard": [*CLI, "reshard", str(d / "mg"), str(d / "mg2"), "--tp", "1", "--pp", "2", "--json"],
            "export-hf": [*CLI, "export-hf", str(d / "mg2"), str(d / "hf2"), "--json"],
        }
        results: dict[str, tuple[float, float, int]] = {}
        for _ in range(args.repeat):
            for step, cmd in steps.items():
                wall, cpu, rss = measure(cmd, env)
                best = results.get(step, (math.inf, 0.0, 0))
                fastest = (wall, cpu) if wall < best[0] else best[:2]
                results[step] = (*fastest, max(rss, best[2]))
            for out in ("floor", "mg", "mg2", "hf2"):
                shutil.rmtree(d / out, ignore_errors=True)
        floor = results["io-floor"][0]
        for step, (wall, cpu, rss) in results.items():
            rows.append((name, step, wall, wall / floor, cpu, rss, 2 * largest + 2**30))
        shutil.rmtree(d)
    print(f"{'card':16} {'step':10} {'wall s':>7} {'/floor':>7} {'CPU s':>6} {'peak RSS GiB':>13} {'bound GiB':>10}")
    for name, step, wall, ratio, cpu, rss, bound in rows:
        print(f"{name:16} {step:10} {wall:7.1f} {ratio:7.2f} {cpu:6.1f} {rss / 2**30:13.2f} {bound / 2**30:10.2f}"
              f"{'' if rss <= bound else '  over'}")
    cards = args.cards.split(",")
    if len(cards) > 1:
        for step in ("import-hf", "reshard", "export-hf"):
            a, b = (next(r[5] for r in rows if r[0] == c and r[1] == step) for c in cards[:2])
            print(f"peak RSS growth {cards[0]} → {cards[1]}, {step}: {100 * (b / a - 1):+.1f} %")


if __name__ == "__main__":
    main()
