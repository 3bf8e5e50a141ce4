import warnings
from pathlib import Path

import pytest
import torch

from falcon_bridge.converters.create_random import create_random
from falcon_bridge.formats.cards import all_cards, load_card

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")

TINY_CARDS = [c.name for c in all_cards() if c.is_test]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    """A random fp32 HF checkpoint for every tiny card (made once per test session)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in TINY_CARDS:
        out[name] = root / name
        create_random(load_card(name), out[name], seed=1, dtype=torch.float32)
    return out
