"""Atomic outputs, the bad-input matrix, interruption safety, provenance manifest and `check`."""

import errno
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import edited_megatron_checkpoint
from safetensors.torch import load_file, save_file

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.output import OWNER_SUFFIX, TMP_MARK
from falcon_bridge.converters.reshard import ReshardOptions, reshard
from falcon_bridge.converters.run import Run
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.formats import hf as hf_format
from falcon_bridge.formats.manifest import MANIFEST_FILE, BackgroundHashes, HashingCancelled, check_manifest

CARD = "tiny-one-group"


@pytest.fixture
def src(tiny_hf, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(tiny_hf[CARD], path)
    return path


def snapshot(path):
    return {p.name: p.read_bytes() for p in path.iterdir()}


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def corrupt_header(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"not json at!"
    (path / "model.safetensors").write_bytes(bytes(data))


def truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def drop_field(path, field):
    cfg = json.loads((path / "config.json").read_text())
    del cfg[field]
    (path / "config.json").write_text(json.dumps(cfg))


HF_BAD_INPUTS = {
    "truncated safetensors": (truncate, {}, "model.safetensors: not a readable safetensors file"),
    "corrupted header": (corrupt_header, {}, "model.safetensors: not a readable safetensors file"),
    "missing tensor": (lambda p: rewrite_weights(p, lambda t: t.pop("lm_head.weight")), {},
                       "lm_head.weight is missing"),
    "extra tensor": (lambda p: rewrite_weights(p, lambda t: t.update(extra=torch.zeros(1))), {},
                     "unexpected tensor extra .*--allow-extra"),
    "wrong shape": (lambda p: rewrite_weights(p, lambda t: t.update({"model.final_layernorm.weight": torch.ones(3)})),
                    {}, "model.final_layernorm.weight has shape \\[3\\]"),
    "unexpected dtype": (lambda p: rewrite_weights(p, lambda t: t.update(
        {"model.layers.0.mamba.D": torch.ones(8, dtype=torch.int64)})), {}, "mamba.D has dtype int64"),
    "config.json missing": (lambda p: (p / "config.json").unlink(), {}, "config.json: file not found"),
    "config field missing": (lambda p: drop_field(p, "mamba_d_state"), {}, "required field 'mamba_d_state'"),
    "NaN weights": (lambda p: rewrite_weights(p, lambda t: t["model.layers.2.mamba.D"].__setitem__(0, float("nan"))),
                    {"check_finite": True}, "model.layers.2.mamba.D holds NaN or Inf"),
    "TP not dividing": (lambda p: None, {"layout": MegatronLayout(tp=3)}, "--tp 3 does not divide"),
    "PP not dividing": (lambda p: None, {"layout": MegatronLayout(pp=3)}, "--pp 3 does not divide"),
}


@pytest.mark.parametrize("case", HF_BAD_INPUTS)
def test_import_bad_input_matrix(case, src, tmp_path):
    damage, kwargs, message = HF_BAD_INPUTS[case]
    damage(src)
    before = snapshot(src)
    options = {k: v for k, v in kwargs.items() if k != "layout"}  # the shared table is left as it is
    with pytest.raises(BadInput, match=message):
        import_hf(ImportOptions(str(src), tmp_path / "out", kwargs.get("layout", MegatronLayout()), **options))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing at OUT, no partial output left
    assert snapshot(src) == before  # the source is never modified


def test_allow_extra_ignores_unknown_tensors(src, tmp_path):
    rewrite_weights(src, lambda t: t.update(extra=torch.zeros(1)))
    import_hf(ImportOptions(str(src), tmp_path / "out", MegatronLayout(), allow_extra=True))
    assert check_manifest(tmp_path / "out") == []


@pytest.fixture
def megatron_ckpt(src, tmp_path):
    import_hf(ImportOptions(str(src), tmp_path / "mg", MegatronLayout(tp=2)))
    return tmp_path / "mg"


def test_export_refuses_nan_by_default(megatron_ckpt, tmp_path):
    bad = edited_megatron_checkpoint(megatron_ckpt, tmp_path / "bad",
                                     lambda t: t["decoder.layers.1.mamba_mixer.D"].__setitem__(2, float("inf")))
    with pytest.raises(BadInput, match="decoder.layers.1.mamba_mixer.D holds NaN or Inf"):
        export_hf(ExportOptions(bad, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    export_hf(ExportOptions(bad, tmp_path / "out", check_finite=False))  # explicitly allowed


def test_megatron_bad_input_matrix(megatron_ckpt, tmp_path):
    legacy = tmp_path / "legacy"
    (legacy / "iter_0000003" / "mp_rank_00").mkdir(parents=True)
    (legacy / "iter_0000003" / "mp_rank_01").mkdir()
    (legacy / "latest_checkpointed_iteration.txt").write_text("3")
    no_iter = tmp_path / "no_iter"
    no_iter.mkdir()
    (no_iter / "latest_checkpointed_iteration.txt").write_text("0")
    cases = [(legacy, "legacy per-rank checkpoint"), (no_iter, "iter_0000000 does not exist"),
             (tmp_path / "nowhere", "no such directory")]
    for path, message in cases:
        with pytest.raises(BadInput, match=message):
            export_hf(ExportOptions(path, tmp_path / "out"))
        with pytest.raises(BadInput, match=message):
            reshard(ReshardOptions(path, tmp_path / "out", MegatronLayout()))
        assert not (tmp_path / "out").exists()
    with pytest.raises(BadInput, match="--pp 3 does not divide"):
        reshard(ReshardOptions(megatron_ckpt, tmp_path / "out", MegatronLayout(pp=3)))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    with pytest.raises(BadInput, match="already exists .*--overwrite"):
        import_hf(ImportOptions(str(src), out, MegatronLayout()))
    assert (out / "keep").read_text() == "mine"
    import_hf(ImportOptions(str(src), out, MegatronLayout(), overwrite=True))
    assert not (out / "keep").exists() and check_manifest(out) == []


def test_not_enough_disk_space_is_checked_before_writing(src, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(BadInput, match="not enough disk space"):
        import_hf(ImportOptions(str(src), tmp_path / "out", MegatronLayout()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_disk_full_while_writing_is_one_clear_error(megatron_ckpt, tmp_path, monkeypatch):
    def full(self, name, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_format.ShardedSafetensorsWriter, "put", full)
    with pytest.raises(BadInput, match="disk full while writing"):
        export_hf(ExportOptions(megatron_ckpt, tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(f"{TMP_MARK}*"))


def test_every_command_writes_a_manifest_that_check_verifies(src, tmp_path):
    create_random(CreateRandomOptions(load_card(CARD), tmp_path / "rand", dtype=torch.float32))
    import_hf(ImportOptions(str(src), tmp_path / "mg", MegatronLayout(tp=2)), Run(argv=["falcon-bridge", "import-hf"]))
    reshard(ReshardOptions(tmp_path / "mg", tmp_path / "mg2", MegatronLayout(pp=2)))
    export_hf(ExportOptions(tmp_path / "mg2", tmp_path / "hf"))
    for name in ("rand", "mg", "mg2", "hf"):
        assert check_manifest(tmp_path / name) == [], name
    manifest = json.loads((tmp_path / "mg" / MANIFEST_FILE).read_text())
    assert manifest["command"]["name"] == "import-hf" and manifest["command"]["options"]["tp"] == 2
    assert str(src / "model.safetensors") in manifest["sources"]
    assert manifest["outputs"]["iter_0000000/falcon_bridge_run_config.json"]["bytes"] > 0
    exported = json.loads((tmp_path / "hf" / MANIFEST_FILE).read_text())
    assert str(tmp_path / "mg2" / "latest_checkpointed_iteration.txt") in exported["sources"]
    # tamper: check names the file and exits 1
    (tmp_path / "hf" / "config.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", "check", str(tmp_path / "hf")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "config.json" in proc.stderr


def test_kill_minus_nine_leaves_nothing_at_the_output(tmp_path):
    out = tmp_path / "big"
    proc = subprocess.Popen([sys.executable, "-m", "falcon_bridge.cli.app", "create-random", "falcon-h1-0.5b",
                             str(out), "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(f"{TMP_MARK}big.*/model*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    leftovers = list(tmp_path.glob(f"{TMP_MARK}big.*"))
    assert leftovers, "the interrupted run's partial output is named clearly"
    # the next run for the same target cleans it
    create_random(CreateRandomOptions(load_card(CARD), out, dtype=torch.float32))
    assert not list(tmp_path.glob(f"{TMP_MARK}big.*")) and check_manifest(out) == []


def test_background_hashes_give_sha256_and_stop_when_cancelled(tmp_path):
    """Sources are hashed beside the conversion; a failed conversion cancels that instead of waiting for it."""
    files = []
    for i in range(3):
        files.append(tmp_path / f"part{i}")
        files[-1].write_bytes(bytes(range(256)) * (1000 * (i + 1)))
    assert BackgroundHashes(files).result() == {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}
    big = tmp_path / "big"
    big.write_bytes(bytes(64 << 20))
    job = BackgroundHashes([big] * 16)  # 1 GiB to hash: seconds of work, cancelled at once
    job.cancel()
    with pytest.raises(HashingCancelled):
        job.result()


# ---- the replace window: a crash at every step of an overwrite ----------------------------------------------------
CRASHING_OVERWRITE = r"""
import os, pathlib, shutil, signal, sys
from falcon_bridge.converters import output
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.core.parallel import MegatronLayout

src, out, point, exchange = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "exchange"
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if not exchange:  # a filesystem without RENAME_EXCHANGE: the two-rename swap
    output._renameat2 = lambda *args: False
if point == "before swap":
    output._move_into_place = lambda *args: die()
elif point == "after swap":
    move = output._move_into_place
    output._move_into_place = lambda *args: (move(*args), die())
elif point == "after removing the previous output":
    rmtree = shutil.rmtree
    shutil.rmtree = lambda *args, **kw: (rmtree(*args, **kw), die())
elif point.startswith("after rename "):  # the k-th rename of the two-rename swap
    calls, rename, move = [], pathlib.Path.rename, output._move_into_place
    def counted(self, target):
        result = rename(self, target)
        if calls:
            calls.append(target)
            if len(calls) - 1 == int(point.split()[2]):
                die()
        return result
    def moving(*args):
        calls.append("swap")
        move(*args)
    pathlib.Path.rename, output._move_into_place = counted, moving
import_hf(ImportOptions(src, out, MegatronLayout(tp=2), overwrite=True))
"""
CRASH_POINTS = [(p, "exchange") for p in ("before swap", "after swap", "after removing the previous output")] + \
    [(p, "renames") for p in ("after rename 1 of the swap", "after rename 2 of the swap",
                              "after rename 3 of the swap", "after removing the previous output")]


@pytest.mark.parametrize("point,swap", CRASH_POINTS, ids=[f"{s}: {p}" for p, s in CRASH_POINTS])
def test_a_crash_during_overwrite_leaves_a_complete_output_and_a_rerun_cleans_up(src, tmp_path, point, swap):
    """SIGKILL at every step of replacing an existing OUT (atomic exchange, and the two-rename fallback): OUT is
    the previous or the new output, complete (its manifest checks clean) — except between the fallback's last two
    renames, where the next run for OUT first puts the previous output back; that run finishes what the dead one
    left and leaves nothing else beside OUT."""
    out = tmp_path / "out"
    import_hf(ImportOptions(str(src), out, MegatronLayout(tp=1)))
    crashed = subprocess.run([sys.executable, "-c", CRASHING_OVERWRITE, str(src), str(out), point, swap],
                             capture_output=True, text=True)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    assert list(tmp_path.glob(f"{TMP_MARK}*")), "the crash left its record"  # else the point was never reached
    import_hf(ImportOptions(str(src), tmp_path / "other", MegatronLayout()))  # another OUT: leaves them alone
    assert list(tmp_path.glob(f"{TMP_MARK}*"))
    if point == "after rename 2 of the swap":
        assert not out.exists()  # the one state the fallback cannot avoid
        with pytest.raises(BadInput, match="already exists"):  # the next run for OUT restores it first
            import_hf(ImportOptions(str(src), out, MegatronLayout()))
    assert check_manifest(out) == []
    import_hf(ImportOptions(str(src), out, MegatronLayout(tp=4), overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out", "src"]
    assert check_manifest(out) == [] and json.loads((out / MANIFEST_FILE).read_text())["command"]["options"]["tp"] == 4


def test_a_crash_at_the_exchange_syscall_leaves_the_previous_output(src, tmp_path):
    """The same at the system call: strace kills the CLI on entry to renameat2 (whichever comes first)."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    out = tmp_path / "out"
    import_hf(ImportOptions(str(src), out, MegatronLayout(tp=1)))
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    crashed = subprocess.run([strace, "-f", "-qq", "-o", "/dev/null", "-e", "inject=renameat2:signal=SIGKILL",
                              sys.executable, "-m", "falcon_bridge.cli.app", "import-hf", src, out, "--tp", "2",
                              "--overwrite"], capture_output=True, text=True)
    if "PTRACE" in crashed.stderr or "Operation not permitted" in crashed.stderr:
        pytest.skip("ptrace is not permitted here")
    assert crashed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), crashed.stderr[-3000:]
    assert list(tmp_path.glob(f"{TMP_MARK}*{OWNER_SUFFIX}")), "killed while the run owned its partial output"
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    import_hf(ImportOptions(str(src), out, MegatronLayout(tp=2), overwrite=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"] and check_manifest(out) == []
