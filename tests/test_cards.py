import pytest
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import FalconH1Config

from falcon_bridge.cards import all_cards, load_card
from falcon_bridge.core.config import REQUIRED_HF_KEYS, FalconH1Arch
from falcon_bridge.core.families import arch_from_hf
from falcon_bridge.core.mapping import num_parameters
from falcon_bridge.errors import BadInput

RELEASED = ["falcon-h1-0.5b", "falcon-h1-1.5b", "falcon-h1-1.5b-deep", "falcon-h1-3b", "falcon-h1-7b", "falcon-h1-34b",
            "falcon-h1-tiny-90m"]
# parameter counts published for the released checkpoints (Hugging Face API / model pages)
PUBLISHED_PARAMETERS = {"falcon-h1-0.5b": 521_411_104, "falcon-h1-1.5b": 1_554_863_488, "falcon-h1-7b": 7_585_654_880}


def test_every_released_size_has_a_card_with_provenance():
    cards = {c.name: c for c in all_cards()}
    for name in RELEASED:
        card = cards[name]
        assert not card.is_test and card.hf_repo.startswith("tiiuae/")
        assert set(card.provenance) == set(card.arch.to_dict()) - {"hidden_act", "multipliers"} | set(
            card.arch.multipliers.to_hf())  # every value has a provenance
        assert all(p.source for p in card.provenance.values())
    # fully verified: the sizes whose config.json (or TII's per-size provider) we have a copy of
    assert cards["falcon-h1-0.5b"].verified and cards["falcon-h1-34b"].verified
    for name in ("falcon-h1-1.5b-deep", "falcon-h1-7b"):  # every multiplier verified; token ids assumed
        assert all(cards[name].provenance[k].verified for k in cards[name].arch.multipliers.to_hf())
    for name in ("falcon-h1-1.5b", "falcon-h1-3b"):  # multipliers not found: the card says so
        assert not cards[name].verified and not cards[name].provenance["ssm_multipliers"].verified


@pytest.mark.parametrize("card", PUBLISHED_PARAMETERS)
def test_card_has_the_released_parameter_count(card):
    assert num_parameters(load_card(card).arch) == PUBLISHED_PARAMETERS[card]


def test_the_released_tied_model_has_non_unit_embedding_and_lm_head_multipliers():
    tiny = load_card("falcon-h1-tiny-90m").arch
    assert tiny.tie_word_embeddings and tiny.eos_token_id == (228, 11)
    assert tiny.multipliers.embedding == 0.11083984375 and tiny.multipliers.lm_head == 0.078125
    tied_test_card = load_card("tiny-tied").arch.multipliers
    assert tied_test_card.embedding != 1.0 and tied_test_card.lm_head != 1.0


def test_tiny_cards_cover_the_required_shapes():
    tiny = {c.name: c.arch for c in all_cards() if c.is_test and c.arch.family == FalconH1Arch.family}
    assert any(a.mamba_n_groups == 1 and not a.mamba_rms_norm for a in tiny.values())
    assert any(a.mamba_n_groups > 1 and a.mamba_rms_norm for a in tiny.values())
    assert any(a.tie_word_embeddings and a.multipliers.embedding != 1.0 and a.multipliers.lm_head != 1.0
               for a in tiny.values())
    assert any(a.q_width != a.hidden_size for a in tiny.values())
    assert any(a.vocab_size % 128 for a in tiny.values())
    assert any(all(v != 1.0 for v in a.multipliers.flat()) for a in tiny.values())


@pytest.mark.parametrize("card", [c.name for c in all_cards()])
def test_card_to_transformers_config_and_back(card):
    arch = load_card(card).arch
    hf = arch.to_hf_config()
    assert type(hf).__name__ == arch.hf_config_class and hf.head_dim == arch.head_dim
    assert type(arch).from_hf_config(hf) == arch
    assert arch_from_hf(arch.to_hf(), "config.json") == arch  # the family is read off model_type


def test_config_json_missing_a_required_field_is_named():
    cfg = load_card("tiny-mup").arch.to_hf()
    del cfg["mamba_n_heads"]
    with pytest.raises(BadInput, match="mamba_n_heads"):
        FalconH1Arch.from_hf(cfg)


def test_unknown_card_lists_the_known_ones():
    with pytest.raises(BadInput, match="falcon-h1-0.5b"):
        load_card("falcon-h1-9b")


def hf_resolved(cfg: dict) -> FalconH1Arch | None:
    """The architecture transformers' FalconH1Config makes of a config dict (None: transformers refuses it)."""
    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    try:
        return FalconH1Arch.from_hf_config(FalconH1Config(**kw))
    except (ValueError, TypeError, BadInput, StrictDataclassClassValidationError):
        return None


OPTIONAL_KEYS = [k for k in load_card("tiny-mup").arch.to_hf() if k not in REQUIRED_HF_KEYS + (
    "architectures", "model_type", "rope_theta")]


@pytest.mark.parametrize("key", OPTIONAL_KEYS)
def test_an_absent_field_means_what_it_means_to_transformers(key):
    """Dropping any optional field gives the architecture transformers builds from the same dict (its defaults,
    e.g. mamba_d_ssm 1024, mamba_chunk_size 256, mamba_norm_before_gate true), or a refusal where it refuses."""
    cfg = load_card("tiny-mup").arch.to_hf()
    del cfg[key]
    theirs = hf_resolved(cfg)
    try:
        ours = FalconH1Arch.from_hf(cfg)
    except BadInput:
        assert theirs is None, key  # refused by both
        return
    assert ours == theirs, key


UNSUPPORTED_VALUES = {
    "time_step_limit": [0.001, 0.1],
    "rope_scaling": {"rope_type": "linear", "factor": 2.0},
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0},
    "attention_dropout": 0.1,
    "num_logits_to_keep": 4,
    "layer_types": ["attention"] * 4,
}


@pytest.mark.parametrize("key", UNSUPPORTED_VALUES)
def test_fields_our_model_does_not_implement_are_refused_unless_default(key):
    cfg = load_card("tiny-mup").arch.to_hf()
    with pytest.raises(BadInput, match=f"field {key}.* is not supported"):
        FalconH1Arch.from_hf(cfg | {key: UNSUPPORTED_VALUES[key]})
    defaults = {"time_step_limit": [0.0, float("inf")], "rope_scaling": None, "attention_dropout": 0.0,
                "num_logits_to_keep": 1, "layer_types": ["hybrid"] * 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg["rope_theta"]}}
    assert FalconH1Arch.from_hf(cfg | {key: defaults[key]}) == load_card("tiny-mup").arch


def test_rope_theta_must_be_written():
    cfg = load_card("tiny-mup").arch.to_hf()
    del cfg["rope_theta"]
    with pytest.raises(BadInput, match="rope_theta is missing"):
        FalconH1Arch.from_hf(cfg)


@pytest.mark.parametrize("card", [c.name for c in all_cards()])
def test_commands_writing_a_cards_values_name_the_unverified_ones(card):
    """create-random and export-hf --card carry this warning in their summary (and --json): the placeholder
    multipliers of the 1.5B and 3B cards are written without a word otherwise."""
    c = load_card(card)
    unverified = sorted(name for name, p in c.provenance.items() if not p.verified)
    (warning,) = c.unverified_warning() or [None]
    assert (warning is None) == (not unverified)
    if unverified:
        assert warning.endswith(": " + ", ".join(unverified)) and card in warning


def test_create_random_reports_the_unverified_values_it_wrote(tmp_path):
    from dataclasses import replace

    from falcon_bridge.cards import Provenance
    from falcon_bridge.converters.create_random import CreateRandomOptions, create_random

    card = replace(load_card("tiny-one-group"), is_test=False, provenance={
        "hidden_size": Provenance(True, "a config"), "ssm_in_multiplier": Provenance(False, "placeholder")})
    summary = create_random(CreateRandomOptions(card, tmp_path / "hf"))
    assert summary.to_json()["warnings"] == card.unverified_warning()
    assert summary.warnings[0].endswith("were written as the card holds them: ssm_in_multiplier")
