"""The I/O floor of a conversion: one process that imports torch, reads every tensor of an HF checkpoint and writes
the same bytes as safetensors (streamed, as our writer does). Usage: python bench/io_floor.py SRC_DIR OUT_DIR"""

import sys
from pathlib import Path

import torch  # noqa: F401 - counted in the floor: every conversion pays this import

from falcon_bridge.formats.hf import HFCheckpoint, ShardedSafetensorsWriter

if __name__ == "__main__":
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True)
    ckpt = HFCheckpoint(src)
    plan = [(n, i.shape, i.dtype) for n, i in ckpt.tensors.items()]
    writer = ShardedSafetensorsWriter(out, plan, 5 * 10**9)
    for name, *_ in plan:
        writer.put(name, ckpt.get(name))
    writer.close()
