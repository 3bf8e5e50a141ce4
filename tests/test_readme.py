"""README's command reference cannot drift from the CLI: every option of every command is in its signature."""

import re
from pathlib import Path

import pytest
import typer

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
