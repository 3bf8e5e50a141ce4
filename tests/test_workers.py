"""Parallel conversion (converters/workers.py): the same tensors for every worker count and under torchrun, the same
bytes run to run, and a worker that fails, dies or is interrupted fails the whole run with one line and leaves
nothing at OUT."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import edited_megatron_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st

from falcon_bridge.converters import workers
from falcon_bridge.converters.output import TMP_MARK
from falcon_bridge.converters.workers import balanced_shares, default_workers
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.manifest import MANIFEST_FILE, check_manifest

CARD = "tiny-groups-gated-norm"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def cli(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env or ENV)


def ok(*args) -> dict:
    done = cli(*args, "--json")
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return json.loads(done.stdout)


def tensors_of(ckpt: Path) -> dict[str, torch.Tensor]:
    reader = mg.TorchDistReader(ckpt / mg.iteration_dir_name(0))
    return {key: reader.get(key) for key in reader.tensors}


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST_FILE}


def nothing_left(parent: Path, out: Path) -> bool:
    return not out.exists() and not list(parent.glob(f"{TMP_MARK}*"))


@pytest.fixture(scope="module")
def src(tiny_hf):
    return tiny_hf[CARD]


def test_every_worker_count_gives_the_same_tensors_and_bytes(src, tmp_path):
    imported = {}
    for n in (1, 2, 3):
        summary = ok("import-hf", src, tmp_path / f"mg{n}", "--workers", n)
        assert summary["workers"] == n and len(summary["peak_rss_bytes"]) == n
        manifest = json.loads((tmp_path / f"mg{n}" / MANIFEST_FILE).read_text())
        assert manifest["command"]["options"]["workers"] == n
        assert check_manifest(tmp_path / f"mg{n}") == []
        imported[n] = tensors_of(tmp_path / f"mg{n}")
    assert len(list((tmp_path / "mg3" / "iter_0000000").glob("__2_*.distcp"))) > 0  # rank 2 wrote its share
    for n in (2, 3):
        assert imported[n].keys() == imported[1].keys()
        for key, t in imported[1].items():
            assert torch.equal(imported[n][key], t), (n, key)
    ok("import-hf", src, tmp_path / "mg3-again", "--workers", 3)
    assert files_of(tmp_path / "mg3-again") == files_of(tmp_path / "mg3")  # same N: the same bytes

    ok("reshard", tmp_path / "mg3", tmp_path / "pp2", "--pp", 2, "--workers", 2)
    assert all(torch.equal(t, imported[1][k]) for k, t in tensors_of(tmp_path / "pp2").items())
    exported = {}
    for n, ckpt in ((1, "mg1"), (2, "pp2"), (3, "mg3")):  # several shards: workers write into the same files
        summary = ok("export-hf", tmp_path / ckpt, tmp_path / f"hf{n}", "--workers", n, "--max-shard-size", 200_000)
        assert summary["workers"] == n and len(summary["files"]) > 2
        exported[n] = files_of(tmp_path / f"hf{n}")
        assert check_manifest(tmp_path / f"hf{n}") == []
    assert exported[2] == exported[1] and exported[3] == exported[1]  # every file, the index among them


def test_a_checkpoint_written_by_three_workers_loads_in_megatron(src, tmp_path):
    ok("import-hf", src, tmp_path / "mg", "--workers", 3, "--tp", 2)
    done = cli("verify", src, tmp_path / "mg", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["passed"], (done.stdout + done.stderr)[-4000:]


def readme_workers_example() -> list[str]:
    """The command lines of README's parallel-conversion example (the fenced block after its marker)."""
    text = (Path(__file__).parents[1] / "README.md").read_text()
    return text.split("<!-- workers-example", 1)[1].split("```", 2)[1].strip().splitlines()


def test_readme_workers_example_runs_as_shown_two_torchrun_agents(tmp_path):
    """README's lines, run in order; a line ending in `&` runs in the background (README's two torchrun agents,
    "nodes" 0 and 1, one of them started in the background here, on its own host there) — with a free port
    instead of README's, so a busy port cannot fail the test."""
    port = str(workers_free_port())
    background = []
    for line in readme_workers_example():
        words = [port if w == "29400" else w for w in shlex.split(line.removesuffix("&"))]
        assert words[0] in ("falcon-bridge", "torchrun"), line
        if words[0] == "falcon-bridge":
            words[0] = str(BIN / "falcon-bridge")
        proc = subprocess.Popen(words, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        if line.rstrip().endswith("&"):
            background.append(proc)
            continue
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, (line, out[-4000:])
    for proc in background:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
    written = sorted(p.name for p in (tmp_path / "mg-pp2" / "iter_0000000").glob("__*_0.distcp"))
    assert written == ["__0_0.distcp", "__1_0.distcp"]  # both agents wrote
    ok("import-hf", tmp_path / "hf", tmp_path / "reference")
    reference = tensors_of(tmp_path / "reference")
    for ckpt in ("mg", "mg-pp2"):
        assert all(torch.equal(t, reference[k]) for k, t in tensors_of(tmp_path / ckpt).items()), ckpt
    assert json.loads((tmp_path / "mg-pp2" / MANIFEST_FILE).read_text())["command"]["options"]["workers"] == 2


def workers_free_port() -> int:
    from falcon_bridge.megatron.distributed import free_port

    return free_port()


def test_workers_under_torchrun_and_bad_counts_are_refused_in_one_line(src, tmp_path):
    for bad in ("0", "-2"):
        done = cli("import-hf", src, tmp_path / "out", "--workers", bad)
        assert done.returncode == 2 and done.stderr.strip() == \
            f"error: --workers {bad}: expected a positive integer", done.stderr
    torchrun_env = {**ENV, "TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}
    done = cli("import-hf", src, tmp_path / "out", "--workers", "2", env=torchrun_env)
    assert done.returncode == 2 and "--workers 2: under torchrun every process is one worker" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and nothing_left(tmp_path, tmp_path / "out")


# A conversion run through the CLI's main() in a fresh process, with `HFCheckpoint.get` (import-hf's read of each
# HF tensor) or os.pwrite (export-hf's write) patched to misbehave in the worker processes (pid ≠ the leader's) or,
# for `leader-sigterm`, in the leader. argv[1] is a marker every forked worker's command line carries too.
FAULTY_RUN = """
import errno, os, signal, sys
from falcon_bridge.cli import app
from falcon_bridge.formats import hf
fault, leader = sys.argv[2], os.getpid()
original_get, original_pwrite = hf.HFCheckpoint.get, os.pwrite

def get(self, name):
    if fault == "worker-sigkill" and os.getpid() != leader:
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "worker-raises" and os.getpid() != leader:
        raise RuntimeError("injected failure")
    if fault == "leader-sigterm" and os.getpid() == leader and name.startswith("model.layers.2."):
        os.kill(leader, signal.SIGTERM)
    return original_get(self, name)

def pwrite(fd, data, offset):
    if fault == "worker-disk-full" and os.getpid() != leader:
        raise OSError(errno.ENOSPC, "No space left on device")
    return original_pwrite(fd, data, offset)

hf.HFCheckpoint.get, os.pwrite = get, pwrite
sys.argv = ["falcon-bridge", *sys.argv[3:]]
app.main()
"""


def processes_with(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("fault,command,expected,code", [
    ("worker-sigkill", "import-hf", r"error: worker \d \(pid \d+\) was killed by SIGKILL; nothing was left at the "
                                    r"output", 2),
    ("worker-raises", "import-hf", r"error: worker \d: RuntimeError: injected failure", 2),
    ("worker-disk-full", "export-hf", r"error: disk full while writing the output", 2),
    ("leader-sigterm", "import-hf", r"error: interrupted \(SIGTERM\); no partial output was left", 128 + 15),
])
def test_a_failing_dying_or_interrupted_worker_fails_the_run_in_one_line(src, tmp_path, fault, command, expected,
                                                                         code):
    if command == "export-hf":
        ok("import-hf", src, tmp_path / "mg")
        source = tmp_path / "mg"
    else:
        source = src
    marker = f"falcon-bridge-test-{fault}-{os.getpid()}-{time.monotonic_ns()}"
    done = subprocess.run([sys.executable, "-c", FAULTY_RUN, marker, fault, command, str(source),
                           str(tmp_path / "out"), "--workers", "3"], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert done.returncode == code, done.stderr[-4000:]
    assert re.fullmatch(expected, done.stderr.strip()), done.stderr[-4000:]
    assert nothing_left(tmp_path, tmp_path / "out")
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:  # a killed worker's siblings are reaped
        time.sleep(0.1)
    assert processes_with(marker) == []


def test_a_worker_that_finds_bad_input_names_it(src, tmp_path):
    def poison(tensors):
        for key in [k for k in tensors if k.endswith("mamba_mixer.out_proj.weight")]:  # one in every layer
            tensors[key][0, 0] = float("nan")

    ok("import-hf", src, tmp_path / "mg")
    ckpt = edited_megatron_checkpoint(tmp_path / "mg", tmp_path / "poisoned", poison)
    done = cli("export-hf", ckpt, tmp_path / "out", "--workers", "3")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-3000:]
    assert re.search(r"tensor decoder\.layers\.\d+\.mamba_mixer\.out_proj\.weight holds NaN or Inf values",
                     done.stderr)
    assert nothing_left(tmp_path, tmp_path / "out")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 10**9), max_size=60), st.integers(1, 17))
def test_balanced_shares_split_every_item_once_near_evenly(sizes, n):
    shares = balanced_shares(sizes, n)
    assert len(shares) == n and sorted(i for s in shares for i in s) == list(range(len(sizes)))
    assert all(s == sorted(s) for s in shares)
    loads = [sum(sizes[i] for i in s) for s in shares]
    if sizes:  # largest-first greedy: no rank carries more than an even share plus one item
        assert max(loads) <= sum(sizes) / n + max(sizes)
    assert balanced_shares(sizes, n) == shares


def test_default_workers_follow_cores_memory_and_work(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(workers, "available_memory", lambda: 64 * gib)
    assert default_workers(15 * gib, gib // 2) == 16  # cores
    assert default_workers(15 * gib, 4 * gib) == 7  # memory: 64 GiB / (2 × 4 + 1) GiB
    assert default_workers(gib, gib // 8) == 4  # work: 256 MiB each at least
    assert default_workers(10**6, 10**5) == 1  # a tiny checkpoint: one process, nothing forked



LIBRARY_CALLER = """
import sys, torch
from pathlib import Path
from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.core.parallel import MegatronLayout
out = Path(sys.argv[1])
create_random(CreateRandomOptions(load_card("falcon-h1-0.5b"), out / "hf", dtype=torch.bfloat16))  # torch work first
summary = import_hf(ImportOptions(str(out / "hf"), out / "mg", MegatronLayout(), workers=2))
print("converted by", summary.workers, "workers")
"""


def test_a_library_caller_that_ran_torch_ops_first_converts_with_forked_workers(tmp_path):
    """import_hf called from Python after the caller's own torch ops (an RL or eval script; here create_random of
    the 0.5B card): the forked workers compute on one thread each, since a child entering an OpenMP parallel region
    with the pool its parent left behind hangs (it did, in the children's first fill after their share)."""
    done = subprocess.run([sys.executable, "-c", LIBRARY_CALLER, str(tmp_path)], capture_output=True, text=True,
                          timeout=180)  # a hung child would hold the run for ever
    assert done.returncode == 0 and "converted by 2 workers" in done.stdout, done.stderr[-3000:]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.sampled_from([torch.uint8, torch.bfloat16, torch.float32])),
                min_size=1, max_size=12),
       st.integers(1, 200), st.integers(1, 3), st.randoms(use_true_random=False))
def test_writers_hash_the_files_they_wrote_alone_in_order_and_only_those(specs, max_shard_bytes, n, rnd):
    """Several writers, tensors dealt out at random and put in a random order: a file a writer reports hashed holds
    exactly that sha256 and size on disk; with one writer putting in plan order, every file is reported."""
    import tempfile

    from falcon_bridge.formats.hf import ShardedSafetensorsWriter
    from falcon_bridge.formats.manifest import sha256_file

    plan = [(f"t{i}", (numel,), dtype) for i, (numel, dtype) in enumerate(specs)]
    tensors = {name: torch.arange(shape[0]).to(dtype) for name, shape, dtype in plan}
    names = [name for name, _, _ in plan]
    owner = {name: rnd.randrange(n) for name in names}
    order = rnd.sample(names, len(names)) if rnd.random() < 0.5 else names
    for dealt in ([{name: 0 for name in names}, 1, names], [owner, n, order]):
        owners, count, sequence = dealt
        with tempfile.TemporaryDirectory() as out:
            writers = [ShardedSafetensorsWriter(Path(out), plan, max_shard_bytes, leader=r == 0, hash_as_written=True,
                                                names={k for k, v in owners.items() if v == r}) for r in range(count)]
            for name in sequence:
                writers[owners[name]].put(name, tensors[name])
            for w in writers:
                w.close()
            on_disk = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                       for p in Path(out).glob("*.safetensors")}
            reported = {}
            for w in writers:
                assert not set(reported) & set(w.hashed)  # a file is hashed by one writer at most
                reported.update(w.hashed)
            assert all(on_disk[f] == h for f, h in reported.items())
            if count == 1 and sequence == names:
                assert set(reported) == set(on_disk)


def test_export_with_one_worker_does_not_read_its_shards_back_for_the_manifest(src, tmp_path, monkeypatch):
    """The shards are hashed as they are written (overlapping the reads of the next tensors), not afterwards."""
    from falcon_bridge.converters.export_hf import ExportOptions, export_hf
    from falcon_bridge.converters.import_hf import ImportOptions, import_hf
    from falcon_bridge.formats import manifest

    import_hf(ImportOptions(str(src), tmp_path / "mg"))
    read_back = []
    real = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path, *a, **k: (read_back.append(Path(path)),
                                                                          real(path, *a, **k))[1])
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "hf", max_shard_bytes=100_000, workers=1))
    shards = sorted((tmp_path / "hf").glob("*.safetensors"))
    assert len(shards) > 1 and read_back and not [p for p in read_back if p.suffix == ".safetensors"]
    assert check_manifest(tmp_path / "hf") == []
