"""Model cards: one YAML per release (falcon_bridge/model_cards/*.yaml) or tiny test shape
(falcon_bridge/model_cards/tiny/*.yaml), shipped inside the package so that a wheel has them.

A card names its family (`family:`, absent: falcon_h1) and holds the architecture, for Falcon-H1 the 14 µP
multipliers, and for released sizes the provenance of every value (verified = read from a copy of the released
config.json; otherwise the source it came from).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from falcon_bridge.core.config import Arch
from falcon_bridge.core.families import DEFAULT_FAMILY, arch_class
from falcon_bridge.errors import BadInput, shown
from falcon_bridge.formats.untrusted import read_yaml

CARDS_DIR = Path(os.environ.get("FALCON_BRIDGE_CARDS", Path(__file__).resolve().parent / "model_cards"))


@dataclass(frozen=True)
class Provenance:
    verified: bool
    source: str  # a citation, from the card's `sources`


@dataclass(frozen=True)
class Card:
    name: str
    summary: str
    arch: Arch
    is_test: bool
    hf_repo: str | None
    provenance: dict[str, Provenance]  # per architecture field and multiplier key; empty for test cards

    @property
    def verified(self) -> bool:
        return not self.is_test and all(p.verified for p in self.provenance.values())

    def unverified_warning(self) -> list[str]:
        """The warning a command that writes this card's values into a config gives (none when all are verified):
        the fields whose values are placeholders or unconfirmed, by name."""
        fields = sorted(name for name, p in self.provenance.items() if not p.verified)
        if not fields:
            return []
        return [f"card {self.name}: {len(fields)} values are not verified against a released config and were "
                f"written as the card holds them: {', '.join(fields)}"]


def card_paths() -> dict[str, Path]:
    return {p.stem: p for p in sorted(CARDS_DIR.rglob("*.yaml"))}


def load_card(name_or_path: str | Path) -> Card:
    path = Path(name_or_path)
    if not path.is_file():
        paths = card_paths()
        if str(name_or_path) not in paths:
            raise BadInput(f"unknown card {shown(str(name_or_path))}; known: {', '.join(paths)}")
        path = paths[str(name_or_path)]
    doc = read_yaml(path, "model card")
    if not isinstance(doc, dict):
        raise BadInput(f"{path}: expected a mapping of card fields, got {type(doc).__name__}")

    def field(key: str, types: type | tuple[type, ...], expected: str, default=None):
        value = doc.get(key, default)
        if not isinstance(value, types):
            raise BadInput(f"{path}: field {key}: expected {expected}, got {shown(value)}")
        return value

    cls = arch_class(doc.get("family", DEFAULT_FAMILY), str(path))
    for key in ("name", "architecture") + ("multipliers",) * cls.has_mup:
        if key not in doc:
            raise BadInput(f"{path}: required field {key!r} is missing")
    name, summary = field("name", str, "a string"), field("summary", str, "a string", "")
    kind, hf_repo = field("kind", (str, type(None)), "a string"), field("hf_repo", (str, type(None)), "a Hub repo id")
    architecture = field("architecture", dict, "a mapping")
    multipliers = field("multipliers", dict, "a mapping") if cls.has_mup else {}
    if multipliers and "multipliers" in architecture:
        raise BadInput(f"{path}: field architecture.multipliers: the multipliers are a card field of their own")
    arch = cls.from_dict({**architecture, "multipliers": multipliers} if cls.has_mup else architecture,
                         source=str(path))
    is_test = kind == "test"
    provenance: dict[str, Provenance] = {}
    if not is_test:
        sources = field("sources", dict, "a mapping of source name → citation", {})
        prov = dict(field("provenance", dict, "a mapping of field → {verified, source}", {}))
        default = prov.pop("default", None)
        for key in [*architecture, *multipliers]:
            entry = prov.pop(key, default)
            if not isinstance(entry, dict) or not isinstance(entry.get("source"), str) \
                    or not isinstance(sources.get(entry["source"]), str):
                raise BadInput(f"{path}: field {shown(key)} has no provenance naming one of its sources")
            if not isinstance(entry.get("verified"), bool):
                raise BadInput(f"{path}: provenance of {shown(key)}: field verified: expected true or false, got "
                               f"{shown(entry.get('verified'))}")
            provenance[key] = Provenance(entry["verified"], sources[entry["source"]])
        if prov:
            raise BadInput(f"{path}: provenance for unknown field(s) {shown(sorted(map(str, prov)))}")
    return Card(name, summary, arch, is_test, hf_repo, provenance)


def all_cards() -> list[Card]:
    return [load_card(p) for p in card_paths().values()]
