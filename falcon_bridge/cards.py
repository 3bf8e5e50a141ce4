"""Model cards: one YAML per Falcon-H1 release (falcon_bridge/model_cards/*.yaml) or tiny test shape
(falcon_bridge/model_cards/tiny/*.yaml), shipped inside the package so that a wheel has them.

A card holds the architecture and the 14 µP multipliers, and for released sizes the provenance of every value
(verified = read from a copy of the released config.json; otherwise the source it came from).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.errors import BadInput

CARDS_DIR = Path(os.environ.get("FALCON_BRIDGE_CARDS", Path(__file__).resolve().parent / "model_cards"))


@dataclass(frozen=True)
class Provenance:
    verified: bool
    source: str  # a citation, from the card's `sources`


@dataclass(frozen=True)
class Card:
    name: str
    summary: str
    arch: FalconH1Arch
    is_test: bool
    hf_repo: str | None
    provenance: dict[str, Provenance]  # per architecture field and multiplier key; empty for test cards

    @property
    def verified(self) -> bool:
        return not self.is_test and all(p.verified for p in self.provenance.values())


def card_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CARDS_DIR.rglob("*.yaml"))}


def load_card(name_or_path: str | Path) -> Card:
    path = Path(name_or_path)
    if not path.is_file():
        paths = card_paths()
        if str(name_or_path) not in paths:
            raise BadInput(f"unknown card {name_or_path!r}; known: {', '.join(paths)}")
        path = paths[str(name_or_path)]
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({e})") from None
    for key in ("name", "architecture", "multipliers"):
        if key not in (doc or {}):
            raise BadInput(f"{path}: required field {key!r} is missing")
    arch = FalconH1Arch.from_dict({**doc["architecture"], "multipliers": doc["multipliers"]}, source=str(path))
    is_test = doc.get("kind") == "test"
    provenance: dict[str, Provenance] = {}
    if not is_test:
        sources = doc.get("sources") or {}
        prov = dict(doc.get("provenance") or {})
        default = prov.pop("default", None)
        for key in [*doc["architecture"], *doc["multipliers"]]:
            entry = prov.pop(key, default)
            if entry is None or entry.get("source") not in sources:
                raise BadInput(f"{path}: field {key!r} has no provenance naming one of its sources")
            provenance[key] = Provenance(bool(entry["verified"]), sources[entry["source"]])
        if prov:
            raise BadInput(f"{path}: provenance for unknown field(s) {sorted(prov)}")
    return Card(doc["name"], doc.get("summary", ""), arch, is_test, doc.get("hf_repo"), provenance)


def all_cards() -> list[Card]:
    return [load_card(p) for p in card_paths().values()]
