"""Model architectures: one frozen dataclass per family, read from an HF config or a model card, with derived sizes.

`Arch` is what every family's architecture shares: its fields are config.json's keys (spelling in HF_KEYS), their
defaults transformers', and validation, the config.json form and the plain-dict form (run config, cards) follow
the declared field types. `FalconH1Arch` is Falcon-H1's; the Llama family's is in `core/llama.py`.

Pure: no file I/O here (config.json is read in `falcon_bridge.formats.hf`, cards in `falcon_bridge.cards`).
"""

from __future__ import annotations

import functools
import math
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

from falcon_bridge.errors import BadInput, shown

# The Mamba-2 mixer's row layout, defined here once: in_proj's output rows are z | x | B | C | dt (the order of
# ssm_multipliers too), conv1d's channels x | B | C; B and C hold the group-shared rows (n_groups · d_state each),
# the ones replicated when TP exceeds the group count.
SSM_SEGMENTS = ("z", "x", "B", "C", "dt")
CONV_SEGMENTS = ("x", "B", "C")
GROUP_SEGMENTS = ("B", "C")


def mamba_segment_sizes(d_ssm: int, group_state: int, n_heads: int) -> dict[str, int]:
    """Rows of each in_proj segment z|x|B|C|dt (conv1d takes x|B|C of them), for the whole mixer or one TP rank's
    slice (every rank holds its slice of each segment)."""
    return dict(zip(SSM_SEGMENTS, (d_ssm, d_ssm, group_state, group_state, n_heads)))


@dataclass(frozen=True)
class Multipliers:
    """The 14 µP forward multipliers of Falcon-H1 (HF config keys in comments)."""

    embedding: float = 1.0  # embedding_multiplier: embedding lookup output
    lm_head: float = 1.0  # lm_head_multiplier: logits
    attention_in: float = 1.0  # attention_in_multiplier: normed input of attention
    attention_out: float = 1.0  # attention_out_multiplier: attention output
    key: float = 1.0  # key_multiplier: K before RoPE
    ssm_in: float = 1.0  # ssm_in_multiplier: normed input of the Mamba mixer
    ssm_out: float = 1.0  # ssm_out_multiplier: mixer output
    ssm: tuple[float, float, float, float, float] = (1.0,) * 5  # ssm_multipliers: in_proj z, x, B, C, dt
    mlp: tuple[float, float] = (1.0, 1.0)  # mlp_multipliers: gate (before SiLU), down (MLP output)

    SCALAR_KEYS = {
        "embedding": "embedding_multiplier",
        "lm_head": "lm_head_multiplier",
        "attention_in": "attention_in_multiplier",
        "attention_out": "attention_out_multiplier",
        "key": "key_multiplier",
        "ssm_in": "ssm_in_multiplier",
        "ssm_out": "ssm_out_multiplier",
    }

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> Multipliers:
        kw: dict[str, Any] = {}
        for name, key in cls.SCALAR_KEYS.items():
            if hf.get(key) is not None:
                kw[name] = _finite(hf[key], source, key)
        for name, key, length, parts in (("ssm", "ssm_multipliers", 5, "z, x, B, C, dt"),
                                          ("mlp", "mlp_multipliers", 2, "gate, down")):
            value = hf.get(key)
            if value is None:
                continue
            if not isinstance(value, list | tuple) or len(value) != length:
                raise BadInput(f"{source}: field {key}: expected a list of {length} numbers ({parts}), got "
                               f"{shown(value)}")
            kw[name] = tuple(_finite(v, source, key) for v in value)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {key: getattr(self, name) for name, key in self.SCALAR_KEYS.items()}
        out["ssm_multipliers"] = list(self.ssm)
        out["mlp_multipliers"] = list(self.mlp)
        return out

    def flat(self) -> list[float]:
        return [getattr(self, n) for n in self.SCALAR_KEYS] + list(self.ssm) + list(self.mlp)


# HF config keys that must be present in a config.json: without them transformers silently falls back to
# defaults of a different model size (e.g. mamba_d_ssm=1024), and the conversion would be wrong.
REQUIRED_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "mamba_n_heads", "mamba_d_state", "mamba_n_groups",
)

# config.json spelling of the fields whose name differs from ours
HF_KEYS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads"}
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _finite(value: Any, source: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadInput(f"{source}: field {key}: expected a finite number, got {shown(value)}")
    return float(value)


def _positive_int(value: Any, source: str, key: str) -> int:
    # JSON integers only: 4.9 is not silently 4, and "true" is not 1
    if type(value) is not int or value < 1:
        raise BadInput(f"{source}: field {key}: expected a positive integer, got {shown(value)}")
    return value


def _token_id(value: Any, source: str, key: str) -> int | tuple[int, ...] | None:
    """An id, null, or (as transformers allows for eos) a list of ids."""
    ids = value if isinstance(value, list | tuple) else [value]
    if value is None:
        return None
    if not ids or any(type(i) is not int or i < 0 for i in ids):
        raise BadInput(f"{source}: field {key}: expected a token id, a list of them or null, got {shown(value)}")
    return tuple(ids) if isinstance(value, list | tuple) else value


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise BadInput(msg)


def refuse_unsupported(hf: dict[str, Any], source: str, checks: dict[str, tuple[Any, Callable[[Any], bool], str]]
                       ) -> None:
    """Fields transformers reads that our Megatron model does not implement: accepted only at the value that changes
    nothing (transformers' default), refused otherwise, naming the field and its value. `checks`: config key →
    (its value, whether it is supported, what it would change)."""
    rope = hf.get("rope_parameters")  # an object: Arch.from_hf checked it
    common = {
        "rope_scaling": (hf.get("rope_scaling"), lambda v: v is None, "RoPE scaling"),
        "rope_parameters.rope_type": ((rope or {}).get("rope_type"), lambda v: v in (None, "default"),
                                      "RoPE scaling"),
        "attention_dropout": (hf.get("attention_dropout", 0.0), lambda v: v in (0, 0.0) and type(v) is not bool,
                              "attention dropout in training"),
    }
    for key, (value, supported, what) in (common | checks).items():
        if not supported(value):
            raise BadInput(f"{source}: field {key} = {shown(value)} is not supported ({what}); only transformers' "
                           "default is")


@dataclass(frozen=True, kw_only=True)
class Arch:
    """What every family's architecture shares: the decoder's sizes, RoPE, norms and token ids, as config.json
    holds them. A family subclasses it with its own fields (declaration order is config.json's order), says which
    transformers model it is (`model_type`, `hf_architecture`, `hf_config_class`) and adds its own checks in
    `validate_family` and `from_hf_fields`."""

    family: ClassVar[str]  # the key of the family's map table, recorded in run configs
    model_type: ClassVar[str]
    hf_architecture: ClassVar[str]
    hf_config_class: ClassVar[str]  # transformers' config class name
    required_hf_keys: ClassVar[tuple[str, ...]]  # absent, transformers would fall back to another model size
    has_mamba: ClassVar[bool] = False
    has_mup: ClassVar[bool] = False

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # config.json null: one KV head per query head
    head_dim: int  # config.json absent or null: hidden_size // num_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    # ---- validation ----------------------------------------------------------------------------------------
    def validate(self, source: str = "config") -> Arch:
        """Types and ranges of every field (messages use config.json's key names), then the shape rules."""
        types = _field_types(type(self))
        for f in fields(self):  # by declared type: every int is a positive size, every float a positive number
            name, value = f.name, getattr(self, f.name)
            if types[name] is int:
                _positive_int(value, source, HF_KEYS.get(name, name))
            elif types[name] is bool:
                need(type(value) is bool, f"{source}: field {name}: expected true or false, got {shown(value)}")
            elif types[name] is float:
                need(_finite(value, source, name) > 0, f"{source}: field {name}: expected a positive number, got "
                                                       f"{shown(value)}")
            elif name in TOKEN_ID_FIELDS:
                _token_id(value, source, name)
                # an id the embedding has no row for (create-random's tokenizer would hold that many special tokens)
                outside = next((i for i in (value if isinstance(value, list | tuple) else (value,))
                                if i is not None and i >= self.vocab_size), None)
                need(outside is None, f"{source}: field {name}: token id {shown(outside)} is outside the vocabulary "
                                      f"[0, {self.vocab_size})")
        need(self.num_heads % self.num_kv_heads == 0,
             f"{source}: num_attention_heads ({shown(self.num_heads)}) must be divisible by num_key_value_heads "
             f"({shown(self.num_kv_heads)})")
        need(self.hidden_act == "silu", f"{source}: field hidden_act: only 'silu' is supported, got "
                                        f"{shown(self.hidden_act)}")
        self.validate_family(source)
        return self

    def validate_family(self, source: str) -> None:
        """The family's own shape rules."""

    def validate_for_megatron(self) -> Arch:
        """Configs our megatron-core model cannot express exactly."""
        self.validate()
        if self.attention_bias != self.mlp_bias:
            raise BadInput("config fields attention_bias/mlp_bias: megatron-core has one switch for the biases of "
                           "linear_proj and the MLP, so both must be equal")
        return self

    # ---- HF config ↔ arch ----------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> Arch:
        """From a config.json dict (transformers 4 or 5 spelling)."""
        if hf.get("model_type", cls.model_type) != cls.model_type:
            raise BadInput(f"{source}: model_type is {shown(hf.get('model_type'))}, expected {cls.model_type!r}")
        for key in cls.required_hf_keys:
            if hf.get(key) is None:
                raise BadInput(f"{source}: required field {key!r} is missing")
        # the fields the defaults below are computed from are checked first
        hidden = _positive_int(hf["hidden_size"], source, "hidden_size")
        heads = _positive_int(hf["num_attention_heads"], source, "num_attention_heads")
        # every field: config.json's value, or (absent) transformers' default, which is this class's; the fields
        # transformers derives when absent or null follow
        kw = {f.name: hf.get(HF_KEYS.get(f.name, f.name), None if f.default is MISSING else f.default)
              for f in fields(cls) if f.name not in cls.non_hf_fields()}
        if kw["num_kv_heads"] is None:  # one KV head per query head
            kw["num_kv_heads"] = heads
        if kw["head_dim"] is None:
            kw["head_dim"] = hidden // heads
        rope = hf.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise BadInput(f"{source}: field rope_parameters: expected an object, got {shown(rope)}")
        kw["rope_theta"] = (rope or {}).get("rope_theta", hf.get("rope_theta"))
        if kw["rope_theta"] is None:  # transformers 4 defaults it to 1e5, transformers 5 to 1e4: the config must say
            raise BadInput(f"{source}: field rope_theta is missing (transformers' default differs between "
                           "versions); write it explicitly")
        for key in TOKEN_ID_FIELDS:
            _token_id(kw[key], source, key)
            kw[key] = tuple(kw[key]) if isinstance(kw[key], list) else kw[key]
        if not isinstance(kw["hidden_act"], str):
            kw["hidden_act"] = shown(kw["hidden_act"])
        return cls(**cls.from_hf_fields(hf, kw, source)).validate(source)

    @classmethod
    def non_hf_fields(cls) -> tuple[str, ...]:
        """Fields config.json does not hold one by one (Falcon-H1's multipliers, from 14 keys)."""
        return ()

    @classmethod
    def from_hf_fields(cls, hf: dict[str, Any], kw: dict[str, Any], source: str) -> dict[str, Any]:
        """The family's part of from_hf: refuse what it does not implement, derive what transformers derives."""
        return kw

    def to_hf(self) -> dict[str, Any]:
        """config.json fields: every field written explicitly, in declaration order (see falcon_h1_hf.md §10)."""
        out: dict[str, Any] = {"architectures": [self.hf_architecture], "model_type": self.model_type}
        for f in fields(self):
            if f.name not in self.non_hf_fields():
                value = getattr(self, f.name)
                out[HF_KEYS.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
        return out

    def to_hf_config(self):
        """A transformers config object (lazy import: transformers is heavy)."""
        import transformers

        kw = self.to_hf()
        kw.pop("architectures"), kw.pop("model_type")
        theta = kw.pop("rope_theta")
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        cfg = getattr(transformers, self.hf_config_class)(**kw)
        cfg.architectures = [self.hf_architecture]
        return cfg

    @classmethod
    def from_hf_config(cls, cfg) -> Arch:
        return cls.from_hf(cfg.to_dict(), source=type(cfg).__name__)

    # ---- plain-dict form (run config, cards) ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "architecture") -> Arch:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise BadInput(f"{source}: unknown field(s) {shown(sorted(map(str, unknown)))}")
        kw = {k: tuple(v) if k in TOKEN_ID_FIELDS and isinstance(v, list) else v for k, v in d.items()}
        missing = sorted(f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
                         and f.name not in kw)
        if missing:
            raise BadInput(f"{source}: missing required field(s) {missing}")
        return cls(**cls.from_dict_fields(kw, source)).validate(source)

    @classmethod
    def from_dict_fields(cls, kw: dict[str, Any], source: str) -> dict[str, Any]:
        """The family's fields that are not plain values in the dict form (Falcon-H1's multipliers)."""
        return kw


@dataclass(frozen=True, kw_only=True)
class FalconH1Arch(Arch):
    """Everything that fixes tensor shapes and forward arithmetic of a Falcon-H1 model.

    The defaults are transformers' FalconH1Config defaults, and `from_hf` uses them for absent config.json keys:
    one source. Fields without a default must be given; config.json must hold REQUIRED_HF_KEYS and rope_theta, and
    from_hf derives head_dim and mamba_d_head when it lacks them, as transformers does.
    """

    family: ClassVar[str] = "falcon_h1"
    model_type: ClassVar[str] = "falcon_h1"
    hf_architecture: ClassVar[str] = "FalconH1ForCausalLM"
    hf_config_class: ClassVar[str] = "FalconH1Config"
    required_hf_keys: ClassVar[tuple[str, ...]] = REQUIRED_HF_KEYS
    has_mamba: ClassVar[bool] = True
    has_mup: ClassVar[bool] = True

    num_kv_heads: int = 8  # config.json null: one KV head per query head
    mamba_d_ssm: int = 1024  # config.json null: mamba_expand × hidden_size
    mamba_n_heads: int
    mamba_d_head: int  # config.json absent, null or "auto": mamba_d_ssm // mamba_n_heads
    mamba_n_groups: int
    mamba_d_state: int
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    projectors_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = True
    rms_norm_eps: float = 1e-5
    rope_theta: float  # transformers 4 defaults it to 1e5, transformers 5 to 1e4: a config must say
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | tuple[int, ...] | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2  # several ids where a config lists several
    pad_token_id: int | tuple[int, ...] | None = 0
    multipliers: Multipliers = field(default_factory=Multipliers)

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def mamba_expand(self) -> int:
        """config.json's mamba_expand. transformers ignores it whenever mamba_d_ssm is written (we always write it),
        but Megatron-Bridge's FalconH1Config checks expand × hidden_size % mamba_d_head == 0 even though
        mamba_num_heads sets the width: transformers' default 2 (what released configs carry) where that holds,
        else the smallest factor for which it does."""
        if 2 * self.hidden_size % self.mamba_d_head == 0:
            return 2
        return self.mamba_d_head // math.gcd(self.hidden_size, self.mamba_d_head)

    @property
    def group_state(self) -> int:
        """Rows of B (and of C) in in_proj: n_groups · d_state."""
        return self.mamba_n_groups * self.mamba_d_state

    @property
    def conv_dim(self) -> int:
        return self.mamba_d_ssm + 2 * self.group_state

    @property
    def in_proj_rows(self) -> int:
        return 2 * self.mamba_d_ssm + 2 * self.group_state + self.mamba_n_heads

    def in_proj_segments(self) -> dict[str, int]:
        """Row counts of in_proj's z | x | B | C | dt segments."""
        return mamba_segment_sizes(self.mamba_d_ssm, self.group_state, self.mamba_n_heads)

    def conv_segments(self) -> dict[str, int]:
        sizes = self.in_proj_segments()
        return {s: sizes[s] for s in CONV_SEGMENTS}

    # ---- validation ----------------------------------------------------------------------------------------
    def validate_family(self, source: str) -> None:
        need(isinstance(self.multipliers, Multipliers), f"{source}: multipliers: expected the 14 µP multipliers")
        need(self.mamba_d_head * self.mamba_n_heads == self.mamba_d_ssm,
             f"{source}: mamba_d_head ({shown(self.mamba_d_head)}) × mamba_n_heads ({shown(self.mamba_n_heads)}) "
             f"must equal mamba_d_ssm ({shown(self.mamba_d_ssm)})")
        need(self.mamba_n_heads % self.mamba_n_groups == 0,
             f"{source}: mamba_n_heads ({shown(self.mamba_n_heads)}) must be divisible by mamba_n_groups "
             f"({shown(self.mamba_n_groups)})")

    def validate_for_megatron(self) -> FalconH1Arch:
        """(The gated Mamba norm's norm_before_gate and eps, and the in_proj/out_proj biases, megatron-core's
        MambaMixer refuses, are our model's own: model.py.)"""
        super().validate_for_megatron()
        if not self.mamba_conv_bias:
            raise BadInput("config field mamba_conv_bias: false is not supported by megatron-core's MambaMixer")
        return self

    # ---- HF config ↔ arch ----------------------------------------------------------------------------------
    @classmethod
    def non_hf_fields(cls) -> tuple[str, ...]:
        return ("multipliers",)

    @classmethod
    def from_hf_fields(cls, hf: dict[str, Any], kw: dict[str, Any], source: str) -> dict[str, Any]:
        n_heads = _positive_int(hf["mamba_n_heads"], source, "mamba_n_heads")
        refuse_unsupported(hf, source, {
            "time_step_limit": (hf.get("time_step_limit", (0.0, math.inf)),
                                lambda v: isinstance(v, list | tuple) and list(v) == [0.0, math.inf],
                                "clamping dt (only (0.0, inf), no clamp, is supported)"),
            "num_logits_to_keep": (hf.get("num_logits_to_keep", 1),
                                   lambda v: v is None or (type(v) is int and v == 1),
                                   "a generation setting export would not carry"),
            "layer_types": (hf.get("layer_types"),
                            lambda v: v is None or (isinstance(v, list) and all(t == "hybrid" for t in v)),
                            "layers other than the parallel hybrid block"),
        })
        if kw["mamba_d_ssm"] is None:
            kw["mamba_d_ssm"] = _positive_int(hf.get("mamba_expand", 2), source, "mamba_expand") * kw["hidden_size"]
        if kw["mamba_d_head"] in (None, "auto"):
            kw["mamba_d_head"] = _positive_int(kw["mamba_d_ssm"], source, "mamba_d_ssm") // n_heads
        return kw | {"multipliers": Multipliers.from_hf(hf, source)}

    def to_hf(self) -> dict[str, Any]:
        """... and mamba_expand after mamba_d_ssm, and the 14 multipliers."""
        out: dict[str, Any] = {}
        for key, value in super().to_hf().items():
            out[key] = value
            if key == "mamba_d_ssm":
                out["mamba_expand"] = self.mamba_expand
        return out | self.multipliers.to_hf()

    # ---- plain-dict form (run config, cards) ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"multipliers": self.multipliers.to_hf()}

    @classmethod
    def from_dict_fields(cls, kw: dict[str, Any], source: str) -> dict[str, Any]:
        multipliers = kw.get("multipliers") or {}
        if not isinstance(multipliers, dict):
            raise BadInput(f"{source}: field multipliers: expected an object, got {shown(multipliers)}")
        return kw | {"multipliers": Multipliers.from_hf(multipliers, source)}


@functools.cache
def _field_types(cls: type) -> dict[str, type]:
    """An architecture class's field types, resolved once (the annotations are strings under `from __future__`)."""
    return typing.get_type_hints(cls)
