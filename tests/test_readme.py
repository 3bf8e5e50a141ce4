"""README cannot drift from the CLI: every option of every command is in its signature row, every command but
train has --json, and `make demo` prints README's sample."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from conftest import run_cli, venv_seeing_this_environment

from falcon_bridge.cli.app import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
COMMANDS = typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_in_the_commands_readme_signature(name):
    rows = [line for line in README.splitlines() if re.match(rf"\| `falcon-bridge {name}[ `]", line)]
    assert len(rows) == 1, f"README's command table has {len(rows)} rows for {name}"
    signature = re.split(r"(?<!\\)\|", rows[0])[1]  # the first cell (escaped \| are alternatives inside it)
    missing = [p.opts[0] for p in COMMANDS[name].params
               if p.opts[0].startswith("--") and not any(o in signature for o in p.opts + p.secondary_opts)]
    assert not missing, f"{name}: README's signature lacks {missing}"


@pytest.mark.parametrize("name", sorted(set(COMMANDS) - {"train"}))  # train's output is Megatron-LM's log
def test_every_command_has_a_json_summary(name):
    assert any("--json" in p.opts for p in COMMANDS[name].params), name


def test_json_of_cards_check_and_demo(tmp_path, capsys, monkeypatch):
    code, out, _ = run_cli(capsys, monkeypatch, "cards", "--json")
    listed = {c["card"]: c for c in json.loads(out)}
    assert code == 0 and listed["falcon-h1-0.5b"]["hf_repo"] == "tiiuae/Falcon-H1-0.5B-Base"
    assert listed["falcon-h1-3b"]["unverified_fields"] and listed["tiny-one-group"]["test_shape"]
    code, out, _ = run_cli(capsys, monkeypatch, "demo", "--workdir", tmp_path, "--json")
    assert code == 0 and json.loads(out)["verify"]["passed"]
    hf = tmp_path / "tiny-one-group-hf"
    code, out, _ = run_cli(capsys, monkeypatch, "check", hf, "--json")
    assert code == 0 and json.loads(out) == {"directory": str(hf), "passed": True, "problems": []}
    (hf / "config.json").write_text("{}")
    code, out, _ = run_cli(capsys, monkeypatch, "check", hf, "--json")
    assert code == 1 and json.loads(out)["problems"] and not json.loads(out)["passed"]


def readme_block(after: str) -> str:
    """The first fenced block after `after` in README."""
    return README.split(after, 1)[1].split("```", 2)[1].strip("\n")


def test_make_demo_runs_as_shown_and_prints_the_readme_sample(tmp_path):
    """`make demo` (README's first command; `make test` is what CI runs) with the Makefile in a directory of its
    own, whose .venv sees this environment's packages (a .pth) and holds this project, editable, so that make finds
    it installed: it ends with README's sample table, the same rows up to the machine's last digits."""
    repo = Path(__file__).resolve().parents[1]
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy2(repo / name, tmp_path / name)
    venv = tmp_path / ".venv"
    venv_seeing_this_environment(venv)
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                    repo], check=True, capture_output=True)
    (venv / ".installed").touch()  # newer than pyproject.toml: make installs nothing
    assert "make demo" in readme_block("## Two commands")
    done = subprocess.run(["make", "demo"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    sample = readme_block("run as two tensor-parallel processes").splitlines()
    printed = done.stdout.splitlines()
    assert sample[0].strip() in [line.strip() for line in printed] and sample[-1] in printed
    result = next(line for line in printed if line.startswith("│"))
    assert result.split("│")[3:] == sample[2].split("│")[3:]  # max |logit| … PASS; the two Δ columns may differ
