import pytest
from transformers import FalconH1Config

from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.errors import BadInput
from falcon_bridge.formats.cards import all_cards, load_card

RELEASED = ["falcon-h1-0.5b", "falcon-h1-1.5b", "falcon-h1-1.5b-deep", "falcon-h1-3b", "falcon-h1-7b", "falcon-h1-34b"]


def test_every_released_size_has_a_card_with_provenance():
    cards = {c.name: c for c in all_cards()}
    for name in RELEASED:
        card = cards[name]
        assert not card.is_test and card.hf_repo.startswith("tiiuae/")
        assert set(card.provenance) >= {"hidden_size", "embedding_multiplier", "ssm_multipliers", "mlp_multipliers"}
        assert all(p.source for p in card.provenance.values())
    # only the sizes whose config.json we have a copy of are verified; the others say so
    assert cards["falcon-h1-0.5b"].verified and cards["falcon-h1-34b"].verified
    for name in ("falcon-h1-1.5b", "falcon-h1-1.5b-deep", "falcon-h1-3b", "falcon-h1-7b"):
        assert not cards[name].verified
        assert not cards[name].provenance["lm_head_multiplier"].verified


def test_half_billion_card_has_the_released_parameter_count():
    assert load_card("falcon-h1-0.5b").arch.num_parameters() == 521_411_104


def test_tiny_cards_cover_the_required_shapes():
    tiny = {c.name: c.arch for c in all_cards() if c.is_test}
    assert any(a.mamba_n_groups == 1 and not a.mamba_rms_norm for a in tiny.values())
    assert any(a.mamba_n_groups > 1 and a.mamba_rms_norm for a in tiny.values())
    assert any(a.tie_word_embeddings for a in tiny.values())
    assert any(a.q_width != a.hidden_size for a in tiny.values())
    assert any(a.vocab_size % 128 for a in tiny.values())
    assert any(all(v != 1.0 for v in a.multipliers.flat()) for a in tiny.values())


@pytest.mark.parametrize("card", [c.name for c in all_cards()])
def test_card_to_transformers_config_and_back(card):
    arch = load_card(card).arch
    hf = arch.to_hf_config()
    assert isinstance(hf, FalconH1Config)
    assert hf.head_dim == arch.head_dim and hf.mamba_d_ssm == arch.mamba_d_ssm
    assert FalconH1Arch.from_hf_config(hf) == arch
    assert FalconH1Arch.from_hf(arch.to_hf()) == arch


def test_config_json_missing_a_required_field_is_named():
    cfg = load_card("tiny-mup").arch.to_hf()
    del cfg["mamba_n_heads"]
    with pytest.raises(BadInput, match="mamba_n_heads"):
        FalconH1Arch.from_hf(cfg)


def test_unknown_card_lists_the_known_ones():
    with pytest.raises(BadInput, match="falcon-h1-0.5b"):
        load_card("falcon-h1-9b")
