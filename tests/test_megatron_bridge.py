"""Megatron-Bridge 0.6.2's own code, run on what we write: its checkpoint detection and train-state reader, its
config loading (`load_model_config` on run_config.yaml), `AutoBridge.from_hf_pretrained(...).to_megatron_provider()`
on our HF exports, and its Falcon-H1 mapping registry against our map table — for every card.

Bridge lives in its own environment (tools/megatron-bridge-env.sh: pinned, --no-deps, beside .venv) because its
wheel pins an older transformers; tests/megatron_bridge/probe.py runs there and reports, this module judges. When
that environment cannot be built (no package index), the module is skipped with the reason. Building Bridge's
model needs Transformer Engine, which no machine of ours has: not run here (README says so)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_CARDS

from falcon_bridge.cards import all_cards, load_card
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.core.config import SSM_SEGMENTS
from falcon_bridge.core.mapping import entries
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats import megatron as mg

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "megatron_bridge" / "probe.py"
BRIDGE_VENV = REPO / ".venv-megatron-bridge"
REAL_CARDS = [c.name for c in all_cards() if not c.is_test and c.arch.family == "falcon_h1"]  # Bridge: Falcon-H1
# Megatron-Bridge provider field → the config.json key whose value it must hold (ours: formats.megatron)
FIELDS = {f: k for f, k in mg.BRIDGE_FIELDS.items() if f != "expand"}


@pytest.fixture(scope="module")
def bridge_python() -> Path:
    built = subprocess.run([REPO / "tools" / "megatron-bridge-env.sh", BRIDGE_VENV], capture_output=True, text=True)
    if built.returncode != 0:
        reason = (built.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the Megatron-Bridge environment could not be built: {reason}")
    return BRIDGE_VENV / "bin" / "python"


def params_of(arch) -> dict[str, list[str]]:
    """Our map table: each Megatron parameter and the HF tensors it is made of."""
    return {e.megatron: list(e.hf) for e in entries(arch)}


def stored_params(it_dir: Path) -> set[str]:
    """The model parameters a checkpoint stores: its tensor keys, with the pieces megatron-core's MambaMixer splits
    in_proj and conv1d into (`.z`, `.x`, `.B`, `.C`, `.dt`) joined back into their parameter."""
    pieces = tuple(f".{segment}" for segment in SSM_SEGMENTS)  # conv1d's x|B|C are among them
    return {k.rsplit(".", 1)[0] if k.endswith(pieces) else k for k in mg.TorchDistReader(it_dir).tensors}


@pytest.fixture(scope="module")
def bridge_report(bridge_python, tiny_hf, tmp_path_factory) -> dict[str, dict]:
    """One probe run over every card: tiny cards as real import-hf (TP=2) and export-hf outputs; released sizes as
    the files those commands write around the weights (config.json, run_config.yaml), written by the same code."""
    root = tmp_path_factory.mktemp("bridge")
    cases, names = [], []
    for name in TINY_CARDS:
        out, hf = root / name / "megatron", root / name / "hf"
        import_hf(ImportOptions(str(tiny_hf[name]), out, layout=MegatronLayout(tp=2)))
        export_hf(ExportOptions(out, hf))
        arch = load_card(name).arch
        assert stored_params(out / "iter_0000000") == set(params_of(arch))
        cases.append({"checkpoint": str(out), "iteration_dir": str(out / "iter_0000000"), "hf_dir": str(hf),
                      "params": params_of(arch)})
        names.append(name)
    for name in REAL_CARDS:
        arch = load_card(name).arch
        out, hf = root / name / "megatron", root / name / "hf"
        it_dir = out / "iter_0000000"
        it_dir.mkdir(parents=True), hf.mkdir()
        mg.write_interop_files(out, it_dir, arch, arch.multipliers, torch.bfloat16, tp=2, pp=1)
        (hf / "config.json").write_text(json.dumps(arch.to_hf()))
        cases.append({"checkpoint": None, "iteration_dir": str(it_dir), "hf_dir": str(hf), "params": params_of(arch)})
        names.append(name)
    spec = root / "cases.json"
    spec.write_text(json.dumps(cases))
    run = subprocess.run([bridge_python, PROBE, spec], capture_output=True, text=True, cwd=PROBE.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(zip(names, json.loads(run.stdout.strip().splitlines()[-1]), strict=True))


def expected_provider(arch, tp: int) -> dict:
    hf = arch.to_hf()
    return {"class": "FalconH1ModelProvider", **{f: hf[k] for f, k in FIELDS.items()},
            "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": 1}


@pytest.mark.parametrize("card", TINY_CARDS + REAL_CARDS)
def test_bridge_loads_our_run_config_as_its_falcon_h1_provider(bridge_report, card):
    report = bridge_report[card]
    assert report["run_config_is_bridges"]
    assert report["run_config_provider"] == expected_provider(load_card(card).arch, tp=2)


@pytest.mark.parametrize("card", TINY_CARDS + REAL_CARDS)
def test_bridge_builds_the_same_provider_from_our_config_json(bridge_report, card):
    assert bridge_report[card]["hf_provider"] == expected_provider(load_card(card).arch, tp=1)


@pytest.mark.parametrize("card", TINY_CARDS + REAL_CARDS)
def test_bridges_mapping_registry_pairs_every_tensor_as_our_table_does(bridge_report, card):
    """Bridge converts by walking the model's parameters (Megatron → HF), so that direction must pair exactly; its
    reverse lookup answers with the first pattern registered, which for up_proj and conv1d is an alias
    (linear_fc1_up, legacy conv1d_weight): the same parameter under Bridge's other name."""
    aliases = {"feed_forward.up_proj.weight": "mlp.linear_fc1_up.weight",  # HF tensor → Bridge's other name
               "mamba.conv1d.weight": "mamba_mixer.conv1d_weight", "mamba.conv1d.bias": "mamba_mixer.conv1d_bias"}

    def as_bridge_answers(hf: str, name: str) -> str:
        layer, _, hf_param = hf.partition(".layers.")[2].partition(".")
        return f"decoder.layers.{layer}.{aliases[hf_param]}" if hf_param in aliases else name

    report, params = bridge_report[card], params_of(load_card(card).arch)
    assert report["megatron_to_hf"] == {name: sorted(hf) for name, hf in params.items()}
    assert report["hf_to_megatron"] == {hf: as_bridge_answers(hf, name) for name, names in params.items()
                                        for hf in names}


@pytest.mark.parametrize("card", TINY_CARDS)
def test_bridge_detects_our_checkpoint_and_reads_its_train_state(bridge_report, card):
    assert bridge_report[card]["checkpoint_exists"] == [True, True]
    assert bridge_report[card]["train_state_step"] == 0


def test_run_config_states_an_expand_bridge_accepts():
    """Bridge's FalconH1Config refuses expand × hidden_size not divisible by mamba_d_head although megatron-core
    takes the width from mamba_num_heads; config.json and run_config.yaml state one that passes."""
    for card in TINY_CARDS + REAL_CARDS:
        arch = load_card(card).arch
        run_config = mg.bridge_run_config(arch, arch.multipliers, torch.bfloat16, 1, 1)
        assert run_config["model"]["expand"] == arch.to_hf()["mamba_expand"] == arch.mamba_expand
        assert arch.mamba_expand * arch.hidden_size % arch.mamba_d_head == 0
    assert load_card("falcon-h1-0.5b").arch.mamba_expand == 2  # the value the released configs carry
    assert yaml.safe_load(yaml.safe_dump(run_config)) == run_config
