import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from falcon_bridge.cards import all_cards, load_card
from falcon_bridge.cli import app as cli_app
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.core.config import FalconH1Arch

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

# the tiny test shapes of each family (TINY_CARDS: Falcon-H1's, which most tests run over)
TINY_CARDS = [c.name for c in all_cards() if c.is_test and c.arch.family == FalconH1Arch.family]
TINY_LLAMA_CARDS = [c.name for c in all_cards() if c.is_test and c.arch.family == "llama"]


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """`falcon-bridge ARGS` through main(), in this process: (exit code, stdout, stderr). An exception other than
    the exit main() ends with (a traceback for the user) fails the test."""
    monkeypatch.setattr(sys, "argv", ["falcon-bridge", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli_app.main()
    captured = capsys.readouterr()
    return exit_.value.code or 0, captured.out, captured.err


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """A random fp32 HF checkpoint for every tiny card (made once per test session)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in TINY_CARDS + TINY_LLAMA_CARDS:
        out[name] = root / name
        create_random(CreateRandomOptions(load_card(name), out[name], seed=1, dtype=torch.float32))
    return out


def hub_cache_with(cache: Path, repo_id: str, ref: str, checkpoint: Path) -> None:
    """The Hugging Face cache's own layout for `repo_id` at branch `ref` (refs/REF → snapshots/REV/ of symlinks
    into blobs/), holding `checkpoint`'s files: what a download left behind, opened offline."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True, exist_ok=True), snapshot.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text("0123abcd")
    for f in checkpoint.iterdir():
        (repo / "blobs" / f"blob-{f.name}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/blob-{f.name}")


def edited_megatron_checkpoint(src: Path, dst: Path, edit) -> Path:
    """A copy of a falcon-bridge Megatron checkpoint whose global tensors went through `edit(tensors)` — e.g. what
    training (or a bug) could have done to them."""
    from falcon_bridge.core.mapping import megatron_extra_state_keys
    from falcon_bridge.formats import megatron as mg

    it_dir = src / "iter_0000000"
    reader = mg.TorchDistReader(it_dir)
    tensors = {k: reader.get(k) for k in reader.tensors}
    edit(tensors)
    run_config = mg.read_run_config(it_dir)
    arch = mg.arch_from_run_config(run_config, "run config")
    mg.write_torch_dist(dst / "iter_0000000", {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()},
                        tensors.__getitem__, objects=dict.fromkeys(megatron_extra_state_keys(arch)))
    mg.write_run_config(dst / "iter_0000000", run_config)
    mg.write_tracker(dst)
    return dst


def legacy_layout_checkpoint(src: Path, dst: Path, tp: int) -> Path:
    """A copy of a falcon-bridge checkpoint in the layout written before checkpoints became TP-agnostic: the
    vocabulary padded for `tp` and the Mamba B/C groups replicated up to it."""
    from falcon_bridge.core import transforms as T
    from falcon_bridge.core.parallel import MegatronLayout
    from falcon_bridge.formats import megatron as mg

    arch = FalconH1Arch.from_dict(mg.read_run_config(src / "iter_0000000")["architecture"])
    layout = MegatronLayout(tp=tp)

    def edit(tensors):
        for key in list(tensors):
            if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
                tensors[key] = T.pad_vocab(tensors[key], layout.padded_vocab(arch))
            elif key.endswith((".B", ".C")):
                tensors[key] = T.replicate_groups(tensors[key], arch.mamba_n_groups, layout.group_factor(arch))
    return edited_megatron_checkpoint(src, dst, edit)


def venv_seeing_this_environment(venv: Path) -> Path:
    """A fresh virtual environment at `venv` whose interpreter also finds this environment's packages (a .pth
    after its own site-packages), so pip installs into it find the dependencies installed instead of downloading
    them. Returns its python."""
    subprocess.run([Path(sys.base_prefix) / "bin" / "python3.12", "-m", "venv", venv], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "this_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python
