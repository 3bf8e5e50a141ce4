"""Writing side of import-hf and reshard: map entries → Megatron torch_dist, one entry in memory at a time."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from falcon_bridge.core.mapping import Ctx, Entry, megatron_extra_state_keys
from falcon_bridge.formats import megatron as mg


class MegatronSink:
    """The checkpoint keys of `plan` at `ctx`'s layout, and the streaming write of them.

    `hf_tensors(entry)` gives an entry's HF tensors when DCP first asks for one of its keys; the entry's Megatron
    pieces are kept until DCP moves on to the next entry (it asks for an entry's keys one after another).
    """

    def __init__(self, ctx: Ctx, plan: list[Entry], dtype_of: Callable[[Entry], torch.dtype]):
        self.ctx, self.plan = ctx, plan
        self.shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self._owner: dict[str, Entry] = {}
        for e in plan:
            for key, shape in e.megatron_keys(ctx).items():
                self.shapes[key], self._owner[key] = (shape, dtype_of(e)), e

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.shapes.values())

    def write(self, it_dir: Path, hf_tensors: Callable[[Entry], list[torch.Tensor]],
              progress: Callable[[int, int, str], None] | None = None, common_state: dict | None = None) -> None:
        current: dict = {"entry": None, "pieces": {}, "done": 0}

        def produce(key: str) -> torch.Tensor:
            e = self._owner[key]
            if current["entry"] is not e:
                current["entry"] = e
                current["pieces"] = e.transform.to_megatron(self.ctx, *hf_tensors(e))
                current["done"] += 1
                if progress:
                    progress(current["done"], len(self.plan), e.megatron)
            return current["pieces"][key[len(e.megatron):]].to(self.shapes[key][1]).contiguous()

        mg.write_torch_dist(it_dir, self.shapes, produce,
                            objects=dict.fromkeys(megatron_extra_state_keys(self.ctx.arch)), common_state=common_state)
