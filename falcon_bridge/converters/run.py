"""What every converter shares around its own work: the caller's progress callback and command line, the timing,
the atomic output directory and its manifest's command record, and the summary it returns.

A converter reads: `run = run.start()` → validate → `with run.output(XSummary.command, options, expected_bytes,
sources, inputs) as tmp:` write into tmp, reporting progress through `run.step` → `return XSummary(...,
seconds=run.seconds())`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar

import torch

from falcon_bridge.cards import Card
from falcon_bridge.converters.output import atomic_output_dir
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats.manifest import BackgroundHashes

Progress = Callable[[int, int, str], None]  # (done, total, current tensor)


def unrecorded(**kwargs) -> Any:
    """An options field the manifest does not record (where the output goes, whether it may replace one)."""
    return dataclasses.field(metadata={"record": False}, **kwargs)


def recorded_as(key: str, **kwargs) -> Any:
    """An options field the manifest records under another name (the one it has always used)."""
    return dataclasses.field(metadata={"key": key}, **kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Path | torch.dtype):
        return str(value)
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Card):  # by its name
        return value.name
    raise TypeError(f"{type(value).__name__}: no JSON form for the manifest")


def options_record(options: Any) -> dict[str, Any]:
    """An options dataclass as the manifest records it: JSON values (paths, dtypes and enums as strings, a card by
    its name), a MegatronLayout as its tp, pp and pp_layers."""
    record: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if not f.metadata.get("record", True):
            continue
        value = getattr(options, f.name)
        if isinstance(value, MegatronLayout):
            record |= {"tp": value.tp, "pp": value.pp, "pp_layers": _jsonable(value.pp_layers)}
        else:
            record[f.metadata.get("key", f.name)] = _jsonable(value)
    return record


@dataclasses.dataclass(frozen=True)
class Run:
    """The caller's side of a conversion: a progress callback and the command line to record. `start()` gives the
    copy a converter times itself with (the default, QUIET, is shared, so it holds no state)."""

    progress: Progress | None = None
    argv: list[str] | None = None
    started: float | None = None  # time.perf_counter() at start()

    def start(self) -> Run:
        return dataclasses.replace(self, started=time.perf_counter())

    def seconds(self) -> float:
        """Seconds since start(), as summaries report them."""
        assert self.started is not None, "Run.seconds() before Run.start()"
        return round(time.perf_counter() - self.started, 2)

    def step(self, done: int, total: int, item: str) -> None:
        if self.progress:
            self.progress(done, total, item)

    @contextmanager
    def output(self, name: str, options: Any, expected_bytes: int = 0, sources: BackgroundHashes | None = None,
               inputs: Iterable[Path] = (), hashed: dict[str, dict] | None = None) -> Iterator[Path]:
        """atomic_output_dir for `options.out` (replacing it only with `options.overwrite`); the manifest records
        the command `name`, the argv and `options` (pass them as resolved, e.g. the dtype actually stored)."""
        command = {"name": name, "argv": self.argv, "options": options_record(options)}
        with atomic_output_dir(options.out, options.overwrite, expected_bytes, command, sources, inputs,
                               hashed) as tmp:
            yield tmp


QUIET = Run()  # the converters' default: no progress callback, no command line recorded


@dataclasses.dataclass(frozen=True, kw_only=True)
class Summary:
    """What a converter returns. The JSON object the CLI prints: `command`, the converter's own fields in order,
    then `seconds` and `warnings` (printed on stderr too)."""

    command: ClassVar[str]
    seconds: float
    warnings: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        last = ("workers", "peak_rss_bytes", "seconds", "warnings")  # ParallelSummary's come after the command's own
        own = [f.name for f in dataclasses.fields(self) if f.name not in last]
        own += [name for name in last[:2] if hasattr(self, name)]
        return {"command": self.command, **{name: getattr(self, name) for name in own}, "seconds": self.seconds,
                "warnings": self.warnings}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelSummary(Summary):
    """A conversion shared by `workers` processes (converters/workers.py), with each one's peak resident memory."""

    workers: int
    peak_rss_bytes: list[int]
