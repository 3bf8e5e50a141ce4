"""create-random: an HF Falcon-H1 checkpoint of a card's exact shape with random but realistic weights, streamed."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from falcon_bridge.cards import Card
from falcon_bridge.converters.run import QUIET, Run, Summary, unrecorded
from falcon_bridge.converters.tokenizer import build_tokenizer
from falcon_bridge.core.choices import CREATE_RANDOM_DTYPE, CREATE_RANDOM_MAX_SHARD_BYTES
from falcon_bridge.core.config import Arch
from falcon_bridge.core.mapping import hf_rule, hf_tensor_shapes, num_parameters
from falcon_bridge.errors import BadInput, shown
from falcon_bridge.formats.hf import ShardedSafetensorsWriter, check_max_shard_bytes, write_config

SEED_STRIDE = 1_000_003  # a tensor's generator seed: seed × SEED_STRIDE + crc32(its name)
# torch.Generator.manual_seed takes -2**63 … 2**64 - 1
SEED_RANGE = (-(2**63 // SEED_STRIDE), (2**64 - 1 - 0xFFFF_FFFF) // SEED_STRIDE)


def random_tensor(name: str, shape: tuple[int, ...], arch: Arch, seed: int) -> torch.Tensor:
    """One tensor, fp32, initialised as its rule in the map says, reproducible from (seed, name) alone so the order
    of generation does not matter."""
    g = torch.Generator().manual_seed(seed * SEED_STRIDE + zlib.crc32(name.encode()))
    return hf_rule(arch, name)[1].init(shape, g, arch)


@dataclass(frozen=True)
class CreateRandomOptions:
    """card: the shape to write (the manifest records its name); out: the HF directory to write."""

    card: Card
    out: Path = unrecorded()
    seed: int = 0
    dtype: torch.dtype = CREATE_RANDOM_DTYPE.torch
    max_shard_bytes: int = CREATE_RANDOM_MAX_SHARD_BYTES
    overwrite: bool = unrecorded(default=False)


@dataclass(frozen=True)
class CreateRandomSummary(Summary):
    command: ClassVar[str] = "create-random"
    card: str
    output: str
    seed: int
    dtype: str
    tensors: int
    parameters: int
    files: list[str]
    tokenizer_files: list[str]


def create_random(options: CreateRandomOptions, run: Run = QUIET) -> CreateRandomSummary:
    run = run.start()
    arch, dtype = options.card.arch, options.dtype
    if type(options.seed) is not int or not SEED_RANGE[0] <= options.seed <= SEED_RANGE[1]:
        raise BadInput(f"--seed {shown(options.seed)}: expected an integer from {SEED_RANGE[0]:,} to "
                       f"{SEED_RANGE[1]:,}")
    check_max_shard_bytes(options.max_shard_bytes)
    parameters = num_parameters(arch)
    hashed: dict[str, dict] = {}  # the shards, hashed as written: the manifest does not read them back
    with run.output(CreateRandomSummary.command, options, parameters * dtype.itemsize, hashed=hashed) as tmp:
        shapes = hf_tensor_shapes(arch)  # first now: it loops over the layers
        writer = ShardedSafetensorsWriter(tmp, [(n, s, dtype) for n, s in shapes.items()], options.max_shard_bytes,
                                          hash_as_written=True)
        for i, (name, shape) in enumerate(shapes.items()):
            writer.put(name, random_tensor(name, shape, arch, options.seed).to(dtype))
            run.step(i + 1, len(shapes), name)
        writer.close()
        hashed.update(writer.hashed)
        write_config(tmp, arch, dtype)
        tokenizer = build_tokenizer(arch, tmp)
    return CreateRandomSummary(
        card=options.card.name, output=str(options.out), seed=options.seed, dtype=str(dtype).removeprefix("torch."),
        tensors=len(shapes), parameters=parameters, files=writer.file_names,
        tokenizer_files=tokenizer, seconds=run.seconds(), warnings=options.card.unverified_warning())
