"""README's command reference cannot drift from the CLI: every option of every command is in its signature."""

import json
import re
from pathlib import Path

import pytest
import typer
from conftest import run_cli

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
