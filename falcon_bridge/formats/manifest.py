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


def hash_files(paths: Iterable[Path], stop: threading.Event | None = None) -> dict[str, str]:
    """path → sha256, a file per worker thread (hashlib releases the GIL on large blocks: the cores hash in
    parallel)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=HASH_WORKERS) as pool:
        return dict(zip(map(str, paths), pool.map(lambda p: sha256_file(p, stop=stop), paths)))


class BackgroundHashes:
    """The sha256 of a conversion's source files, computed on a background pool while the conversion reads them
    (instead of a second pass over them). result() waits for them; cancel() stops the hashing at its next block,
    so a failed or interrupted conversion does not wait for it before exiting."""

    def __init__(self, paths: Iterable[Path]):
        self._stop = threading.Event()
        starter = ThreadPoolExecutor(max_workers=1)
        self._future = starter.submit(hash_files, list(paths), self._stop)
        starter.shutdown(wait=False)

    def result(self) -> dict[str, str]:
        return self._future.result()

    def cancel(self) -> None:
        self._stop.set()


def hash_tree(root: Path) -> dict[str, dict]:
    """relative path → {sha256, bytes} for every file under root (the manifest itself excluded)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    digests = hash_files(files)
    return {str(p.relative_to(root)): {"sha256": digests[str(p)], "bytes": p.stat().st_size} for p in files}


def write_manifest(out_dir: Path, command: dict, sources: dict[str, str] | BackgroundHashes) -> None:
    manifest = {
        "tool": "falcon-bridge",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "sources": sources.result() if isinstance(sources, BackgroundHashes) else sources,  # file read → sha256
        "outputs": hash_tree(out_dir),
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def check_manifest(out_dir: Path) -> list[str]:
    """One line per problem: a file changed, missing, or not in the manifest. Empty when everything matches."""
    path = Path(out_dir) / MANIFEST_FILE
    if not path.exists():
        raise BadInput(f"{out_dir}: no {MANIFEST_FILE} (not written by falcon-bridge)")
    try:
        recorded = json.loads(path.read_text())["outputs"]
    except (json.JSONDecodeError, KeyError):
        raise BadInput(f"{path}: not a valid manifest") from None
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
