"""Provenance: every output directory holds falcon_bridge_manifest.json (tool version, command and options, sha256
of every source file read, sha256 and size of every file written); `check` re-hashes against it."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from falcon_bridge import __version__
from falcon_bridge.errors import BadInput
from falcon_bridge.formats.untrusted import read_json

MANIFEST_FILE = "falcon_bridge_manifest.json"


HASH_WORKERS = min(16, os.cpu_count() or 2)  # each holds one 16 MiB block


class HashingCancelled(Exception):
    pass


def sha256_file(path: Path, chunk: int = 1 << 24, stop: threading.Event | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            if stop is not None and stop.is_set():
                raise HashingCancelled(str(path))
            h.update(block)
    return h.hexdigest()


class BackgroundHashes:
    """path → sha256 of files, hashed on a thread pool while the caller goes on (a file per thread: hashlib releases
    the GIL on large blocks, so the cores hash in parallel) — a conversion's sources are hashed while it reads
    them, instead of in a second pass. result() waits for them; cancel() stops the hashing at its next block, so a
    failed or interrupted conversion does not wait for it before exiting."""

    def __init__(self, paths: Iterable[Path]):
        self._stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=HASH_WORKERS)
        self._futures = [(str(p), pool.submit(sha256_file, p, stop=self._stop)) for p in paths]
        pool.shutdown(wait=False)

    def result(self) -> dict[str, str]:
        return {path: future.result() for path, future in self._futures}

    def cancel(self) -> None:
        self._stop.set()


def _kind(mode: int) -> str:
    return ("file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) else "symbolic link"
            if stat.S_ISLNK(mode) else "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device")


def tree_entries(root: Path, descend: Callable[[str], bool] = lambda rel: True) -> dict[str, str]:
    """relative path → kind ("file", "directory", "symbolic link", "FIFO", "socket", "device") of everything under
    root, the manifest itself excluded. Symbolic links are not followed; a directory is entered only where
    `descend(its relative path)`."""
    entries: dict[str, str] = {}
    for top, dirs, files in os.walk(root):
        rel_top = Path(top).relative_to(root)
        for name in dirs + files:
            entries[str(rel_top / name)] = _kind(os.lstat(Path(top) / name).st_mode)
        dirs[:] = [d for d in dirs if entries[str(rel_top / d)] == "directory" and descend(str(rel_top / d))]
    entries.pop(MANIFEST_FILE, None)
    return entries


def hash_tree(root: Path, entries: dict[str, str] | None = None, known: dict[str, dict] | None = None
              ) -> dict[str, dict]:
    """relative path → {sha256, bytes} for every regular file of `entries` (default: everything under root).
    `known`: files their writer hashed already (relative path → {sha256, bytes}), taken where the size agrees."""
    entries = tree_entries(root) if entries is None else entries
    known = known or {}
    sizes = {rel: (root / rel).stat().st_size for rel, kind in sorted(entries.items()) if kind == "file"}
    todo = [rel for rel, size in sizes.items() if known.get(rel, {}).get("bytes") != size]
    digests = BackgroundHashes([root / rel for rel in todo]).result()
    return {rel: known[rel] if rel not in todo else {"sha256": digests[str(root / rel)], "bytes": size}
            for rel, size in sizes.items()}


def write_manifest(out_dir: Path, command: dict, sources: dict[str, str], known: dict[str, dict] | None = None
                   ) -> None:
    """`known`: output files hashed by whoever wrote them (see hash_tree)."""
    manifest = {
        "tool": "falcon-bridge",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "sources": sources,  # file read → sha256
        "outputs": hash_tree(out_dir, known=known),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def check_manifest(out_dir: Path) -> list[str]:
    """One line per problem: a file changed, missing or no longer a regular file; anything the manifest does not
    list (a file, a directory none of its files is in, a symbolic link, FIFO, device or socket). Empty when
    everything matches."""
    path = Path(out_dir) / MANIFEST_FILE
    if not Path(out_dir).is_dir():
        raise BadInput(f"{out_dir}: no such directory")
    if not path.exists():
        raise BadInput(f"{out_dir}: no {MANIFEST_FILE} (not written by falcon-bridge)")
    recorded = read_json(path, "manifest").get("outputs")
    if not isinstance(recorded, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("sha256"), str) and type(r.get("bytes")) is int
            for r in recorded.values()):
        raise BadInput(f"{path}: field outputs: expected an object of file → {{sha256, bytes}}")
    listed_dirs = {str(parent) for name in recorded for parent in Path(name).parents if parent != Path(".")}
    entries = tree_entries(Path(out_dir), descend=lambda rel: rel in listed_dirs)
    actual = hash_tree(Path(out_dir), {rel: kind for rel, kind in entries.items() if rel in recorded})
    problems = []
    for name, rec in recorded.items():
        got = actual.get(name)
        if name not in entries:
            problems.append(f"{name}: missing")
        elif got is None:
            problems.append(f"{name}: a {entries[name]}, not the regular file the manifest records")
        elif got != rec:
            problems.append(f"{name}: " + ("size differs" if got["bytes"] != rec["bytes"] else "sha256 differs"))
    problems += [f"{name}: {kind} not in the manifest" for name, kind in entries.items()
                 if name not in recorded and not (kind == "directory" and name in listed_dirs)]
    return problems
