"""Paths as users write them — markup-like brackets, control characters, leading dashes, unicode — are printed
literally on one line, and the exit status is the run's; a Hub repo id that cannot be fetched fails at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hub_cache_with
from conftest import run_cli as run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hostile_inputs import CARD, TRACEBACK

from falcon_bridge.errors import printable
from falcon_bridge.formats.manifest import check_manifest

# what a path name is made of here: rich markup and emoji codes, brackets, control characters, spaces, unicode
PIECES = ["[bold]", "[/x]", "[/]", "[link=http://x]", "[red on blue]", ":smile:", "[", "]", "\\", "\n", "\r", "\t",
          "\x1b[31m", " ", "-", "é", "名", "💥", "a", "%s", "{}", "$HOME"]
NAMES = st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map("".join).filter(
    lambda n: n not in (".", "..") and len(n.encode()) < 200)
PATHS = settings(max_examples=10, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def argument(name: str) -> str:
    """A relative path as a user types it: ./-x for a name starting with a dash (else it reads as an option)."""
    return f"./{name}" if name.startswith("-") else name


@PATHS
@given(name=NAMES)
def test_conversions_between_odd_paths_succeed_and_print_them_literally(tiny_hf, tmp_path_factory, capsys,
                                                                      monkeypatch, name):
    root = tmp_path_factory.mktemp("paths")
    monkeypatch.chdir(root)
    (root / f"src{name}").parent.mkdir(parents=True, exist_ok=True)  # [/x] is a folder "[" holding "x]"
    (root / f"src{name}").symlink_to(tiny_hf[CARD])
    code, out, err = run(capsys, monkeypatch, "import-hf", argument(f"src{name}"), argument(name))
    assert code == 0 and TRACEBACK not in err, err
    assert check_manifest(root / name) == []
    lines = out.strip().splitlines()
    assert len(lines) == 1 and printable(Path(name)) in lines[0], out  # the summary: one line, the path as given
    code, out, err = run(capsys, monkeypatch, "export-hf", argument(name), argument(f"hf{name}"), "--json")
    assert code == 0 and TRACEBACK not in err, err
    assert json.loads(out)["output"].endswith(str(Path(f"hf{name}")))  # JSON carries the exact path
    code, out, err = run(capsys, monkeypatch, "check", argument(f"hf{name}"))
    assert code == 0 and out.count("\n") == 1 and printable(Path(f"hf{name}")) in out, out


@PATHS
@given(name=NAMES)
def test_an_error_about_an_odd_path_is_one_line_naming_it(tmp_path_factory, capsys, monkeypatch, name):
    root = tmp_path_factory.mktemp("paths")
    missing, empty = root / f"missing{name}", root / f"empty{name}"
    empty.mkdir(parents=True)
    cases = [(["export-hf", missing, root / "out"], missing), (["check", empty], empty),
             (["reshard", empty, root / "out"], empty), (["verify", empty, missing], missing),
             (["import-hf", empty, root / "out"], empty),
             (["prepare-data", missing, "--tokenizer", empty, "--output-prefix", root / "o" / "d"], missing)]
    for args, path in cases:
        code, _, err = run(capsys, monkeypatch, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), (args, err)
        assert printable(path) in lines[0], (printable(path), lines[0])
    assert not (root / "out").exists() and not (root / "o").exists()


# ---- a Hub repo id that cannot be fetched ------------------------------------------------------------------------
def import_hub_id(tmp_path, repo="someone/no-such-model", **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", "import-hf", repo,
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"HF_HUB_CACHE": str(tmp_path / "cache"), **env})


@pytest.mark.parametrize("env,why", [({"HF_HUB_OFFLINE": "1"}, "offline mode is enabled"),
                                     ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "ConnectError")])
def test_an_unreachable_hub_fails_in_one_line_without_retrying(tmp_path, env, why):
    """Offline (HF_HUB_OFFLINE) or a Hub that refuses connections: one line at once, instead of huggingface_hub's
    retries (76 s before)."""
    done = import_hub_id(tmp_path, **env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "someone/no-such-model: neither a local directory nor in the local Hugging Face cache" in lines[0]
    assert why in lines[0] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("ref", ["main", "prequantized"])
def test_a_hub_id_already_in_the_local_cache_converts_offline(tiny_hf, tmp_path, ref):
    """The Hugging Face cache's own layout (refs/REF → snapshots/REV/ of symlinks into blobs/) opens with the Hub
    unreachable: `repo` for main, `repo@REF` for another branch (Falcon-E's latent weights are its `prequantized`
    branch)."""
    hub_cache_with(tmp_path / "cache", "someone/no-such-model", ref, tiny_hf[CARD])
    name = "someone/no-such-model" + ("" if ref == "main" else f"@{ref}")
    done = import_hub_id(tmp_path, name, HF_ENDPOINT="http://127.0.0.1:9")
    assert done.returncode == 0, done.stderr
    assert check_manifest(tmp_path / "out") == []
    if ref != "main":  # a branch the cache does not hold is named, in one line
        done = import_hub_id(tmp_path / "again", "someone/no-such-model@bfloat16", HF_ENDPOINT="http://127.0.0.1:9",
                             HF_HUB_CACHE=str(tmp_path / "cache"))
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "someone/no-such-model@bfloat16" in done.stderr
