"""Provenance: every output directory holds falcon_bridge_manifest.json (tool version, command and options, sha256
of every source file read, sha256 and size of every file written); `check` re-hashes against it."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from falcon_bridge import __version__
from falcon_bridge.errors import BadInput
from falcon_bridge.formats.untrusted import read_json

MANIFEST_FILE = "falcon_bridge_manifest.json"


HASH_WORKERS = min(8, os.cpu_count() or 2)  # each holds one 16 MiB block


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


def hash_tree(root: Path) -> dict[str, dict]:
    """relative path → {sha256, bytes} for every file under root (the manifest itself excluded)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    digests = BackgroundHashes(files).result()
    return {str(p.relative_to(root)): {"sha256": digests[str(p)], "bytes": p.stat().st_size} for p in files}


def write_manifest(out_dir: Path, command: dict, sources: dict[str, str]) -> None:
    manifest = {
        "tool": "falcon-bridge",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "sources": sources,  # file read → sha256
        "outputs": hash_tree(out_dir),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def check_manifest(out_dir: Path) -> list[str]:
    """One line per problem: a file changed, missing, or not in the manifest. Empty when everything matches."""
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
    actual = hash_tree(Path(out_dir))
    problems = []
    for name, rec in recorded.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"{name}: missing")
        elif got != rec:
            problems.append(f"{name}: " + ("size differs" if got["bytes"] != rec["bytes"] else "sha256 differs"))
    problems += [f"{name}: not in the manifest" for name in actual if name not in recorded]
    return problems
