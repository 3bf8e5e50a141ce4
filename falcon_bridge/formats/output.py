"""Atomic output directories: everything is written beside OUT and renamed into place only when complete."""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from falcon_bridge.errors import BadInput
from falcon_bridge.formats.manifest import BackgroundHashes, write_manifest

TMP_MARK = ".falcon-bridge-partial-"
DISK_MARGIN_BYTES = 64 * 1024**2  # metadata, configs, filesystem slack


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, expected_bytes: int = 0, command: dict | None = None,
                      sources: BackgroundHashes | None = None):
    """Yield a fresh temporary directory beside `out`; on success a manifest is written into it and it replaces
    `out`; on any failure (an exception, a full disk) it is removed.

    An existing `out` is refused unless overwrite, and even then it is replaced only after the new output is
    complete. The free space beside `out` is checked against `expected_bytes` first. A leftover of an interrupted
    earlier run for the same target (named `.falcon-bridge-partial-<name>.<pid>`) is removed first. `sources`
    (their hashes, still being computed) go into the manifest; on failure their hashing is cancelled.
    """
    out = Path(out).absolute()
    try:
        if out.exists() and not overwrite:
            raise BadInput(f"{out}: already exists (pass --overwrite to replace it)")
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f"{TMP_MARK}{out.name}.*"):
            shutil.rmtree(stale, ignore_errors=True)
        free = shutil.disk_usage(out.parent).free
        if expected_bytes + DISK_MARGIN_BYTES > free:
            raise BadInput(f"{out.parent}: not enough disk space: the output needs about "
                           f"{(expected_bytes + DISK_MARGIN_BYTES) / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
        tmp = out.parent / f"{TMP_MARK}{out.name}.{os.getpid()}"
        tmp.mkdir()
        try:
            try:
                yield tmp
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise BadInput(f"{out.parent}: disk full while writing the output (nothing was left at "
                                   f"{out})") from None
                raise
            write_manifest(tmp, command or {}, sources.result() if sources is not None else {})
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
    except BaseException:
        if sources is not None:
            sources.cancel()  # a failed or interrupted conversion does not wait for its sources' hashes
        raise
