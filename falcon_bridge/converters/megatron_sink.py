"""Writing side of import-hf and reshard: map entries → Megatron torch_dist, one entry in memory at a time."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from falcon_bridge.core.mapping import Ctx, Entry, megatron_extra_state_keys
from falcon_bridge.formats import megatron as mg


class MegatronSink:
    """The checkpoint keys of `plan` at `ctx`'s layout, and the streaming write of them.

    `hf_tensors(entry)` gives an entry's HF tensors when DCP first asks for one of its keys; the entry's Megatron
    pieces are kept until DCP moves on to the next entry (it asks for an entry's keys one after another).
    `entry_bytes` is what balances the entries over workers (`converters/workers.balanced_shares`).
    """

    def __init__(self, ctx: Ctx, plan: list[Entry], dtype_of: Callable[[Entry], torch.dtype]):
        self.ctx, self.plan = ctx, plan
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._owner: dict[str, Entry] = {}
        for e in plan:
            for key, shape in e.megatron_keys(ctx).items():
                self.shapes[key], self._owner[key] = (shape, dtype_of(e)), e

    def entry_bytes(self) -> list[int]:
        """Bytes each entry of the plan writes, in plan order."""
        sizes = dict.fromkeys(map(id, self.plan), 0)
        for key, (shape, dtype) in self.shapes.items():
            sizes[id(self._owner[key])] += math.prod(shape) * dtype.itemsize
        return list(sizes.values())

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.shapes.values())

    def write(self, it_dir: Path, hf_tensors: Callable[[Entry], list[torch.Tensor]],
              step: Callable[[str], None] | None = None, common_state: dict | None = None,
              share: Sequence[Entry] | None = None, distributed: bool = False) -> dict[str, dict]:
        """Write the keys of `share` (default: every entry), calling `step(entry name)` as each entry is made; one
        of several ranks writing the checkpoint together passes `distributed` and its share. Returns the files
        written, hashed (path relative to it_dir's parent → {sha256, bytes})."""
        current: dict = {"entry": None, "pieces": {}}

        def produce(key: str) -> torch.Tensor:
            e = self._owner[key]
            if current["entry"] is not e:
                current["entry"] = e
                current["pieces"] = e.transform.to_megatron(self.ctx, *hf_tensors(e))
                if step:
                    step(e.megatron)
            return current["pieces"][key[len(e.megatron):]].to(self.shapes[key][1]).contiguous()

        mine = {id(e) for e in (self.plan if share is None else share)}
        shapes = {key: shape for key, shape in self.shapes.items() if id(self._owner[key]) in mine}
        hashed = mg.write_torch_dist(it_dir, shapes, produce,
                                     objects=dict.fromkeys(megatron_extra_state_keys(self.ctx.arch)),
                                     common_state=common_state, distributed=distributed)
        return {f"{it_dir.name}/{name}": digest for name, digest in hashed.items()}
