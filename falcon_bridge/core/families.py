"""The model families the toolkit converts, and which one a config.json, a run config or a card describes.

A family is an `Arch` subclass (its fields, defaults and checks) and a map table registered under the same
`family` name (`core/mapping.TABLES`). Adding one: its module (architecture + table), a line here, and for the
Megatron side a provider and its `provider.PROVIDERS` entry (`megatron/provider.py`).
"""

from __future__ import annotations

from typing import Any

from falcon_bridge.core.config import Arch, FalconH1Arch
from falcon_bridge.core.llama import LlamaArch
from falcon_bridge.errors import BadInput, shown

ARCHES: dict[str, type[Arch]] = {cls.family: cls for cls in (FalconH1Arch, LlamaArch)}
BY_MODEL_TYPE: dict[str, type[Arch]] = {cls.model_type: cls for cls in ARCHES.values()}
DEFAULT_FAMILY = FalconH1Arch.family  # run configs and cards written before families existed are Falcon-H1's


def arch_class(family: Any, source: str) -> type[Arch]:
    cls = ARCHES.get(family) if isinstance(family, str) else None
    if cls is None:
        raise BadInput(f"{source}: field family: {shown(family)} is not a known family (known: "
                       f"{', '.join(ARCHES)})")
    return cls


def arch_from_hf(config: dict[str, Any], source: str) -> Arch:
    """The architecture a config.json describes, its family read off `model_type`."""
    model_type = config.get("model_type")
    cls = BY_MODEL_TYPE.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise BadInput(f"{source}: field model_type: {shown(model_type)} is not a supported model (supported: "
                       f"{', '.join(repr(t) for t in BY_MODEL_TYPE)})")
    return cls.from_hf(config, source)


def arch_from_dict(d: dict[str, Any], family: Any, source: str) -> Arch:
    """The plain-dict form (run config, card) of a family's architecture; family None: Falcon-H1."""
    return arch_class(DEFAULT_FAMILY if family is None else family, source).from_dict(d, source)
