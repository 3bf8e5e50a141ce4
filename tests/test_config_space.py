"""Every Falcon-H1 config transformers runs converts, or is refused in one line naming a field.

Mamba in_proj/out_proj biases (mamba_proj_bias, projectors_bias: each alone or both), the gated Mamba norm before
the gate (mamba_norm_before_gate, transformers' default) and with an rms_norm_eps other than megatron-core's fixed
1e-5: megatron-core's MambaMixer refuses all of them, our model (megatron/model.py) computes them as HF does. Each
is proven against transformers' FalconH1ForCausalLM: logits (fp32, TP 1/2/4, µP preserved and folded), the
HF → import → reshard → export round trip byte for byte, and every parameter's gradient.
"""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from megatron_workers import train_and_save
from test_roundtrip import assert_bit_identical
from test_training_parity import exported, hf_loss_and_gradients, relative_error
from transformers import FalconH1Config

from falcon_bridge.cards import Card, load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.reshard import ReshardOptions, reshard
from falcon_bridge.converters.verify import compare_logits, hf_logits, hf_model, sample_tokens
from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.megatron.distributed import launch
from falcon_bridge.megatron.forward import megatron_logits_worker

ONE_GROUP = load_card("tiny-one-group-gated-norm").arch  # µP multipliers, gated norm, 1 group: TP 2/4 span it
TWO_GROUPS = load_card("tiny-groups-gated-norm").arch
# the configs megatron-core cannot express and our model now converts
CONFIGS = {
    "in-and-out-proj-bias": replace(ONE_GROUP, mamba_proj_bias=True, projectors_bias=True),
    "in-proj-bias": replace(TWO_GROUPS, mamba_proj_bias=True, mamba_rms_norm=False),
    "out-proj-bias": replace(ONE_GROUP, projectors_bias=True),
    "norm-before-gate": replace(ONE_GROUP, mamba_norm_before_gate=True),
    "norm-eps": replace(TWO_GROUPS, rms_norm_eps=1e-6),
    "all-of-them": replace(TWO_GROUPS, mamba_proj_bias=True, projectors_bias=True, mamba_norm_before_gate=True,
                           rms_norm_eps=1e-3, multipliers=ONE_GROUP.multipliers),
}
TOKENS = sample_tokens(256, batch=2, seq_len=24, seed=7)  # 24 > mamba_chunk_size 8: the scan crosses chunks


def write_hf(arch: FalconH1Arch, directory, seed: int = 1):
    create_random(CreateRandomOptions(Card(directory.name, "", arch, True, None, {}), directory, seed=seed,
                                      dtype=torch.float32))
    return directory


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("space")
    return {name: write_hf(arch, root / name) for name, arch in CONFIGS.items()}


def test_the_new_features_change_the_logits(sources):
    """The parity tests below are not vacuous: HF's logits move when a bias is zeroed or the gate order flipped."""
    def logits(name, edit):
        model = hf_model(sources[name], torch.float32, "cpu")
        edit(model)
        with torch.no_grad():
            return model(TOKENS).logits

    def zero(suffix):
        def edit(model):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if name.endswith(suffix):
                        p.zero_()
        return edit

    def flip_gate_order(model):
        for layer in model.model.layers:
            layer.mamba.norm.norm_before_gate = not layer.mamba.norm.norm_before_gate

    for name, edit in [("in-and-out-proj-bias", zero("mamba.in_proj.bias")),
                       ("in-and-out-proj-bias", zero("mamba.out_proj.bias")),
                       ("norm-before-gate", flip_gate_order)]:
        assert relative_error(logits(name, edit), logits(name, lambda m: None)) > 1e-3, name


@pytest.mark.parametrize("tp,mup", [(1, "preserve"), (2, "preserve"), (2, "fold"), (4, "preserve")])
def test_logits_equal_hf(sources, tmp_path, tp, mup):
    """fp32, max |Δ| ≤ 1e-5 · max |logit|. TP 2 and 4 exceed the one-group configs' group count (replicated B/C
    rows of in_proj's bias, a norm group spanning ranks), TP 4 the two-group ones'; folded µP puts the segment
    multipliers into in_proj's bias and ssm_out into out_proj's."""
    for name in sources:
        import_hf(ImportOptions(str(sources[name]), tmp_path / name, MegatronLayout(tp=tp), mup_mode=mup))
    results = launch(megatron_logits_worker, tp, [str(tmp_path / name) for name in sources], tp, 1, TOKENS,
                     "float32")
    for name, logits in zip(sources, results):
        r = compare_logits(hf_logits(sources[name], TOKENS, torch.float32), logits, tolerance=1e-5)
        assert r.passed and r.argmax_agreement == 1.0, f"{name} TP={tp} {mup}: {r}"


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_is_bit_identical(sources, tmp_path, name):
    import_hf(ImportOptions(str(sources[name]), tmp_path / "a", MegatronLayout(tp=2)))
    reshard(ReshardOptions(tmp_path / "a", tmp_path / "b", MegatronLayout(tp=1, pp=2)))
    summary = export_hf(ExportOptions(tmp_path / "b", tmp_path / "hf"))
    assert_bit_identical(sources[name], tmp_path / "hf")
    assert summary.diverged_group_replicas == {}


GRADIENT_CASES = [(name, 2) for name in CONFIGS] + [("all-of-them", 1), ("all-of-them", 4),
                                                     ("norm-before-gate", 4)]


@pytest.mark.parametrize("name,tp", GRADIENT_CASES, ids=[f"{n}-tp{t}" for n, t in GRADIENT_CASES])
def test_every_gradient_equals_hf(sources, tmp_path, name, tp):
    """One step's gradients under megatron-core's DDP, saved in the weights' place and exported to HF names, equal
    transformers' for every parameter, the new biases and the norm included."""
    import_hf(ImportOptions(str(sources[name]), tmp_path / "mg", MegatronLayout(tp=tp)))
    spread = launch(train_and_save, tp, str(tmp_path / "mg"), tp, 1, [TOKENS], str(tmp_path / "grads"), True)
    assert spread == 0  # the TP ranks' copies of a replicated B/C group (in_proj bias rows too) got one gradient
    export_hf(ExportOptions(tmp_path / "grads", tmp_path / "grads-hf"))
    ours, reference = exported(tmp_path / "grads-hf"), hf_loss_and_gradients(sources[name], TOKENS)
    assert set(ours) == set(reference) - {"loss"}
    assert any(n.endswith(("mamba.in_proj.bias", "mamba.out_proj.bias", "mamba.norm.weight")) for n in ours)
    errors = {n: relative_error(ours[n], reference[n]) for n in ours}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, f"{name} TP={tp}: {worst} gradient off by {errors[worst]:.2e} (relative)"


def test_a_refused_config_is_one_error_line_naming_the_field(tmp_path):
    src = write_hf(replace(ONE_GROUP, mamba_conv_bias=False), tmp_path / "src")
    proc = subprocess.run([sys.executable, "-m", "falcon_bridge.cli.app", "import-hf", str(src),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and "mamba_conv_bias" in line
    assert not (tmp_path / "out").exists()


# ---- property: the config space around the Mamba mixer --------------------------------------------------------
def transformers_config(arch: FalconH1Arch, fields: dict) -> FalconH1Config:
    """`arch`'s config with `fields` set (mamba_norm_before_gate left out unless given: transformers' default)."""
    base = arch.to_hf()
    for key in ("architectures", "model_type", "mamba_norm_before_gate"):
        base.pop(key)
    theta = base.pop("rope_theta")
    return FalconH1Config(**(base | fields), rope_parameters={"rope_type": "default", "rope_theta": theta})


@st.composite
def mixer_configs(draw):
    """A transformers FalconH1Config over the mixer's switches, the fields drawn, and a TP for it."""
    fields = {"mamba_proj_bias": draw(st.booleans()), "projectors_bias": draw(st.booleans()),
              "mamba_rms_norm": draw(st.booleans()), "rms_norm_eps": draw(st.sampled_from([1e-5, 1e-6, 1e-3])),
              "mamba_conv_bias": draw(st.sampled_from([True, True, False]))}
    before_gate = draw(st.sampled_from([True, False, None]))  # None: absent
    if before_gate is not None:
        fields["mamba_norm_before_gate"] = before_gate
    arch = draw(st.sampled_from([ONE_GROUP, TWO_GROUPS]))
    return transformers_config(arch, fields), fields, draw(st.sampled_from([1, 2, 4]))


# besides the drawn ones: the gated norm at transformers' default gate order, eps ≠ 1e-5, both biases, its one
# group spanning both TP ranks
PINNED = {"mamba_proj_bias": True, "projectors_bias": True, "mamba_rms_norm": True, "rms_norm_eps": 1e-6,
          "mamba_conv_bias": True}


EXPLORE = os.environ.get("FB_PROPERTY_EXAMPLES")  # as tests/test_roundtrip.py: N fresh random examples


@settings(max_examples=int(EXPLORE or 5), deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=mixer_configs())
@example(drawn=(transformers_config(ONE_GROUP, PINNED), PINNED, 2))
def test_each_config_converts_exactly_or_is_refused_naming_a_field(drawn, tmp_path_factory):
    config, fields, tp = drawn
    tmp = tmp_path_factory.mktemp("prop")
    arch = FalconH1Arch.from_hf_config(config)
    assert arch.mamba_norm_before_gate == config.mamba_norm_before_gate  # absent: transformers' default, as ours
    src = write_hf(arch, tmp / "src")
    try:
        import_hf(ImportOptions(str(src), tmp / "mg", MegatronLayout(tp=tp)))
    except BadInput as refusal:  # the CLI prints it as its one `error:` line
        message = str(refusal)
        assert "\n" not in message and any(field in message for field in fields), message
        assert not fields["mamba_conv_bias"], f"{fields} TP={tp} refused: {message}"  # the one field still refused
        return
    (logits,) = launch(megatron_logits_worker, tp, [str(tmp / "mg")], tp, 1, TOKENS, "float32")
    r = compare_logits(hf_logits(src, TOKENS, torch.float32), logits, tolerance=1e-5)
    assert r.passed, f"{fields} TP={tp}: {r}"
