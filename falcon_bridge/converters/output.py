"""Atomic output directories: everything is written beside OUT and swapped into place only when complete.

A run writes into a partial directory `.falcon-bridge-partial-<name>.<random>` beside OUT; beside that directory,
`<partial>.owner.json` records the run (host, pid, process start time, OUT in one spelling: its parent resolved)
from before the directory exists until the run has finished with it. A complete output replaces an existing OUT by
one atomic exchange of the two directories (Linux renameat2 RENAME_EXCHANGE), after which the partial path holds
the previous output and is removed; OUT is never missing and a reader sees the old or the new output. Where the
filesystem cannot exchange, the old OUT is renamed to the partial path recorded in the owner record first.

Another run for the same OUT acts on these records: a live owner of this host makes it refuse to start; a dead one
(a SIGKILLed run, a power cut) left either an unfinished or finished new directory, or the previous output after the
exchange — both are garbage once OUT is complete — so it removes the directory and the record, and where a
non-exchanging swap was cut between its two renames it renames the previous output back to OUT. Partial
directories without a record, for another OUT, or from another host are never touched.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import secrets
import shutil
import socket
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from falcon_bridge.errors import BadInput
from falcon_bridge.formats.manifest import BackgroundHashes, write_manifest

TMP_MARK = ".falcon-bridge-partial-"
OWNER_SUFFIX = ".owner.json"
DISK_MARGIN_BYTES = 64 * 1024**2  # metadata, configs, filesystem slack


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a process (tells a live owner from a later process reusing its pid)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def output_identity(out: Path) -> Path:
    """OUT in one spelling: `x/../out`, `out` and a path through a symlinked parent are the same output."""
    out = Path(out).absolute()
    return out.parent.resolve() / out.name if out.name not in ("", ".", "..") else out.resolve()


def owner_record_path(partial: Path) -> Path:
    return partial.with_name(partial.name + OWNER_SUFFIX)


def _owner_record(out: Path) -> dict:
    return {"out": str(output_identity(out)), "host": socket.gethostname(), "pid": os.getpid(),
            "started": _process_start(os.getpid())}


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


def _records_for(out: Path) -> Iterable[tuple[Path, dict]]:
    """(partial directory, owner record) of every record beside OUT that names this OUT."""
    for record_file in out.parent.glob(f"{TMP_MARK}*{OWNER_SUFFIX}"):
        try:
            if record_file.is_symlink() or not record_file.is_file() or record_file.stat().st_size > 4096:
                continue
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("out") == str(output_identity(out)):
            yield record_file.with_name(record_file.name[:-len(OWNER_SUFFIX)]), record


def _claim_partial_dirs(out: Path) -> None:
    """Refuse when a live run writes OUT; finish what dead runs of this host left for OUT (see the module
    docstring): restore a previous output a two-rename swap left aside, remove the rest."""
    for partial, record in _records_for(out):
        alive = _owner_alive(record)
        if alive:
            raise BadInput(f"{out}: another falcon-bridge run (pid {record['pid']}) is writing it; wait for it to "
                           "finish or stop it")
        if alive is False:
            if record.get("previous_output_aside") and not out.exists() and partial.is_dir():
                partial.rename(out)
            for leftover in (partial, _renamed_new(partial)):
                shutil.rmtree(leftover, ignore_errors=True)
            owner_record_path(partial).unlink(missing_ok=True)


MAX_INPUT_ENTRIES = 1_000_000  # a source tree this large is not a checkpoint; walking it would only take time


def _read_targets(src: Path) -> Iterable[Path]:
    """What reading `src` can reach: `src` itself and, inside a directory, where each symbolic link leads (the
    Hugging Face cache's snapshot directory is symlinks into `blobs/`; an iteration directory may be a link)."""
    yield src.resolve()
    if not src.is_dir():
        return
    seen = 0
    for top, dirs, files in os.walk(src):  # links are reported, not followed
        for name in dirs + files:
            seen += 1
            if seen > MAX_INPUT_ENTRIES:
                raise BadInput(f"{src}: more than {MAX_INPUT_ENTRIES} entries; not a checkpoint directory")
            path = Path(top) / name
            if path.is_symlink():
                yield path.resolve()


def refuse_overlap(out: Path, inputs: Iterable[Path]) -> None:
    """OUT must not be, lie inside, or contain anything the run reads — the inputs and whatever their symbolic links
    lead to: replacing OUT would destroy it."""
    o = Path(out).resolve()
    for src in inputs:
        for s in _read_targets(Path(src)):
            if o == s or s in o.parents or o in s.parents:
                via = "" if s == Path(src).resolve() else f" (through a symbolic link to {s})"
                raise BadInput(f"{out}: overlaps the input {src}{via} (the output may not be an input, lie inside "
                               "one, or contain one)")


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
                      sources: BackgroundHashes | None = None, inputs: Iterable[Path] = (),
                      hashed: dict[str, dict] | None = None):
    """Yield a fresh partial directory beside `out`; on success a manifest is written into it and it replaces
    `out`; on any failure (an exception, a full disk, SIGINT/SIGTERM raised as errors.Interrupted) it is removed.
    `hashed`: output files already hashed by their writers (filled in while the caller writes), not hashed again.

    Refused before anything is written: OUT overlapping any of `inputs`, OUT a symlink or a file, an existing OUT
    without overwrite (with overwrite it is replaced only once the new output is complete), another live run
    writing OUT, too little free space for `expected_bytes`. `sources` (their hashes, still being computed) go into
    the manifest; on failure their hashing is cancelled.
    """
    out = Path(out).absolute()
    try:
        refuse_overlap(out, inputs)
        _claim_partial_dirs(out)  # first: it may put back the output a crashed swap left aside
        _check_target(out, overwrite)
        tmp = out.parent / f"{TMP_MARK}{out.name}.{secrets.token_hex(4)}"
        record = owner_record_path(tmp)
        try:  # the record first: whatever a crash leaves after this line, a later run can find
            with open(record, "x") as f:
                f.write(json.dumps(_owner_record(out)))
            tmp.mkdir()
        except OSError as e:
            record.unlink(missing_ok=True)
            raise BadInput(f"{out.parent}: cannot write the output here ({e.strerror})") from None
        try:
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
            write_manifest(tmp, command or {}, sources.result() if sources is not None else {}, hashed)
            with _signals_deferred():
                _move_into_place(tmp, out, overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # an unfinished output, or the previous one after a swap
            record.unlink(missing_ok=True)
    except BaseException:
        if sources is not None:
            sources.cancel()  # a failed or interrupted conversion does not wait for its sources' hashes
        raise


@contextmanager
def _signals_deferred():
    """SIGINT/SIGTERM wait until the swap is done (a Ctrl-C then reports an interrupted run whose output is
    nevertheless complete, instead of stopping between two renames)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the C library or the filesystem does not offer it (the caller falls back)."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    """tmp (complete) becomes OUT; with overwrite an existing OUT ends up at tmp, which the caller removes."""
    try:
        if out.exists() and overwrite:
            if not _renameat2(tmp, out, _RENAME_EXCHANGE):
                _swap_by_renames(tmp, out)
        elif not _renameat2(tmp, out, _RENAME_NOREPLACE):
            if out.exists():
                raise FileExistsError
            tmp.rename(out)
    except OSError:
        raise BadInput(f"{out}: appeared while this run was writing (another run?); it was left as it is") from None


def _swap_by_renames(tmp: Path, out: Path) -> None:
    """Where the filesystem cannot exchange: the complete output moves to `<tmp>.new`, the previous OUT to tmp,
    then `<tmp>.new` to OUT. OUT is missing between the last two renames, so the record says so first: a later run
    renames the previous output back if this one dies in between, and removes `<tmp>.new`."""
    record = owner_record_path(tmp)
    record.write_text(json.dumps(json.loads(record.read_text()) | {"previous_output_aside": True}))
    new = _renamed_new(tmp)
    tmp.rename(new)
    try:
        out.rename(tmp)
        try:
            new.rename(out)
        except OSError:
            tmp.rename(out)  # the previous output back in place
            raise
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _renamed_new(partial: Path) -> Path:
    return partial.with_name(partial.name + ".new")
