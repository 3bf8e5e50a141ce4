"""The I/O floor of a conversion, in two forms:

    python bench/io_floor.py SRC_DIR OUT_DIR               one process that imports torch, reads every tensor of the
                                                           HF checkpoint and writes the same bytes as safetensors
                                                           (streamed, as our writer does)
    python bench/io_floor.py --parallel SRC_DIR OUT_DIR    one such process per source safetensors shard, all started
                                                           at once, each copying the tensors of its own shard into
                                                           OUT_DIR/<shard file name>; waits for all, then prints
                                                           {"workers": N, "peak_rss_bytes": [one per process]}
"""

import json
import os
import subprocess
import sys
from pathlib import Path


def copy(src: Path, out: Path, shard: str | None = None) -> None:
    """Every tensor of the checkpoint `src` (only those stored in its file `shard`, if given) into safetensors in
    `out`: shards of at most 5 GB, or for `shard` one file out/<shard>."""
    import torch  # noqa: F401 - counted in the floor: every conversion pays this import

    from falcon_bridge.formats.hf import SINGLE_FILE, HFCheckpoint, ShardedSafetensorsWriter

    ckpt = HFCheckpoint(src)
    plan = [(n, i.shape, i.dtype) for n, i in ckpt.tensors.items() if shard is None or i.file.name == shard]
    into = out if shard is None else out / f".{shard}.tmp"  # one shard: the writer names its only file SINGLE_FILE
    into.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(into, plan, 5 * 10**9 if shard is None else 1 << 62)
    for name, *_ in plan:
        writer.put(name, ckpt.get(name))
    writer.close()
    if shard is not None:
        (into / SINGLE_FILE).rename(out / shard)
        into.rmdir()


def reap(proc: subprocess.Popen):
    """Wait for `proc` as os.wait4 does rather than proc.wait(): its resource usage comes back too (ru_maxrss: the
    process's own peak RSS, KiB on Linux; CPU times include its waited-for children)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage


def parallel(src: Path, out: Path) -> None:
    out.mkdir(parents=True)
    shards = sorted(f.name for f in src.glob("*.safetensors"))
    procs = [subprocess.Popen([sys.executable, __file__, "--shard", s, str(src), str(out)]) for s in shards]
    peaks = []
    for p in procs:
        peaks.append(reap(p).ru_maxrss * 1024)
    failed = [s for s, p in zip(shards, procs) if p.returncode]
    if failed:
        raise SystemExit(f"io_floor: copying {', '.join(failed)} failed")
    print(json.dumps({"workers": len(procs), "peak_rss_bytes": peaks}))


if __name__ == "__main__":
    if sys.argv[1] == "--parallel":
        parallel(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "--shard":  # one process of --parallel
        copy(Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[2])
    else:
        copy(Path(sys.argv[1]), Path(sys.argv[2]))
