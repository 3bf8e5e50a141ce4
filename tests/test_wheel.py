"""A built wheel carries everything the CLI needs (the model cards included) and runs outside the source tree."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_runs_cards_create_random_and_demo_outside_the_source_tree(tmp_path):
    source = tmp_path / "source"  # built from a copy: setuptools writes build/ and *.egg-info into the tree
    shutil.copytree(REPO / "falcon_bridge", source / "falcon_bridge", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("falcon_bridge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "falcon_bridge/model_cards/falcon-h1-0.5b.yaml" in names
    assert "falcon_bridge/model_cards/tiny/tiny-one-group.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(wheel).read(metadata).decode()
    # installed into its own directory, without dependencies: torch and the rest come from this environment
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "FALCON_BRIDGE_CARDS"} | {"PYTHONPATH": str(tmp_path / "site")}
    work = tmp_path / "elsewhere"
    work.mkdir()

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True)

    where = run("-c", "import falcon_bridge; print(falcon_bridge.__file__)")
    assert where.stdout.strip().startswith(str(tmp_path / "site")), where
    cards = run("-m", "falcon_bridge.cli.app", "cards")
    assert cards.returncode == 0 and "falcon-h1-tiny-90m" in cards.stdout, cards.stderr
    created = run("-m", "falcon_bridge.cli.app", "create-random", "tiny-one-group", "hf", "--json")
    assert created.returncode == 0 and (work / "hf" / "model.safetensors").exists(), created.stderr
    demo = run("-m", "falcon_bridge.cli.app", "demo", "--workdir", "demo")
    assert demo.returncode == 0 and "PASS" in demo.stdout, demo.stdout + demo.stderr
