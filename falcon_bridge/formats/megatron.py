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
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType

from falcon_bridge import __version__
from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.errors import BadInput

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


def write_torch_dist(ckpt_dir: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                     produce: Callable[[str], torch.Tensor], objects: dict | None = None,
                     common_state: dict | None = None) -> None:
    """Write a torch_dist checkpoint holding `shapes` (key → (global shape, dtype)), asking `produce(key)` for each
    tensor in the order of `shapes`; `objects` maps ShardedObject unique keys to their (small) data."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state: dict = {key: torch.empty(shape, dtype=dtype, device="meta") for key, (shape, dtype) in shapes.items()}
    state.update({key: _sharded_object(data) for key, data in (objects or {}).items()})
    state[COMMON_STATE_KEY] = _sharded_object(common_state or {})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_DIST_NOTICE)
        writer = dcp.FileSystemWriter(str(ckpt_dir), single_file_per_rank=False, thread_count=1, sync_files=False)
        try:
            dcp.save(state, storage_writer=writer, planner=_LazySavePlanner(produce), no_dist=True)
        except CheckpointException as e:  # DCP wraps what `produce` raised (bad input, a full disk): unwrap it
            for failure in e.failures.values():
                cause = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(cause, (BadInput, OSError)):
                    raise cause from None
            raise
    (ckpt_dir / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                        "sharded_backend_version": 1}))


class _MetadataCachingReader(dcp.FileSystemReader):
    """DCP re-reads (unpickles) the whole checkpoint's metadata on every load call; we load one map entry per
    call, so read it once."""

    def read_metadata(self, *args, **kwargs):
        if not hasattr(self, "_metadata"):
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class TorchDistReader:
    """Reads one global tensor at a time from a torch_dist checkpoint (no process group needed)."""

    def __init__(self, ckpt_dir: Path):
        self.dir = Path(ckpt_dir)
        if not (self.dir / "metadata.json").exists() or not (self.dir / ".metadata").exists():
            raise BadInput(f"{self.dir}: not a torch_dist checkpoint (metadata.json or .metadata missing)")
        self._reader = _MetadataCachingReader(str(self.dir))
        meta = self._reader.read_metadata()
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
            dcp.load(out, storage_reader=self._reader, no_dist=True)
        return out


# ---- checkpoint directory: tracker, iteration folder, run config ----------------------------------------------
def write_tracker(root: Path, iteration: int = 0) -> None:
    (root / TRACKER_FILE).write_text(f"{iteration}\n")


def find_iteration_dir(root: Path) -> Path:
    """The iteration folder the tracker points at (Megatron-LM / Megatron-Bridge convention)."""
    tracker = root / TRACKER_FILE
    if not tracker.exists():
        raise BadInput(f"{root}: no {TRACKER_FILE} (not a Megatron checkpoint directory)")
    value = tracker.read_text().strip()
    it_dir = root / ("release" if value == "release" else iteration_dir_name(int(value)) if value.isdigit() else "")
    if not value or not it_dir.is_dir():
        raise BadInput(f"{tracker}: points at {value!r}, but {it_dir.name or '?'} does not exist")
    return it_dir


def run_config(arch: FalconH1Arch, layout: MegatronLayout, dtype: torch.dtype, hf_dtype: str, hf_odd_dtypes: dict,
               tokenizer_files: list[str], source: dict, mup: dict, bitnet: bool = False) -> dict:
    """What a falcon-bridge checkpoint records beside its weights: enough to rebuild the model and the HF source."""
    return {
        "falcon_bridge_version": __version__,
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


def read_run_config(it_dir: Path) -> dict:
    path = it_dir / RUN_CONFIG_FILE
    if not path.exists():
        raise BadInput(f"{it_dir}: no {RUN_CONFIG_FILE} (pass the architecture with --card or --hf-config)")
    return json.loads(path.read_text())


def stored_mamba_groups(it_dir: Path, arch: FalconH1Arch) -> int:
    """The B/C group count a checkpoint stores, read off its first in_proj B piece: HF's, or a multiple of it in
    checkpoints that stored the groups replicated for a TP."""
    shape = TorchDistReader(it_dir).tensors.get("decoder.layers.0.mamba_mixer.in_proj.weight.B")
    if shape is None:
        raise BadInput(f"{it_dir}: no decoder.layers.0.mamba_mixer.in_proj.weight.B (not a Falcon-H1 checkpoint)")
    return shape[0][0] // arch.mamba_d_state
