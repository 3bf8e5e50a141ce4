"""What a hostile or careless user can do to the CLI: every family of bad input gets one `error:` line and exit 2,
nothing at OUT, the source unchanged; no run deletes another's output or its own source; no checkpoint runs code
when opened. Commands run in-process through the CLI's own entry point (`main`), as a user's shell would."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from falcon_bridge.cards import load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.output import TMP_MARK, _owner_record, _process_start, owner_record_path
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.manifest import MANIFEST_FILE, check_manifest

CARD = "tiny-one-group"
TRACEBACK = "Traceback (most recent call last)"


def cli(capsys, monkeypatch, *args) -> tuple[int, str]:
    """Run `falcon-bridge ARGS` through main(); (exit code, stderr)."""
    code, _, err = run_cli(capsys, monkeypatch, *args)
    return code, err


def one_error_line(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tree(path):
    """Every file under path with its bytes: to show a source is unchanged."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tiny_hf, tmp_path):
    path = tmp_path / "src"
    shutil.copytree(tiny_hf[CARD], path)
    return path


@pytest.fixture
def sharded_src(tmp_path):
    """A sharded fp32 HF checkpoint (index + several shards) with a tokenizer."""
    path = tmp_path / "sharded"
    create_random(CreateRandomOptions(load_card("tiny-vocab-pad"), path, dtype=torch.float32, max_shard_bytes=40_000))
    assert (path / "model.safetensors.index.json").exists() and (path / "tokenizer.json").exists()
    return path


@pytest.fixture(scope="module")
def megatron_ckpt(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("mg") / "ckpt"
    import_hf(ImportOptions(str(tiny_hf[CARD]), out, MegatronLayout(tp=2)))
    return out


# ---- config.json values: types and ranges ----------------------------------------------------------------------
CONFIG_EDITS = {
    "heads as a string": ({"num_attention_heads": "4"}, "num_attention_heads: expected a positive integer"),
    "hidden size as a list": ({"hidden_size": [64]}, "hidden_size: expected a positive integer"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads: expected a positive integer"),
    "zero groups": ({"mamba_n_groups": 0}, "mamba_n_groups: expected a positive integer"),
    "fractional layers": ({"num_hidden_layers": 4.9}, "num_hidden_layers: expected a positive integer, got 4.9"),
    "no layers": ({"num_hidden_layers": 0}, "num_hidden_layers: expected a positive integer, got 0"),
    "negative layers": ({"num_hidden_layers": -2}, "num_hidden_layers: expected a positive integer"),
    "boolean as a string": ({"mamba_rms_norm": "false"}, "mamba_rms_norm: expected true or false"),
    "NaN multiplier": ({"embedding_multiplier": float("nan")}, "embedding_multiplier: expected a finite number"),
    "infinite multiplier": ({"key_multiplier": float("inf")}, "key_multiplier: expected a finite number"),
    "multiplier list too short": ({"mlp_multipliers": [1.0]}, "mlp_multipliers: expected a list of 2 numbers"),
    "multiplier list of strings": ({"ssm_multipliers": ["1"] * 5}, "ssm_multipliers: expected a finite number"),
    "eos as a string": ({"eos_token_id": "</s>"}, "eos_token_id: expected a token id"),
    "negative eps": ({"rms_norm_eps": -1e-5}, "rms_norm_eps: expected a positive number"),
    "rope parameters as a string": ({"rope_parameters": "yarn"}, "rope_parameters: expected an object"),
    "a list instead of an object": ([], "expected a JSON object, got list"),
}


@pytest.mark.parametrize("case", CONFIG_EDITS)
def test_config_values_are_checked_by_type_and_range(case, src, tmp_path, capsys, monkeypatch):
    edit, message = CONFIG_EDITS[case]
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | edit if isinstance(edit, dict) else edit))
    before = tree(src)
    code, err = cli(capsys, monkeypatch, "import-hf", src, tmp_path / "out", "--allow-extra")
    assert code == 2
    one_error_line(err, "config.json", message)
    assert not (tmp_path / "out").exists() and tree(src) == before


def test_eos_token_list_is_accepted_and_kept(src, tmp_path):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(cfg | {"eos_token_id": [11, 228]}))
    import_hf(ImportOptions(str(src), tmp_path / "mg", MegatronLayout()))
    from falcon_bridge.converters.export_hf import ExportOptions, export_hf

    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [11, 228]
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == [11, 228]


# ---- HF index: every tensor exactly once, where the index says, inside the source ------------------------------
def edit_index(path, edit):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    edit(index["weight_map"], path)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def duplicate_into_other_shard(weight_map, path):
    """The embedding also stored, as zeros, in a second shard (the index still names the first)."""
    name = "model.embed_tokens.weight"
    other = sorted(set(weight_map.values()) - {weight_map[name]})[0]
    tensors = load_file(path / other)
    tensors[name] = torch.zeros_like(load_file(path / weight_map[name])[name])
    save_file(tensors, path / other, metadata={"format": "pt"})


def point_at_wrong_shard(weight_map, path):
    name = "model.final_layernorm.weight"
    weight_map[name] = sorted(set(weight_map.values()) - {weight_map[name]})[0]


INDEX_EDITS = {
    "tensor in two shards": (duplicate_into_other_shard, "model.embed_tokens.weight is also stored in"),
    "entry outside the source": (lambda m, p: m.update({"lm_head.weight": "../x.safetensors"}),
                                 "'../x.safetensors' is not a .safetensors file name in the checkpoint directory"),
    "entry naming the wrong shard": (point_at_wrong_shard, "holds tensor model.final_layernorm.weight, which"),
    "entry for a tensor in no shard": (lambda m, p: m.update({"model.ghost.weight": m["lm_head.weight"]}),
                                       "tensor model.ghost.weight is not in"),
    "entry value not a string": (lambda m, p: m.update({"lm_head.weight": 7}), "7 is not a .safetensors file"),
    "weight map not an object": (lambda m, p: m.clear(), "weight_map: expected an object"),
}


@pytest.mark.parametrize("case", INDEX_EDITS)
def test_ambiguous_or_escaping_indexes_are_refused(case, sharded_src, tmp_path, capsys, monkeypatch):
    edit, message = INDEX_EDITS[case]
    edit_index(sharded_src, edit)
    before = tree(sharded_src)
    code, err = cli(capsys, monkeypatch, "import-hf", sharded_src, tmp_path / "out")
    assert code == 2
    one_error_line(err, message)
    assert not (tmp_path / "out").exists() and tree(sharded_src) == before


# ---- bounded reads ---------------------------------------------------------------------------------------------
def test_special_files_are_never_read(sharded_src, tmp_path, capsys, monkeypatch):
    """A tokenizer file linked to /dev/zero and a FIFO config.json: one line each, at once, nothing written."""
    tok = sharded_src / "tokenizer.json"
    tok.unlink()
    tok.symlink_to("/dev/zero")
    code, err = cli(capsys, monkeypatch, "import-hf", sharded_src, tmp_path / "out")
    assert code == 2
    one_error_line(err, "tokenizer.json: not a regular file")
    (sharded_src / "config.json").unlink()
    os.mkfifo(sharded_src / "config.json")
    t0 = time.monotonic()
    code, err = cli(capsys, monkeypatch, "import-hf", sharded_src, tmp_path / "out")
    assert code == 2 and time.monotonic() - t0 < 30
    one_error_line(err, "config.json: not a regular file")
    assert not (tmp_path / "out").exists()


def test_tokenizer_files_are_hashed_into_the_manifest(sharded_src, tmp_path):
    import_hf(ImportOptions(str(sharded_src), tmp_path / "mg", MegatronLayout()))
    sources = json.loads((tmp_path / "mg" / MANIFEST_FILE).read_text())["sources"]
    assert str(sharded_src / "tokenizer.json") in sources


# ---- Megatron checkpoints: damaged, crafted, or pointing outside -----------------------------------------------
class RunsShell:
    """A pickle payload: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_metadata(ckpt, marker):
    (ckpt / "iter_0000000" / ".metadata").write_bytes(pickle.dumps(RunsShell(marker)))


def crafted_common_state(ckpt, marker):
    """A checkpoint whose common state (a pickled DCP entry, which torch's reader unpickles unrestricted) runs code."""
    it_dir = ckpt / "iter_0000000"
    reader = mg.TorchDistReader(it_dir)
    tensors = {k: reader.get(k) for k in reader.tensors}
    run_config = mg.read_run_config(it_dir)
    shutil.rmtree(it_dir)
    mg.write_torch_dist(it_dir, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, tensors.__getitem__,
                        common_state={"payload": RunsShell(marker)})
    mg.write_run_config(it_dir, run_config)


def metadata_pointing_outside(ckpt, marker):
    from falcon_bridge.formats.untrusted import load_dcp_metadata

    path = ckpt / "iter_0000000" / ".metadata"
    meta = load_dcp_metadata(path)
    index = next(iter(meta.storage_data))
    meta.storage_data[index].relative_path = "../../escape.distcp"
    path.write_bytes(pickle.dumps(meta))


def truncate_largest_distcp(ckpt, marker):
    largest = max((ckpt / "iter_0000000").glob("*.distcp"), key=lambda p: p.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:100])


def edit_run_config(**fields):
    def edit(ckpt, marker):
        path = ckpt / "iter_0000000" / mg.RUN_CONFIG_FILE
        path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    return edit


def write(relative, content):
    def edit(ckpt, marker):
        (ckpt / relative).write_text(content)
    return edit


MEGATRON_DAMAGE = {
    "metadata pickle runs code": (crafted_metadata, ".metadata: refuses to unpickle posix.system"),
    "common state pickle runs code": (crafted_common_state, "entry common_state/shard_0_1: refused or corrupt"),
    "metadata points outside": (metadata_pointing_outside, "stored in '../../escape.distcp', outside"),
    "metadata garbage": (write("iter_0000000/.metadata", "garbage"), ".metadata: corrupt checkpoint metadata"),
    "metadata truncated": (lambda c, m: (c / "iter_0000000/.metadata").write_bytes(
        (c / "iter_0000000/.metadata").read_bytes()[:300]), ".metadata: corrupt checkpoint metadata"),
    "data file truncated": (truncate_largest_distcp, "shorter than .metadata says"),
    "run config not JSON": (write(f"iter_0000000/{mg.RUN_CONFIG_FILE}", "{"), "run_config.json: not valid JSON"),
    "run config asks for int8": (edit_run_config(hf_dtype="int8"), "field hf_dtype: expected one of float32"),
    "run config layout as strings": (edit_run_config(layout={"tp": "2"}), "field layout: expected"),
    "run config architecture types": (edit_run_config(architecture={"vocab_size": "big"}),
                                      "missing required field(s)"),
    "tracker not a number": (write(mg.TRACKER_FILE, "last"), "expected an iteration number or 'release'"),
}


@pytest.mark.parametrize("command", ["export-hf", "reshard", "verify"])
@pytest.mark.parametrize("case", MEGATRON_DAMAGE)
def test_damaged_or_crafted_megatron_checkpoints(case, command, megatron_ckpt, tiny_hf, tmp_path, capsys,
                                                 monkeypatch):
    damage, message = MEGATRON_DAMAGE[case]
    ckpt = tmp_path / "ckpt"
    shutil.copytree(megatron_ckpt, ckpt)
    marker = tmp_path / "code-ran"
    damage(ckpt, marker)
    before = tree(ckpt)
    args = {"export-hf": ["export-hf", ckpt, tmp_path / "out"], "reshard": ["reshard", ckpt, tmp_path / "out"],
            "verify": ["verify", tiny_hf[CARD], ckpt]}[command]
    code, err = cli(capsys, monkeypatch, *args)
    assert code == 2 and not marker.exists()
    one_error_line(err, message)
    assert not (tmp_path / "out").exists() and tree(ckpt) == before


def test_a_tracker_that_is_a_fifo_does_not_block(megatron_ckpt, tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(megatron_ckpt, ckpt)
    (ckpt / mg.TRACKER_FILE).unlink()
    os.mkfifo(ckpt / mg.TRACKER_FILE)
    code, err = cli(capsys, monkeypatch, "export-hf", ckpt, tmp_path / "out")
    assert code == 2
    one_error_line(err, "latest_checkpointed_iteration.txt: not a regular file")


# ---- outputs: overlap with the source, odd targets -------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "containing"])
@pytest.mark.parametrize("command", ["import-hf", "export-hf", "reshard"])
def test_output_overlapping_the_source_is_refused(command, where, src, megatron_ckpt, tmp_path, capsys,
                                                  monkeypatch):
    source = src if command == "import-hf" else tmp_path / "ckpt"
    if command != "import-hf":
        shutil.copytree(megatron_ckpt, source)
    out = {"same": source, "inside": source / "sub", "containing": tmp_path}[where]
    before = tree(tmp_path)
    code, err = cli(capsys, monkeypatch, command, source, out, "--overwrite")
    assert code == 2
    one_error_line(err, "overlaps the input")
    assert tree(tmp_path) == before


def hf_cache_layout(src: Path, root: Path) -> tuple[Path, Path]:
    """src laid out as the Hugging Face cache does: blobs/ holds the files, snapshots/REV/ symlinks to them."""
    blobs, snap = root / "blobs", root / "snapshots" / "rev"
    blobs.mkdir(parents=True), snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, blobs / f"blob-{f.name}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob-{f.name}")
    return blobs, snap


@pytest.mark.parametrize("out", ["blobs", "cache"])
def test_output_where_the_sources_symlinks_lead_is_refused(src, tmp_path, capsys, monkeypatch, out):
    """import-hf SNAPSHOT BLOBS --overwrite would have deleted every file the snapshot's symlinks point at (and
    the whole cache directory contains the snapshot itself)."""
    blobs, snap = hf_cache_layout(src, tmp_path / "cache")
    target = {"blobs": blobs, "cache": tmp_path / "cache"}[out]
    before = tree(tmp_path / "cache")
    code, err = cli(capsys, monkeypatch, "import-hf", snap, target, "--overwrite")
    assert code == 2
    one_error_line(err, "overlaps the input", *(["through a symbolic link"] if out == "blobs" else []))
    assert tree(tmp_path / "cache") == before


def test_import_reads_the_hf_cache_layout(src, tmp_path, capsys, monkeypatch):
    _, snap = hf_cache_layout(src, tmp_path / "cache")
    code, err = cli(capsys, monkeypatch, "import-hf", snap, tmp_path / "out")
    assert code == 0, err


def test_reshard_of_a_checkpoint_whose_iteration_is_a_symlink_into_out(megatron_ckpt, tmp_path, capsys,
                                                                      monkeypatch):
    out, source = tmp_path / "out", tmp_path / "ckpt"
    shutil.copytree(megatron_ckpt, out)  # the previous output, to be replaced
    source.mkdir()
    shutil.copy(megatron_ckpt / mg.TRACKER_FILE, source)
    (source / "iter_0000000").symlink_to(out / "iter_0000000")
    before = tree(out)
    code, err = cli(capsys, monkeypatch, "reshard", source, out, "--overwrite")
    assert code == 2
    one_error_line(err, "overlaps the input", "through a symbolic link")
    assert tree(out) == before


def test_odd_output_targets(src, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cases = [(tmp_path / "a_file", "exists and is not a directory"),
             (tmp_path / "a_file" / "out", "cannot create the output's parent directory"),
             (tmp_path / "link", "is a symbolic link"),
             ("/proc/falcon-bridge-out", "cannot write the output here")]
    for out, message in cases:
        code, err = cli(capsys, monkeypatch, "import-hf", src, out, "--overwrite")
        assert code == 2
        one_error_line(err, message)
    assert (tmp_path / "a_file").read_text() == "x" and not any((tmp_path / "real").iterdir())


# ---- verify and check flags and files --------------------------------------------------------------------------
def test_verify_flags_and_token_files(megatron_ckpt, tiny_hf, tmp_path, capsys, monkeypatch):
    hf = tiny_hf[CARD]
    many = tmp_path / "many.txt"
    many.write_text(" ".join(["1"] * 200_000))
    ragged = tmp_path / "ragged.json"
    ragged.write_text("[[1, 2], [3]]")
    words = tmp_path / "words.txt"
    words.write_text("hello world")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases = [(["--tp", "0"], "--tp 0: expected a positive integer"),
             (["--pp", "-1"], "--pp -1: expected a positive integer"),
             (["--seq-len", "0"], "--seq-len 0: expected 1 to"),
             (["--tolerance", "nan"], "--tolerance nan: expected a positive number"),
             (["--tokens", many], "more than a token file may have"),
             (["--tokens", ragged], "expected token ids"),
             (["--tokens", words], "expected token ids"),
             (["--tokens", fifo], "not a regular file"),
             (["--tokens", tmp_path / "none"], "file not found")]
    for flags, message in cases:
        code, err = cli(capsys, monkeypatch, "verify", hf, megatron_ckpt, *flags)
        assert code == 2, flags
        one_error_line(err, message)


@pytest.mark.parametrize("manifest", ["not json", "[]", '{"outputs": []}', '{"outputs": {"a": {"sha256": 1}}}'])
def test_check_refuses_malformed_manifests(manifest, tmp_path, capsys, monkeypatch):
    (tmp_path / MANIFEST_FILE).write_text(manifest)
    code, err = cli(capsys, monkeypatch, "check", tmp_path)
    assert code == 2
    one_error_line(err, MANIFEST_FILE)


# ---- concurrent runs and interruptions -------------------------------------------------------------------------
def partial_dir(parent, out_name, owner_pid):
    """A partial output for parent/out_name holding data; with an owner record of process owner_pid (on this
    host) unless owner_pid is None."""
    path = parent / f"{TMP_MARK}{out_name}.{owner_pid}x"
    path.mkdir()
    (path / "keep.bin").write_bytes(b"data")
    if owner_pid is not None:
        record = _owner_record(parent / out_name) | {"pid": owner_pid, "started": _process_start(owner_pid)}
        owner_record_path(path).write_text(json.dumps(record))
    return path


def test_a_run_removes_only_its_own_dead_partial_outputs(src, tmp_path):
    live = subprocess.Popen(["sleep", "600"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        others = [partial_dir(tmp_path, "mg.v2", live.pid),  # another output whose name starts with "mg."
                  partial_dir(tmp_path, "mg.v3", dead.pid),  # dead, but not ours
                  partial_dir(tmp_path, "mg", None)]  # no owner record: never ours
        stale = partial_dir(tmp_path, "mg", dead.pid)
        import_hf(ImportOptions(str(src), tmp_path / "mg", MegatronLayout()))
        assert not stale.exists() and all((p / "keep.bin").exists() for p in others)
        assert check_manifest(tmp_path / "mg") == []
        partial_dir(tmp_path, "mg", live.pid)
        with pytest.raises(BadInput, match="another falcon-bridge run .* is writing it"):
            import_hf(ImportOptions(str(src), tmp_path / "mg", MegatronLayout(), overwrite=True))
        assert check_manifest(tmp_path / "mg") == []
    finally:
        live.kill()


@pytest.mark.parametrize("spelling", ["dotdot", "symlinked parent"])
def test_the_same_output_spelled_another_way_is_the_same_output(src, tmp_path, spelling):
    """A live run writing tmp/mg is seen by a run given tmp/sub/../mg or link/mg (link → tmp)."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path)
    other = {"dotdot": tmp_path / "sub" / ".." / "mg", "symlinked parent": tmp_path / "link" / "mg"}[spelling]
    live = subprocess.Popen(["sleep", "600"])
    try:
        partial_dir(tmp_path, "mg", live.pid)
        with pytest.raises(BadInput, match="another falcon-bridge run .* is writing it"):
            import_hf(ImportOptions(str(src), other, MegatronLayout()))
    finally:
        live.kill()


def test_concurrent_runs_into_sibling_outputs_both_complete(src, tmp_path):
    """Two processes import at once into `mg` and `mg.v2`: both outputs complete and check clean."""
    procs = [subprocess.Popen([sys.executable, "-m", "falcon_bridge.cli.app", "import-hf", str(src),
                               str(tmp_path / name), "--tp", "2", "--json"], stdout=subprocess.DEVNULL)
             for name in ("mg", "mg.v2")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for name in ("mg", "mg.v2"):
        assert check_manifest(tmp_path / name) == []
    assert not list(tmp_path.glob(f"{TMP_MARK}*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_the_partial_output_and_prints_one_line(sig, tmp_path):
    out = tmp_path / "big"
    proc = subprocess.Popen([sys.executable, "-m", "falcon_bridge.cli.app", "create-random", "falcon-h1-0.5b",
                             str(out), "--json"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(f"{TMP_MARK}big.*/model*.safetensors")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig
    one_error_line(err, f"interrupted ({signal.Signals(sig).name})")
    assert not out.exists() and not list(tmp_path.glob(f"{TMP_MARK}*"))


# ---- fuzz: mutated inputs end in a valid output or one clear line ----------------------------------------------
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=6)


def mutate_json(path, data):
    doc = json.loads(path.read_text())
    target = doc
    if isinstance(doc.get("weight_map"), dict):
        target = doc["weight_map"]
    key = data.draw(st.sampled_from(sorted(target) + ["new_key"]))
    action = data.draw(st.sampled_from(["set", "delete"]))
    if action == "delete":
        target.pop(key, None)
    else:
        target[key] = data.draw(JSON_VALUES)
    path.write_text(json.dumps(doc))


def mutate_bytes(path, data, region):
    raw = bytearray(path.read_bytes())
    end = min(len(raw), region)
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, end - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path.write_bytes(bytes(raw))


def assert_clean_outcome(capsys, monkeypatch, args, source, out):
    before = tree(source)
    code, err = cli(capsys, monkeypatch, *args)
    event(f"exit {code}")  # pytest --hypothesis-show-statistics shows how often each outcome was reached
    assert TRACEBACK not in err
    if code == 0:
        assert check_manifest(out) == []
        shutil.rmtree(out)
    else:
        assert code == 2
        one_error_line(err)
        assert not out.exists()
    assert tree(source) == before
    assert not list(out.parent.glob(f"{TMP_MARK}*"))


FUZZ = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data(), target=st.sampled_from(["config.json", "model.safetensors.index.json", "header"]))
def test_fuzz_hf_sources(sharded_src, tmp_path, capsys, monkeypatch, data, target):
    case = tmp_path / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(sharded_src, case)
    if target == "header":
        shard = data.draw(st.sampled_from(sorted(case.glob("*.safetensors"))))
        mutate_bytes(shard, data, region=256)
    else:
        mutate_json(case / target, data)
    assert_clean_outcome(capsys, monkeypatch, ["import-hf", case, tmp_path / "out", "--tp", "2"], case,
                         tmp_path / "out")


@FUZZ
@given(data=st.data(), target=st.sampled_from([mg.RUN_CONFIG_FILE, mg.TRACKER_FILE, ".metadata"]))
def test_fuzz_megatron_sources(megatron_ckpt, tmp_path, capsys, monkeypatch, data, target):
    case = tmp_path / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(megatron_ckpt, case)
    if target == mg.RUN_CONFIG_FILE:
        path = case / "iter_0000000" / target
        doc = json.loads(path.read_text())
        section = data.draw(st.sampled_from(["architecture", "layout", "mup", None]))
        holder = doc[section] if section else doc
        key = data.draw(st.sampled_from(sorted(holder) + ["new_key"]))
        holder[key] = data.draw(JSON_VALUES)
        path.write_text(json.dumps(doc))
    elif target == mg.TRACKER_FILE:
        (case / target).write_text(data.draw(st.text(max_size=12)))
    else:
        mutate_bytes(case / "iter_0000000" / target, data, region=1 << 16)
    assert_clean_outcome(capsys, monkeypatch, ["export-hf", case, tmp_path / "out"], case, tmp_path / "out")



@pytest.mark.parametrize("command", ["export-hf", "reshard"])
def test_an_hf_checkpoint_given_where_a_megatron_one_belongs_points_at_import_hf(src, tmp_path, capsys, monkeypatch,
                                                                               command):
    code, err = cli(capsys, monkeypatch, command, src, tmp_path / "out")
    assert code == 2
    one_error_line(err, "a Hugging Face checkpoint", "`falcon-bridge import-hf` converts it")


def test_debug_still_shows_the_traceback_before_the_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "--debug", "export-hf", tmp_path / "missing[bold]", tmp_path / "out")
    assert code == 2 and TRACEBACK in err
    assert err.strip().splitlines()[-1] == f"error: {tmp_path / 'missing[bold]'}: no such directory"
