"""Atomic output directories: everything is written beside OUT and renamed into place only when complete.

A run writes into a partial directory `.falcon-bridge-partial-<name>.<random>` beside OUT that holds an owner
record (host, pid, process start time, OUT) while it is written. Another run for the same OUT removes a partial
directory only when its record names exactly that OUT and a process of this host that is no longer running (a
SIGKILLed run); a live owner makes it refuse to start; partial directories without a record, for another OUT, or
from another host are never touched.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from falcon_bridge.errors import BadInput
from falcon_bridge.formats.manifest import BackgroundHashes, write_manifest

TMP_MARK = ".falcon-bridge-partial-"
OWNER_FILE = ".falcon-bridge-owner.json"
DISK_MARGIN_BYTES = 64 * 1024**2  # metadata, configs, filesystem slack


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a live owner from a later process reusing its pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_record(out: Path) -> dict:
    return {"out": str(out), "host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _owner_alive(record: dict) -> bool | None:
    """True/False for an owner on this host; None (unknown) for one on another host."""
    if record.get("host") != socket.gethostname():
        return None
    pid = record.get("pid")
    if type(pid) is not int or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    started = _process_start(pid)
    return started is None or record.get("started") in (None, started)


def _partial_dirs_for(out: Path) -> Iterable[tuple[Path, dict]]:
    """(directory, owner record) of every partial directory beside OUT whose record names exactly OUT."""
    for path in out.parent.glob(f"{TMP_MARK}*"):
        record_file = path / OWNER_FILE
        try:
            if path.is_symlink() or not path.is_dir() or not record_file.is_file() \
                    or record_file.stat().st_size > 4096:
                continue
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("out") == str(out):
            yield path, record


def _claim_partial_dirs(out: Path) -> None:
    """Refuse when a live run writes OUT; remove what dead runs of this host left for OUT."""
    for path, record in _partial_dirs_for(out):
        alive = _owner_alive(record)
        if alive:
            raise BadInput(f"{out}: another falcon-bridge run (pid {record['pid']}) is writing it; wait for it to "
                           "finish or stop it")
        if alive is False:
            shutil.rmtree(path, ignore_errors=True)


def refuse_overlap(out: Path, inputs: Iterable[Path]) -> None:
    """OUT must not be, lie inside, or contain anything the run reads: replacing OUT would destroy it."""
    o = Path(out).resolve()
    for src in inputs:
        s = Path(src).resolve()
        if o == s or s in o.parents or o in s.parents:
            raise BadInput(f"{out}: overlaps the input {src} (the output may not be an input, lie inside one, or "
                           "contain one)")


def _check_target(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise BadInput(f"{out}: is a symbolic link; give the real output path")
    if out.exists():
        if not out.is_dir():
            raise BadInput(f"{out}: exists and is not a directory")
        if not overwrite:
            raise BadInput(f"{out}: already exists (pass --overwrite to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"{out.parent}: cannot create the output's parent directory ({e.strerror})") from None


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, expected_bytes: int = 0, command: dict | None = None,
                      sources: BackgroundHashes | None = None, inputs: Iterable[Path] = ()):
    """Yield a fresh partial directory beside `out`; on success a manifest is written into it and it replaces
    `out`; on any failure (an exception, a full disk, SIGINT/SIGTERM raised as errors.Interrupted) it is removed.

    Refused before anything is written: OUT overlapping any of `inputs`, OUT a symlink or a file, an existing OUT
    without overwrite (with overwrite it is replaced only once the new output is complete), another live run
    writing OUT, too little free space for `expected_bytes`. `sources` (their hashes, still being computed) go into
    the manifest; on failure their hashing is cancelled.
    """
    out = Path(out).absolute()
    try:
        refuse_overlap(out, inputs)
        _check_target(out, overwrite)
        _claim_partial_dirs(out)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{out.name}.", dir=out.parent))
        except OSError as e:
            raise BadInput(f"{out.parent}: cannot write the output here ({e.strerror})") from None
        try:
            (tmp / OWNER_FILE).write_text(json.dumps(_owner_record(out)))
            free = shutil.disk_usage(out.parent).free
            if expected_bytes + DISK_MARGIN_BYTES > free:
                raise BadInput(f"{out.parent}: not enough disk space: the output needs about "
                               f"{(expected_bytes + DISK_MARGIN_BYTES) / 1e9:.2f} GB, {free / 1e9:.2f} GB free")
            try:
                yield tmp
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise BadInput(f"{out.parent}: disk full while writing the output (nothing was left at "
                                   f"{out})") from None
                raise
            (tmp / OWNER_FILE).unlink()  # from here on, no other run touches tmp: it has no owner record
            write_manifest(tmp, command or {}, sources.result() if sources is not None else {})
            _move_into_place(tmp, out, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        if sources is not None:
            sources.cancel()  # a failed or interrupted conversion does not wait for its sources' hashes
        raise


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if out.exists() and overwrite:
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{out.name}.old.", dir=out.parent))
        old.rmdir()
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
        return
    try:
        if out.exists():
            raise FileExistsError
        tmp.rename(out)
    except OSError:
        raise BadInput(f"{out}: appeared while this run was writing (another run?); it was left as it is") from None
