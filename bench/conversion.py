"""Conversion speed and memory against two I/O floors, measured in one run.

    python bench/conversion.py [--cards falcon-h1-0.5b,falcon-h1-1.5b] [--workdir /tmp/fb-bench] [--repeat 3]
                               [--workers 1,2,...] [--env KEY=VALUE ...]

For each card: create-random (bf16, 2 GiB shards), then the two I/O floors of bench/io_floor.py (io-floor: one
process; io-floor-parallel: one process per source shard, all at once), then for each --workers count N (default 1)
import-hf --tp 2, reshard --tp 1 --pp 2 and export-hf, each with --workers N. Every step runs as its own process,
after an untimed sync (no dirty pages of the step before to write back); the whole sequence is repeated --repeat
times (default 3) keeping each step's best wall time (with that run's CPU time, user + sys, of all its processes)
and highest peak RSS (these machines are noisy: the 0.5B floor varied between 5.0 and 8.2 s within an hour). Peak
RSS: per worker the largest, and the total over workers, from the "peak_rss_bytes" list a step prints (the
conversions' --json summary, the parallel floor), else the process's own (one process). Prints each step's wall
time, its ratios to both floors, CPU time, peak RSS and the bound 2 × largest tensor + 1 GiB (per worker). Ratios
only: compare numbers from one run. --env sets variables for every step, the floors included (e.g.
THP_MEM_ALLOC_ENABLE=1: transparent huge pages in torch's CPU allocator). Each output is deleted as soon as no later
step reads it: at most the source and two outputs are on disk at once.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from io_floor import reap  # bench/ is on the path of a script run from it

from falcon_bridge.cards import load_card
from falcon_bridge.core.mapping import hf_tensor_shapes

CLI = [sys.executable, "-m", "falcon_bridge.cli.app"]
FLOOR = [sys.executable, str(Path(__file__).parent / "io_floor.py")]


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, int, int]:
    """(wall seconds, CPU seconds (user + sys, its waited-for children included), workers, peak RSS bytes of the
    largest worker, their total) of one command run in a fresh process."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **env})
        usage = reap(proc)
        wall = time.perf_counter() - t0
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-2000:]}")
    summary = json.loads(stdout) if stdout.strip() else {}
    peaks = summary.get("peak_rss_bytes") or [usage.ru_maxrss * 1024]  # Linux: ru_maxrss in KiB
    return wall, usage.ru_utime + usage.ru_stime, summary.get("workers", 1), max(peaks), sum(peaks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cards", default="falcon-h1-0.5b,falcon-h1-1.5b")
    ap.add_argument("--workdir", default="/tmp/fb-bench")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", default="1", help="comma-separated worker counts, e.g. 1,2,4")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    workers = [int(n) for n in args.workers.split(",")]
    if min(workers) < 1:
        ap.error("--workers: counts must be at least 1")
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
        hf, mg, mg2, out = (str(d / o) for o in ("hf", "mg", "mg2", "out"))
        steps: list[tuple[str, int | None, list[str], list[str]]] = [  # step, --workers, command, outputs then done
            ("io-floor", None, [*FLOOR, hf, out], [out]),
            ("io-floor-parallel", None, [*FLOOR, "--parallel", hf, out], [out]),
        ]
        for n in workers:
            w = ["--workers", str(n), "--json"]
            steps += [("import-hf", n, [*CLI, "import-hf", hf, mg, "--tp", "2", *w], []),
                      ("reshard", n, [*CLI, "reshard", mg, mg2, "--tp", "1", "--pp", "2", *w], [mg]),
                      ("export-hf", n, [*CLI, "export-hf", mg2, out, *w], [mg2, out])]
        results: dict[tuple[str, int | None], tuple[float, float, int, int, int]] = {}
        for _ in range(args.repeat):
            for step, n, cmd, done in steps:
                os.sync()  # untimed: every step starts with no dirty pages left by the one before to write back
                wall, cpu, used, rss, total = measure(cmd, env)
                best = results.get((step, n), (math.inf, 0.0, used, 0, 0))
                fastest = (wall, cpu) if wall < best[0] else best[:2]
                results[step, n] = (*fastest, used, max(rss, best[3]), max(total, best[4]))
                for path in done:
                    shutil.rmtree(path)
        floor, parallel_floor = results["io-floor", None][0], results["io-floor-parallel", None][0]
        for (step, n), (wall, cpu, used, rss, total) in results.items():
            rows.append((name, step, n, used, wall, wall / floor, wall / parallel_floor, cpu, rss, total,
                         2 * largest + 2**30))
        shutil.rmtree(d)
    print(f"{'card':16} {'step':17} {'workers':>7} {'wall s':>7} {'/floor':>7} {'/pfloor':>7} {'CPU s':>6} "
          f"{'peak RSS GiB':>13} {'total RSS GiB':>14} {'bound GiB':>10}")
    for name, step, _, used, wall, ratio, pratio, cpu, rss, total, bound in rows:
        print(f"{name:16} {step:17} {used:7} {wall:7.1f} {ratio:7.2f} {pratio:7.2f} {cpu:6.1f} {rss / 2**30:13.2f} "
              f"{total / 2**30:14.2f} {bound / 2**30:10.2f}{'' if rss <= bound else '  over'}")
    cards = args.cards.split(",")
    if len(cards) > 1:
        for n in workers:
            for step in ("import-hf", "reshard", "export-hf"):
                a, b = (next(r[8] for r in rows if r[:3] == (c, step, n)) for c in cards[:2])
                print(f"peak RSS growth {cards[0]} → {cards[1]}, {step}, {n} workers: {100 * (b / a - 1):+.1f} %")


if __name__ == "__main__":
    main()
