"""Megatron torch_dist checkpoints: streaming writer, per-tensor reader, tracker and run config.

A torch_dist checkpoint is a PyTorch Distributed Checkpoint (DCP) directory plus megatron's `metadata.json`; the
common (non-tensor) state lives inside DCP as the `common_state` object. We write one full (unsharded) chunk per
key: megatron's `dist_checkpointing.load` reads the overlapping ranges for whatever TP/PP the model runs at.

Streaming: DCP asks the save planner for each tensor's data only when it writes it (`resolve_data`), so the state
dict handed to DCP holds `meta` tensors and the real tensor is produced on demand. With one file per tensor DCP
drops each tensor once written (in one file per rank it keeps every tensor of the file alive until it closes).
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType

from falcon_bridge import __version__
from falcon_bridge.core.choices import MupMode
from falcon_bridge.core.config import Arch, FalconH1Arch, Multipliers
from falcon_bridge.core.families import arch_from_dict
from falcon_bridge.core.mup import run_config_entry
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput, Interrupted, first_line, root_cause, shown
from falcon_bridge.formats.manifest import BackgroundHashes
from falcon_bridge.formats.untrusted import (
    PICKLED_ENTRY_MAX_BYTES,
    TRACKER_MAX_BYTES,
    load_dcp_metadata,
    load_weights_only,
    read_bytes,
    read_json,
    read_text,
    read_yaml,
    regular_file_size,
)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_CONFIG_FILE = "falcon_bridge_run_config.json"
_NO_DIST_NOTICE = ".*torch.distributed is disabled.*"  # DCP's notice for no_dist=True, which is what we mean
COMMON_STATE_KEY = "common_state/shard_0_1"  # megatron's ShardedObject("common_state", (1,), (0,)).unique_key


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


class _LazySavePlanner(DefaultSavePlanner):
    """DCP save planner whose tensors are produced by `produce(key)` at write time."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._produce = produce

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:  # already serialized the way megatron stores objects
            data = self.lookup_object(write_item.index)
            data.seek(0)
            return data
        return self._produce(write_item.index.fqn)


def _sharded_object(data) -> io.BytesIO:
    """megatron's on-disk form of a ShardedObject: torch.save of the list of its shards' data."""
    buf = io.BytesIO()
    torch.save([data], buf)
    return buf


class _ReproducibleWriter(dcp.FileSystemWriter):
    """DCP's file writer without the storage record in `.metadata` (the partial directory's random name and a
    random save id): the same input gives the same bytes. Loading needs none of it (readers fill in a load id).
    It hashes the files it wrote (for the manifest) as soon as they are written, while other ranks may still be
    writing theirs: `hashed`, file name → {sha256, bytes}."""

    hashed: dict[str, dict] = {}

    def storage_meta(self):
        return None

    def write_data(self, plan, planner):
        written = super().write_data(plan, planner)  # with thread_count=1 it has written when it returns
        names = sorted({result.storage_data.relative_path for result in written.wait()})
        paths = [Path(self.path) / name for name in names]
        digests = BackgroundHashes(paths).result()
        self.hashed = {p.name: {"sha256": digests[str(p)], "bytes": p.stat().st_size} for p in paths}
        return written


def write_torch_dist(ckpt_dir: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                     produce: Callable[[str], torch.Tensor], objects: dict | None = None,
                     common_state: dict | None = None, distributed: bool = False) -> dict[str, dict]:
    """Write a torch_dist checkpoint holding `shapes` (key → (global shape, dtype)), asking `produce(key)` for each
    tensor in the order of `shapes`; `objects` maps ShardedObject unique keys to their (small) data. Returns the
    data files this process wrote, hashed: file name → {sha256, bytes}.

    distributed: this process is one rank of the default process group, writing the keys of `shapes` (its share;
    no two ranks share a key); rank 0 writes the objects, the common state and, once DCP has gathered every rank's
    plan, the `.metadata` of the whole checkpoint."""
    leader = not distributed or torch.distributed.get_rank() == 0
    # With several writers the partial output directory is the leader's: a rank never re-creates it once removed
    ckpt_dir.mkdir(parents=not distributed, exist_ok=True)
    state: dict = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in shapes.items()}
    if leader:
        state.update({key: _sharded_object(data) for key, data in (objects or {}).items()})
        state[COMMON_STATE_KEY] = _sharded_object(common_state or {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_NOTICE)
        writer = _ReproducibleWriter(str(ckpt_dir), single_file_per_rank=False, thread_count=1, sync_files=False)
        try:
            dcp.save(state, storage_writer=writer, planner=_LazySavePlanner(produce), no_dist=not distributed)
        except CheckpointException as e:  # DCP wraps what `produce` raised (bad input, a full disk): unwrap it
            cause = root_cause(e)
            if isinstance(cause, BadInput | OSError | Interrupted):
                raise cause from None
            raise
    if leader:
        (ckpt_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                            "sharded_backend_version": 1}))
    return writer.hashed


class _CheckedMetadataReader(dcp.FileSystemReader):
    """DCP's reader, given metadata read once through the allow-list (DCP itself would pickle.load the file on
    every load call)."""

    def __init__(self, path: Path, metadata):
        super().__init__(str(path))
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs):
        if getattr(self._metadata, "storage_meta", None) is None:
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


def checked_metadata(ckpt_dir: Path):
    """A torch_dist checkpoint's DCP metadata, checked before megatron or DCP reads anything: unpickled through
    the allow-list; every data file it points at a regular file inside the directory, large enough for what is
    stored in it; every pickled entry (common state, extra state) loadable by torch's weights-only unpickler
    (DCP's own reader would unpickle those with weights_only=False)."""
    ckpt_dir = Path(ckpt_dir)
    for name in ("metadata.json", ".metadata"):
        if not (ckpt_dir / name).exists():
            raise BadInput(f"{ckpt_dir}: not a torch_dist checkpoint ({name} missing)")
    backend = read_json(ckpt_dir / "metadata.json", "checkpoint metadata.json").get("sharded_backend")
    if backend != "torch_dist":  # what megatron's loader reads first, to pick the format
        raise BadInput(f"{ckpt_dir / 'metadata.json'}: field sharded_backend: expected 'torch_dist', got "
                       f"{shown(backend)}")
    meta = load_dcp_metadata(ckpt_dir / ".metadata")
    sizes: dict[str, int] = {}
    byte_keys = {k for k, m in meta.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata)}
    for index, info in meta.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or not rel or Path(rel).name != rel or rel in (".", ".."):
            raise BadInput(f"{ckpt_dir / '.metadata'}: a tensor is stored in {shown(rel)}, outside the checkpoint "
                           "directory")
        if rel not in sizes:
            sizes[rel] = regular_file_size(ckpt_dir / rel, 1 << 62, "checkpoint data file")
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset
                and 0 <= length <= sizes[rel] - offset):
            raise BadInput(f"{ckpt_dir / rel}: shorter than .metadata says (entry {index.fqn}: bytes "
                           f"{offset}+{length} of {sizes[rel]}); the checkpoint is truncated")
        if index.fqn in byte_keys:
            if length > PICKLED_ENTRY_MAX_BYTES:
                raise BadInput(f"{ckpt_dir / rel}: entry {index.fqn} is {length:,} bytes, more than a pickled "
                               f"entry may have ({PICKLED_ENTRY_MAX_BYTES:,})")
            with open(ckpt_dir / rel, "rb") as f:
                f.seek(offset)
                load_weights_only(f.read(length), f"{ckpt_dir / rel}: entry {index.fqn}")
    legacy_common = ckpt_dir / "common.pt"  # older megatron-core: common state in its own file
    if legacy_common.exists():
        load_weights_only(read_bytes(legacy_common, PICKLED_ENTRY_MAX_BYTES, "common state file"),
                          str(legacy_common))
    return meta


class TorchDistReader:
    """Reads one global tensor at a time from a torch_dist checkpoint (no process group needed)."""

    def __init__(self, ckpt_dir: Path):
        self.dir = Path(ckpt_dir)
        meta = checked_metadata(self.dir)
        self._reader = _CheckedMetadataReader(self.dir, meta)
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            k: (tuple(m.size), m.properties.dtype) for k, m in meta.state_dict_metadata.items()
            if isinstance(m, TensorStorageMetadata)}

    def get(self, key: str) -> torch.Tensor:
        return self.get_many([key])[key]

    def get_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Several global tensors in one DCP read (e.g. the five in_proj pieces of one layer)."""
        out = {k: torch.empty(self.tensors[k][0], dtype=self.tensors[k][1]) for k in keys}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_DIST_NOTICE)
            try:
                dcp.load(out, storage_reader=self._reader, no_dist=True)
            except Exception as e:  # noqa: BLE001 - DCP wraps a corrupt file's error in its own exception
                if isinstance(root_cause(e), Interrupted):
                    raise root_cause(e) from None
                raise BadInput(f"{self.dir}: tensor {keys[0]}"
                               + (f" (or one of {len(keys) - 1} read with it)" if len(keys) > 1 else "")
                               + f" could not be read: {first_line(e)}") from None
        return out


# ---- checkpoint directory: tracker, iteration folder, run config ----------------------------------------------
def write_tracker(root: Path, iteration: int = 0) -> None:
    (root / TRACKER_FILE).write_text(f"{iteration}\n")


def find_iteration_dir(root: Path) -> Path:
    """The iteration folder the tracker points at (Megatron-LM / Megatron-Bridge convention)."""
    tracker = root / TRACKER_FILE
    if not tracker.exists():
        raise BadInput(f"{root}: no {TRACKER_FILE} (not a Megatron checkpoint directory)")
    value = read_text(tracker, TRACKER_MAX_BYTES, "tracker file").strip()
    if value != "release" and not (value.isascii() and value.isdigit()):
        raise BadInput(f"{tracker}: expected an iteration number or 'release', got {value[:40]!r}")
    it_dir = root / ("release" if value == "release" else iteration_dir_name(int(value)))
    if not it_dir.is_dir():
        raise BadInput(f"{tracker}: points at {value!r}, but {it_dir.name} does not exist")
    return it_dir


def run_config(arch: Arch, layout: MegatronLayout, dtype: torch.dtype, hf_dtype: str, hf_odd_dtypes: dict,
               tokenizer_files: list[str], source: dict, mup: dict, bitnet: bool = False) -> dict:
    """What a falcon-bridge checkpoint records beside its weights: enough to rebuild the model and the HF source."""
    return {
        "falcon_bridge_version": __version__,
        "family": arch.family,  # absent in run configs written before there were families: Falcon-H1
        "architecture": arch.to_dict(),
        "mup": mup,  # falcon_bridge.core.mup.run_config_entry
        "bitnet": bitnet,  # the model's attention/Mamba/MLP linears are BitNet b1.58 (weights stored latent)
        # the parallelism the checkpoint was prepared for (any other loads too: tensors are stored as HF has them)
        "layout": {"tp": layout.tp, "pp": layout.pp, "pp_layers": list(layout.stage_layers(arch.num_layers)),
                   "vocab_divisible_by": layout.vocab_divisible_by},
        "dtype": str(dtype).removeprefix("torch."),
        "hf_dtype": hf_dtype,
        "hf_odd_dtypes": hf_odd_dtypes,  # HF tensors whose dtype differs from hf_dtype
        "tokenizer_files": tokenizer_files,
        "source": source,
    }


def write_run_config(it_dir: Path, run_config: dict) -> None:
    (it_dir / RUN_CONFIG_FILE).write_text(json.dumps(run_config, indent=2) + "\n")


FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what a run config may name as a weight dtype


TOKENIZER_DIR = "tokenizer"  # Megatron-Bridge's iter_N/tokenizer/; `train` keeps one in its save directory too


def run_config_path(it_dir: Path) -> Path | None:
    """Where a checkpoint's run config is: import-hf and reshard write it into the iteration folder; `train` into
    the save directory above Megatron-LM's iteration folders (one for all of them)."""
    return next((d / RUN_CONFIG_FILE for d in (it_dir, it_dir.parent) if (d / RUN_CONFIG_FILE).exists()), None)


def read_run_config(it_dir: Path) -> dict:
    """Our run config, its fields checked by type, and the µP record and layout against its architecture."""
    path = run_config_path(it_dir)
    if path is None:
        raise BadInput(f"{it_dir}: no {RUN_CONFIG_FILE} (pass the architecture with --card or --hf-config)")
    rc = read_json(path, "run config")

    def need(ok: bool, field: str, expected: str) -> None:
        if not ok:
            raise BadInput(f"{path}: field {field}: expected {expected}, got {shown(rc.get(field))}")

    need(isinstance(rc.get("architecture"), dict), "architecture", "an object")
    need(isinstance(rc.get("bitnet", False), bool), "bitnet", "true or false")
    for field in ("dtype", "hf_dtype"):
        need(rc.get(field) in FLOAT_DTYPES, field, f"one of {', '.join(FLOAT_DTYPES)}")
    odd = rc.get("hf_odd_dtypes", {})
    need(isinstance(odd, dict) and all(v in FLOAT_DTYPES for v in odd.values()), "hf_odd_dtypes",
         f"an object of tensor name → one of {', '.join(FLOAT_DTYPES)}")
    mup = rc.get("mup")
    need(isinstance(mup, dict) and mup.get("mode") in tuple(MupMode)
         and isinstance(mup.get("applied_multipliers"), dict)
         and (mup["mode"] == MupMode.PRESERVE or isinstance(mup.get("folded_multipliers"), dict)),
         "mup", "{mode: preserve|fold, applied_multipliers: {...}[, folded_multipliers: {...}]}")
    layout = rc.get("layout")
    need(isinstance(layout, dict) and all(type(layout.get(k)) is int and layout[k] >= 1
                                          for k in ("tp", "pp", "vocab_divisible_by"))
         and isinstance(layout.get("pp_layers"), list)
         and all(type(n) is int and n >= 1 for n in layout["pp_layers"]),
         "layout", "{tp, pp, vocab_divisible_by: positive integers, pp_layers: [positive integers]}")
    tokenizer_files = rc.get("tokenizer_files", [])
    need(isinstance(tokenizer_files, list) and all(isinstance(n, str) and n not in ("", ".", "..")
                                                   and Path(n).name == n for n in tokenizer_files),
         "tokenizer_files", "a list of file names")
    arch = arch_from_run_config(rc, str(path))
    recorded = run_config_entry(arch, MupMode(mup["mode"]))  # what this mode makes of the architecture's multipliers
    for key in [k for k in ("applied_multipliers", "folded_multipliers") if k in recorded]:
        got = Multipliers.from_hf(mup[key], f"{path}: field mup.{key}").to_hf()
        differing = next((name for name, value in recorded[key].items() if got[name] != value), None)
        if differing is not None:
            raise BadInput(f"{path}: field mup.{key}.{differing} is {shown(got[differing])}, but the architecture's "
                           f"multipliers make it {shown(recorded[key][differing])} in mode {mup['mode']}")
    try:
        MegatronLayout(tp=layout["tp"], pp=layout["pp"], pp_layers=tuple(layout["pp_layers"]),
                       vocab_divisible_by=layout["vocab_divisible_by"]).validate(arch)
    except BadInput as e:
        raise BadInput(f"{path}: field layout (the parallelism the checkpoint was written for) does not fit its "
                       f"architecture: {e}") from None
    return rc


def arch_from_run_config(rc: dict, source: str) -> Arch:
    """The architecture a run config records, of the family it names."""
    return arch_from_dict(rc["architecture"], rc.get("family"), source)


def stored_mamba_groups(reader: TorchDistReader, arch: Arch) -> int | None:
    """The B/C group count a checkpoint stores, read off its first in_proj B piece: HF's, or a multiple of it in
    checkpoints that stored the groups replicated for a TP (None: a family without Mamba)."""
    if not arch.has_mamba:
        return None
    shape = reader.tensors.get("decoder.layers.0.mamba_mixer.in_proj.weight.B")
    groups, rest = divmod(shape[0][0], arch.mamba_d_state) if shape else (0, 1)
    if rest or groups % arch.mamba_n_groups or groups == 0:
        raise BadInput(f"{reader.dir}: tensor shapes do not match the architecture: "
                       f"decoder.layers.0.mamba_mixer.in_proj.weight.B has {shape[0][0] if shape else 'no'} rows, "
                       f"not a multiple of d_state {arch.mamba_d_state} × n_groups {arch.mamba_n_groups}")
    return groups


# ---- what Megatron-LM and Megatron-Bridge read around the weights ----------------------------------------------
COMMON_STATE_FILE = "common.pt"  # megatron-core ≤ 0.18 reads the common state only from here; 0.19 prefers it
TRAIN_STATE_FILE = "latest_train_state.pt"  # Megatron-Bridge's tracker: read before latest_checkpointed_iteration.txt
BRIDGE_RUN_CONFIG_FILE = "run_config.yaml"
BRIDGE_PROVIDER = "megatron.bridge.models.falcon_h1.falconh1_provider.FalconH1ModelProvider"


def common_state(iteration: int = 0) -> dict:
    """The common (non-tensor) state Megatron-LM's and Megatron-Bridge's loaders read: the iteration (MLM exits
    without it unless --finetune), the checkpoint format version, FLOPs so far, and content metadata (Bridge 0.5.x
    indexes it even when fine-tuning). Plain values only, so torch's weights-only loader reads it."""
    return {"iteration": iteration, "checkpoint_version": 3.0, "num_floating_point_operations_so_far": 0,
            "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}


def train_state(iteration: int = 0) -> dict:
    """Megatron-Bridge's TrainState.state_dict(): eight 0-dim tensors (it reads the file with weights_only)."""
    counts = ("consumed_train_samples", "skipped_train_samples", "consumed_valid_samples")
    return {"step": torch.tensor(iteration, dtype=torch.int64), **{k: torch.tensor(0, dtype=torch.int64)
                                                                   for k in counts},
            "floating_point_operations_so_far": torch.tensor(0.0, dtype=torch.float32),
            **{k: torch.tensor(False) for k in ("do_train", "do_valid", "do_test")}}


# Megatron-Bridge provider field ↔ config.json key (FalconH1Bridge's CONFIG_MAPPING and its base mapping). Setting
# mamba_num_heads makes megatron-core's MambaMixer take d_inner = heads × head_dim; `expand` only has to pass
# Bridge's own check (FalconH1Arch.mamba_expand).
BRIDGE_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "ffn_hidden_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads", "kv_channels": "head_dim", "mamba_state_dim": "mamba_d_state",
    "mamba_head_dim": "mamba_d_head", "mamba_num_heads": "mamba_n_heads", "mamba_num_groups": "mamba_n_groups",
    "d_conv": "mamba_d_conv", "chunk_size": "mamba_chunk_size", "conv_bias": "mamba_conv_bias",
    "rmsnorm": "mamba_rms_norm", "norm_before_gate": "mamba_norm_before_gate", "add_qkv_bias": "attention_bias",
    "add_bias_linear": "mlp_bias", "layernorm_epsilon": "rms_norm_eps", "rotary_base": "rope_theta",
    "seq_length": "max_position_embeddings", "share_embeddings_and_output_weights": "tie_word_embeddings",
    "expand": "mamba_expand",
    **{k: k for k in ("embedding_multiplier", "lm_head_multiplier", "key_multiplier", "attention_in_multiplier",
                      "attention_out_multiplier", "ssm_in_multiplier", "ssm_out_multiplier", "mlp_multipliers",
                      "ssm_multipliers")},
}


def bridge_run_config(arch: FalconH1Arch, multipliers, dtype: torch.dtype, tp: int, pp: int) -> dict:
    """run_config.yaml as Megatron-Bridge writes it (its ConfigContainer's YAML form): `model` is its Falcon-H1
    provider with this architecture (BRIDGE_FIELDS) and the multipliers the model must apply (1.0 where folded),
    `checkpoint` says no optimizer or RNG state was saved. Bridge's loaders instantiate `model` and read TP/PP and
    `checkpoint`."""
    def fn(target: str) -> dict:  # Bridge's YAML form of a callable or a dtype
        return {"_target_": target, "_call_": False}

    hf = {**arch.to_hf(), **multipliers.to_hf()}
    model = {"_target_": BRIDGE_PROVIDER, **{field: hf[key] for field, key in BRIDGE_FIELDS.items()},
             "should_pad_vocab": False, "normalization": "RMSNorm", "gated_linear_unit": True,
             "activation_func": fn("torch.nn.functional.silu"), "position_embedding_type": "rope",
             "rotary_percent": 1.0, "hidden_dropout": 0.0, "attention_dropout": 0.0,
             "params_dtype": fn(str(dtype)), "bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16,
             "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
             # one parallel hybrid block per layer
             "falconh1_ratio": 1.0, "hybrid_override_pattern": None, "use_mamba": True, "use_attention": True,
             "use_mlp": True}
    return {"model": model,
            "checkpoint": {"save_optim": False, "save_rng": False, "fully_parallel_save": False,
                           "ckpt_format": "torch_dist"}}


def write_interop_files(root: Path, it_dir: Path, arch: Arch, multipliers, dtype: torch.dtype,
                        tp: int, pp: int, iteration: int = 0) -> None:
    """Beside our run config: common.pt (same contents as the DCP common state), Megatron-Bridge's train-state
    tracker and, for Falcon-H1 (the family whose Bridge provider this writes), its run_config.yaml, so Megatron-LM
    and Megatron-Bridge load the directory as written."""
    import yaml

    for path, state in ((it_dir / COMMON_STATE_FILE, common_state(iteration)), (root / TRAIN_STATE_FILE,
                        train_state(iteration)), (it_dir / "train_state.pt", train_state(iteration))):
        # through a Python file: torch.save's own writer reports a full disk as a RuntimeError without its errno
        # ("basic_ios::clear: iostream error"), Python's write as the OSError(ENOSPC) the output directory expects
        with open(path, "wb") as f:
            torch.save(state, f)
    if arch.family == FalconH1Arch.family:
        (it_dir / BRIDGE_RUN_CONFIG_FILE).write_text(yaml.safe_dump(
            bridge_run_config(arch, multipliers, dtype, tp, pp), default_flow_style=False, sort_keys=False))


def arch_from_bridge_run_config(it_dir: Path) -> FalconH1Arch:
    """A Megatron-Bridge checkpoint's architecture and multipliers, from the Falcon-H1 provider in its
    run_config.yaml (the multipliers are the ones its model applies)."""
    path = it_dir / BRIDGE_RUN_CONFIG_FILE
    doc = read_yaml(path, "run_config.yaml")
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("_target_") != BRIDGE_PROVIDER:
        raise BadInput(f"{path}: field model._target_: expected {BRIDGE_PROVIDER} (a Megatron-Bridge Falcon-H1 "
                       f"checkpoint), got {shown((model or {}).get('_target_'))}")
    for field in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                  "mamba_state_dim", "mamba_head_dim"):
        if model.get(field) is None:
            raise BadInput(f"{path}: field model.{field} is missing")
    hf = {key: model[field] for field, key in BRIDGE_FIELDS.items() if model.get(field) is not None}
    heads, head_dim = model.get("mamba_num_heads"), model["mamba_head_dim"]
    if heads is None:  # Bridge's FalconH1Config: d_inner = expand × hidden, heads = d_inner / head_dim
        expand = model.get("expand", 2)
        if type(expand) is not int or type(model["hidden_size"]) is not int or type(head_dim) is not int \
                or head_dim < 1:
            raise BadInput(f"{path}: fields model.expand/hidden_size/mamba_head_dim: expected positive integers")
        heads = hf["mamba_n_heads"] = expand * model["hidden_size"] // head_dim
    if type(heads) is int and type(head_dim) is int:
        hf["mamba_d_ssm"] = heads * head_dim
    hf.setdefault("mamba_n_groups", 1)
    hf.setdefault("rope_theta", 1e11)  # the provider's default (FalconH1 uses 1e11)
    return FalconH1Arch.from_hf(hf, source=f"{path} (model)")
