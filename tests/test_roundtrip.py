"""export-hf and reshard: HF → import (TP a, PP b) → reshard (TP c, PP d) → export is bit-identical to the source."""

import json
import os

import pytest
import torch
from conftest import TINY_CARDS, TINY_LLAMA_CARDS, edited_megatron_checkpoint, legacy_layout_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from falcon_bridge.cards import Card, load_card
from falcon_bridge.converters.create_random import CreateRandomOptions, create_random
from falcon_bridge.converters.export_hf import ExportOptions, export_hf
from falcon_bridge.converters.import_hf import ImportOptions, import_hf
from falcon_bridge.converters.reshard import ReshardOptions, reshard
from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.hf import ulp_differences


def hf_tensors(path):
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def assert_bit_identical(source, result):
    """Same tensor names, dtypes, shapes and bytes (ulp_differences: None = missing or dtype/shape differ), and the
    same config.json."""
    differing = {name: d for name, d in ulp_differences(source, result).items() if d != 0}
    assert not differing, differing
    assert json.loads((source / "config.json").read_text()) == json.loads((result / "config.json").read_text())


ROUTES = [((1, 1), (2, 1)), ((2, 1), (1, 2)), ((2, 2), (1, 1)), ((1, 2), (2, 2))]


@pytest.mark.parametrize("card", TINY_CARDS + TINY_LLAMA_CARDS)
@pytest.mark.parametrize("first,second", ROUTES, ids=[f"tp{a}pp{b}-tp{c}pp{d}" for (a, b), (c, d) in ROUTES])
def test_import_reshard_export_is_bit_identical(card, first, second, tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf[card]), tmp_path / "a", MegatronLayout(*first)))
    reshard(ReshardOptions(tmp_path / "a", tmp_path / "b", MegatronLayout(*second)))
    summary = export_hf(ExportOptions(tmp_path / "b", tmp_path / "hf"))
    assert_bit_identical(tiny_hf[card], tmp_path / "hf")
    assert summary.diverged_group_replicas == {}


def test_bf16_source_stored_as_fp32_exports_bf16_bit_identical(tmp_path):
    create_random(CreateRandomOptions(load_card("tiny-groups-gated-norm"), tmp_path / "src", seed=5,
                                      dtype=torch.bfloat16))
    import_hf(ImportOptions(str(tmp_path / "src"), tmp_path / "mg", MegatronLayout(tp=2), dtype=torch.float32))
    assert mg.TorchDistReader(tmp_path / "mg" / "iter_0000000").tensors["decoder.final_norm.weight"][1] == torch.float32
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "hf"))
    assert_bit_identical(tmp_path / "src", tmp_path / "hf")


def test_exported_checkpoint_loads_in_transformers_without_remote_code(tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf["tiny-tied"]), tmp_path / "mg", MegatronLayout(tp=2, pp=2)))
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "hf", max_shard_bytes=50_000))
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=False)
    source = AutoModelForCausalLM.from_pretrained(tiny_hf["tiny-tied"])
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_diverged_group_replicas_are_averaged_and_reported(tiny_hf, tmp_path):
    """An older checkpoint, which stored TP=2's two copies of the one group, trained by a version that did not
    keep them in sync."""
    import_hf(ImportOptions(str(tiny_hf["tiny-one-group"]), tmp_path / "new", MegatronLayout(tp=2)))
    legacy_layout_checkpoint(tmp_path / "new", tmp_path / "mg", tp=2)  # 1 group stored as 2 copies
    key = "decoder.layers.1.mamba_mixer.in_proj.weight.B"
    original = {}

    def train(tensors):  # "training" moved the second replica of the group
        rows = tensors[key].shape[0] // 2
        original["B"] = tensors[key][:rows].clone()
        tensors[key][rows:] += 0.5

    trained = edited_megatron_checkpoint(tmp_path / "mg", tmp_path / "trained", train)
    summary = export_hf(ExportOptions(trained, tmp_path / "hf"))
    assert summary.diverged_group_replicas == {"model.layers.1.mamba.in_proj.weight": pytest.approx(0.5)}
    (warning,) = summary.warnings  # printed by the CLI on stderr
    assert warning.startswith("model.layers.1.mamba.in_proj.weight: the replicated Mamba B/C groups diverged")
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        in_proj = f.get_tensor("model.layers.1.mamba.in_proj.weight")
    arch = load_card("tiny-one-group").arch
    b = in_proj[2 * arch.mamba_d_ssm: 2 * arch.mamba_d_ssm + arch.group_state]
    assert torch.allclose(b, original["B"] + 0.25)


def test_reshard_checks_the_new_layout(tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf["tiny-one-group"]), tmp_path / "mg", MegatronLayout()))
    with pytest.raises(BadInput, match="--pp-layers 1,2: need 2 positive counts"):
        reshard(ReshardOptions(tmp_path / "mg", tmp_path / "out", MegatronLayout(pp=2, pp_layers=(1, 2))))
    summary = reshard(ReshardOptions(tmp_path / "mg", tmp_path / "out", MegatronLayout(pp=2, pp_layers=(1, 3))))
    assert summary.pp_layers == [1, 3]
    assert not (tmp_path / "bad").exists()


def test_bad_megatron_inputs_are_one_clear_error(tiny_hf, tmp_path):
    import_hf(ImportOptions(str(tiny_hf["tiny-one-group"]), tmp_path / "mg", MegatronLayout()))
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", {}, "no latest_checkpointed_iteration.txt"))
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "latest_checkpointed_iteration.txt").write_text("7\n")
    cases.append((tmp_path / "dangling", {}, "iter_0000007 does not exist"))
    cases.append((tmp_path / "mg", {"card": "tiny-attn-width"}, "has shape"))
    cases.append((tmp_path / "mg", {"card": "tiny-groups-gated-norm"}, "do not match|missing"))
    for src, kw, message in cases:
        with pytest.raises(BadInput, match=message):
            export_hf(ExportOptions(src, tmp_path / "out", **kw))
        assert not (tmp_path / "out").exists()
    (tmp_path / "mg" / "iter_0000000" / mg.RUN_CONFIG_FILE).unlink()  # as Megatron-LM saves it: neither our
    (tmp_path / "mg" / "iter_0000000" / mg.BRIDGE_RUN_CONFIG_FILE).unlink()  # run config nor Bridge's
    with pytest.raises(BadInput, match="--card NAME or --hf-config"):
        export_hf(ExportOptions(tmp_path / "mg", tmp_path / "out"))
    # the architecture given explicitly
    export_hf(ExportOptions(tmp_path / "mg", tmp_path / "out", card="tiny-one-group"))
    assert_bit_identical(tiny_hf["tiny-one-group"], tmp_path / "out")


# ---- property: random small architectures and TP/PP pairs -------------------------------------------------------
@st.composite
def small_architectures(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    heads = kv * draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    mamba_heads = groups * draw(st.sampled_from([2, 4]))
    head_dim, mamba_head_dim, state = draw(st.sampled_from([4, 8])), draw(st.sampled_from([4, 8])), 4
    arch = FalconH1Arch(
        vocab_size=draw(st.integers(33, 300)), hidden_size=draw(st.sampled_from([16, 24])),
        intermediate_size=draw(st.sampled_from([16, 40])), num_layers=draw(st.sampled_from([2, 4])),
        num_heads=heads, num_kv_heads=kv, head_dim=head_dim, mamba_d_ssm=mamba_heads * mamba_head_dim,
        mamba_n_heads=mamba_heads, mamba_d_head=mamba_head_dim, mamba_n_groups=groups, mamba_d_state=state,
        mamba_rms_norm=draw(st.booleans()), mamba_norm_before_gate=False, mamba_chunk_size=128, rope_theta=1e11,
        tie_word_embeddings=draw(st.booleans()))
    return arch


# CI runs a fixed set of 12 examples (derandomized); FB_PROPERTY_EXAMPLES=N explores N fresh random ones.
EXPLORE = os.environ.get("FB_PROPERTY_EXAMPLES")


@settings(max_examples=int(EXPLORE or 12), deadline=None, derandomize=not EXPLORE,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arch=small_architectures(), first=st.sampled_from([(1, 1), (2, 1), (1, 2)]),
       second=st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 1)]), data=st.data())
def test_roundtrip_property(arch, first, second, data, tmp_path_factory):
    assert_round_trip(arch, first, second, tmp_path_factory.mktemp("prop"), seed=data.draw(st.integers(0, 9)),
                      dtype=data.draw(st.sampled_from([torch.float32, torch.bfloat16])))


def assert_round_trip(arch, first, second, tmp, seed: int, dtype: torch.dtype) -> None:
    """A random checkpoint of `arch` through import at `first` (TP, PP), reshard to `second` and export comes back
    bit-identical — or, for a layout the architecture cannot take, is refused."""
    create_random(CreateRandomOptions(Card("prop", "", arch, True, None, {}), tmp / "src", seed=seed, dtype=dtype))

    def fits(tp, pp):
        try:
            MegatronLayout(tp=tp, pp=pp).validate(arch)
            return True
        except BadInput:
            return False

    if not (fits(*first) and fits(*second)):  # refused layouts are the bad-input tests' business
        with pytest.raises(BadInput):
            import_hf(ImportOptions(str(tmp / "src"), tmp / "a", MegatronLayout(*first)))
            reshard(ReshardOptions(tmp / "a", tmp / "b", MegatronLayout(*second)))
        return
    import_hf(ImportOptions(str(tmp / "src"), tmp / "a", MegatronLayout(*first)))
    reshard(ReshardOptions(tmp / "a", tmp / "b", MegatronLayout(*second)))
    export_hf(ExportOptions(tmp / "b", tmp / "hf"))
    assert_bit_identical(tmp / "src", tmp / "hf")


@pytest.mark.slow
def test_half_billion_card_round_trip_is_bit_identical(tmp_path):
    """The released 0.5B shape (bf16, 521,411,104 parameters): import at TP=2 (one Mamba group replicated),
    reshard to PP=2, export — byte for byte the source."""
    create_random(CreateRandomOptions(load_card("falcon-h1-0.5b"), tmp_path / "src", seed=0, dtype=torch.bfloat16))
    import_hf(ImportOptions(str(tmp_path / "src"), tmp_path / "a", MegatronLayout(tp=2)))
    reshard(ReshardOptions(tmp_path / "a", tmp_path / "b", MegatronLayout(tp=1, pp=2)))
    export_hf(ExportOptions(tmp_path / "b", tmp_path / "hf"))
    assert_bit_identical(tmp_path / "src", tmp_path / "hf")


def test_ulp_differences_name_what_differs(tiny_hf, tmp_path):
    """The comparison behind assert_bit_identical: 0 for the same bytes, the ulp distance otherwise, None for a
    tensor missing on one side or stored with another dtype."""
    from safetensors.torch import save_file

    source = tiny_hf["tiny-mup"]
    tensors = hf_tensors(source)
    norm, conv = "model.final_layernorm.weight", "model.layers.0.mamba.conv1d.weight"
    tensors[norm] = (tensors[norm].view(torch.int32) + 3).view(torch.float32)  # 3 ulps away
    tensors[conv] = tensors[conv].double()
    del tensors["model.embed_tokens.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    ulps = ulp_differences(source, tmp_path)
    assert ulps[norm] == 3 and ulps[conv] is None and ulps["model.embed_tokens.weight"] is None
    assert all(d == 0 for name, d in ulps.items() if name not in (norm, conv, "model.embed_tokens.weight"))
