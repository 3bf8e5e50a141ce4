"""create-random: an HF Falcon-H1 checkpoint of a card's exact shape with random but realistic weights, streamed."""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.mapping import hf_tensor_shapes
from falcon_bridge.formats.cards import Card
from falcon_bridge.formats.hf import ShardedSafetensorsWriter, write_config
from falcon_bridge.converters.output import atomic_output_dir
from falcon_bridge.formats.tokenizer import build_tokenizer

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def random_tensor(name: str, shape: tuple[int, ...], arch: FalconH1Arch, seed: int) -> torch.Tensor:
    """One tensor, fp32, reproducible from (seed, name) alone so the order of generation does not matter.

    Values are kept away from the trivial initial ones (norms ≠ 1, A_log ≠ log(1..n), D ≠ 1, dt_bias ≠ 1) so that
    a misplaced or dropped tensor changes the logits.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 2)[-2] if name.endswith((".weight", ".bias")) else name.rsplit(".", 1)[-1]
    if leaf in ("input_layernorm", "pre_ff_layernorm", "final_layernorm", "norm"):
        return 1.0 + 0.2 * torch.randn(shape, generator=g)
    if leaf == "A_log":
        return torch.empty(shape).uniform_(1.0, 16.0, generator=g).log()
    if leaf == "dt_bias":  # softplus⁻¹ of a time step drawn log-uniformly in [1e-3, 0.1], as Mamba-2 initializes it
        dt = torch.empty(shape).uniform_(math.log(1e-3), math.log(0.1), generator=g).exp()
        return dt + torch.log(-torch.expm1(-dt))
    if leaf == "D":
        return torch.empty(shape).uniform_(0.5, 1.5, generator=g)
    if leaf == "conv1d":
        bound = 1.0 / math.sqrt(arch.mamba_d_conv)
        return torch.empty(shape).uniform_(-bound, bound, generator=g)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=g)
    if leaf == "embed_tokens":
        return torch.randn(shape, generator=g)
    return torch.randn(shape, generator=g) / math.sqrt(shape[-1])  # linear layers: unit-variance outputs


def create_random(card: Card, out: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                  progress: Callable[[int, int, str], None] | None = None, argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    arch = card.arch
    shapes = hf_tensor_shapes(arch)
    options = {"card": card.name, "seed": seed, "dtype": str(dtype), "max_shard_bytes": max_shard_bytes}
    total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    with atomic_output_dir(out, overwrite, total, {"name": "create-random", "argv": argv, "options": options}) as tmp:
        writer = ShardedSafetensorsWriter(tmp, [(n, s, dtype) for n, s in shapes.items()], max_shard_bytes)
        for i, (name, shape) in enumerate(shapes.items()):
            writer.put(name, random_tensor(name, shape, arch, seed).to(dtype))
            if progress:
                progress(i + 1, len(shapes), name)
        writer.close()
        write_config(tmp, arch, dtype)
        tokenizer = build_tokenizer(arch, tmp)
    return {"command": "create-random", "card": card.name, "output": str(out), "seed": seed,
            "dtype": str(dtype).removeprefix("torch."), "tensors": len(shapes),
            "parameters": sum(math.prod(s) for s in shapes.values()), "files": writer.file_names,
            "tokenizer_files": tokenizer,
            "seconds": round(time.perf_counter() - t0, 2)}
