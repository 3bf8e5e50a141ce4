"""A built wheel carries everything the CLI needs (the model cards included) and runs outside the source tree."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import venv_seeing_this_environment

import falcon_bridge

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
    version = run("-m", "falcon_bridge.cli.app", "--version")
    assert version.returncode == 0 and version.stdout == f"falcon-bridge {wheel.name.split('-')[1]}\n", version
    cards = run("-m", "falcon_bridge.cli.app", "cards")
    assert cards.returncode == 0 and "falcon-h1-tiny-90m" in cards.stdout, cards.stderr
    created = run("-m", "falcon_bridge.cli.app", "create-random", "tiny-one-group", "hf", "--json")
    assert created.returncode == 0 and (work / "hf" / "model.safetensors").exists(), created.stderr
    demo = run("-m", "falcon_bridge.cli.app", "demo", "--workdir", "demo")
    assert demo.returncode == 0 and "PASS" in demo.stdout, demo.stdout + demo.stderr


def readme_install_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    return text.split("<!-- install-example", 1)[1].split("```", 2)[1].strip().splitlines()


def test_readme_install_lines_run_as_shown(tmp_path):
    """README's install lines, in a copy of the project, with `python3.12` on PATH. Their .venv is made beforehand
    with this environment's packages visible (a .pth), so `pip install` finds the dependencies installed instead of
    downloading PyTorch again; the lines themselves run unchanged."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", ".venv*", ".gpu", "build", "dist", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", ".ruff_cache",
                                                               ".hypothesis"))
    venv_seeing_this_environment(clone / ".venv")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python3.12").symlink_to(Path(sys.base_prefix) / "bin" / "python3.12")
    env = os.environ | {"PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    for line in readme_install_lines():
        done = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True)
        assert done.returncode == 0, (line, done.stderr[-3000:])
    assert done.stdout == f"falcon-bridge {falcon_bridge.__version__}\n"
