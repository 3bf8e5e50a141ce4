"""Provenance: every output directory holds falcon_bridge_manifest.json (tool version, command and options, sha256
of every source file read, sha256 and size of every file written); `check` re-hashes against it."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from falcon_bridge import __version__
from falcon_bridge.errors import BadInput

MANIFEST_FILE = "falcon_bridge_manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_files(paths: Iterable[Path]) -> dict[str, str]:
    """path → sha256, one file per worker thread (hashlib releases the GIL on large blocks: all cores hash)."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return dict(zip(map(str, paths), pool.map(sha256_file, paths)))


def hash_files_in_background(paths: Iterable[Path]) -> Future:
    """Start hash_files(paths) and return at once (a Future of its dict): a conversion hashes its sources while
    it converts them, instead of in a second pass over them."""
    starter = ThreadPoolExecutor(max_workers=1)
    try:
        return starter.submit(hash_files, list(paths))
    finally:
        starter.shutdown(wait=False)


def hash_tree(root: Path) -> dict[str, dict]:
    """relative path → {sha256, bytes} for every file under root (the manifest itself excluded)."""
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_FILE]
    digests = hash_files(files)
    return {str(p.relative_to(root)): {"sha256": digests[str(p)], "bytes": p.stat().st_size} for p in files}


def write_manifest(out_dir: Path, command: dict, sources: dict[str, str] | Future) -> None:
    manifest = {
        "tool": "falcon-bridge",
        "version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "sources": sources.result() if isinstance(sources, Future) else sources,  # file read → sha256
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
