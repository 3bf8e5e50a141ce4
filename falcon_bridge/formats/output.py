"""Atomic output directories: everything is written beside OUT and renamed into place only when complete."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from falcon_bridge.errors import BadInput

TMP_MARK = ".falcon-bridge-partial-"


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False):
    """Yield a fresh temporary directory beside `out`; on success it replaces `out`, on any failure it is removed.

    An existing `out` is refused unless overwrite, and even then it is replaced only after the new output is
    complete. Leftovers of an interrupted earlier run (same mark, same target) are removed first.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise BadInput(f"{out}: already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{TMP_MARK}{out.name}.*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{TMP_MARK}{out.name}.{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.parent / f"{TMP_MARK}{out.name}.old.{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
