"""Reading files falcon-bridge did not write: regular files only, sizes checked before reading, pickles only
through an allow-list. Every refusal is a BadInput naming the file.

A symlink is followed, but what it points at must be a regular file: a FIFO would block forever and /dev/zero
would never end. Sizes are capped per kind of file at far more than any real Falcon-H1 checkpoint needs.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import stat
from pathlib import Path

from falcon_bridge.errors import BadInput, first_line, shown

MiB = 1 << 20
JSON_MAX_BYTES = 64 * MiB  # config.json, index, run config, manifest (a 34B index is ~100 KB)
YAML_MAX_BYTES = 64 * MiB  # model cards, Megatron-Bridge's run_config.yaml (~20 KB)
SAFETENSORS_HEADER_MAX_BYTES = 100_000_000  # safetensors' own limit (a 34B shard's header is ~50 KB)
TENSOR_NAME_MAX_CHARS = 1024  # Falcon-H1's longest is ~50
TOKENIZER_MAX_BYTES = 256 * MiB  # a 256k-token tokenizer.json is ~30 MB
TRACKER_MAX_BYTES = 64
DCP_METADATA_MAX_BYTES = 512 * MiB  # .metadata: one entry per tensor chunk (a 34B model at TP 8: ~20 MB)
PICKLED_ENTRY_MAX_BYTES = 64 * MiB  # one pickled object inside a checkpoint (common state, extra state)


def regular_file_size(path: Path, max_bytes: int, what: str) -> int:
    """The size of `path`, after checking it is (or links to) a regular file of at most max_bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput(f"{path}: file not found") from None
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadInput(f"{path}: not a regular file (FIFOs, devices and directories are never read as a {what})")
    if st.st_size > max_bytes:
        raise BadInput(f"{path}: {st.st_size:,} bytes, more than a {what} may have ({max_bytes:,})")
    return st.st_size


def read_bytes(path: Path, max_bytes: int, what: str) -> bytes:
    regular_file_size(path, max_bytes, what)
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise BadInput(f"{path}: more than a {what} may have ({max_bytes:,} bytes)")
    return data


def read_text(path: Path, max_bytes: int, what: str) -> str:
    try:
        return read_bytes(path, max_bytes, what).decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(f"{path}: not UTF-8 text (a {what} is expected)") from None


def read_json(path: Path, what: str = "JSON file", expect: type = dict):
    """A JSON document of type `expect`. Understands transformers 5's {"__float__": "Infinity"} encoding; the
    values' types are checked by whoever uses them."""
    def hook(d):
        return float(d["__float__"]) if set(d) == {"__float__"} and isinstance(d["__float__"], str) else d

    try:
        value = json.loads(read_text(path, JSON_MAX_BYTES, what), object_hook=hook)
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise BadInput(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                       ) from None
    if not isinstance(value, expect):
        raise BadInput(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, got "
                       f"{type(value).__name__}")
    return value


def finite_number(value, where: str) -> float:
    """A JSON number (not a boolean) that is finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadInput(f"{where}: expected a finite number, got {shown(value)}")
    return float(value)


def read_yaml(path: Path, what: str):
    """A YAML document of plain values (yaml.safe_load's types), read without aliases: an alias makes one value
    appear many times, and a few lines of nested aliases expand to billions of items for whoever walks or prints
    the result. Our cards have none, nor has Megatron-Bridge's run_config.yaml (ConfigContainer.to_dict builds
    every value afresh, so yaml.safe_dump writes no alias)."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise BadInput(f"{path}: line {mark.line + 1}: YAML aliases (*name) are not accepted in a {what}")
            return super().compose_node(parent, index)

    text = read_text(path, YAML_MAX_BYTES, what)
    try:
        return yaml.load(text, Loader=NoAliasLoader)  # noqa: S506 - a SafeLoader: plain values only
    except yaml.YAMLError as e:
        raise BadInput(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except (ValueError, RecursionError) as e:  # an integer past Python's 4300 digits; nesting deeper than the stack
        raise BadInput(f"{path}: not a readable {what} ({first_line(e)})") from None


# ---- pickles ---------------------------------------------------------------------------------------------------
def _dcp_metadata_globals() -> dict[tuple[str, str], object]:
    """Everything a torch.distributed.checkpoint `.metadata` pickle refers to (torch's and megatron's writers):
    DCP's metadata and save-plan dataclasses and enums, torch.Size, dtypes and layouts, the checkpoint id as a
    path. All are plain records: constructing them runs no code of the file's choosing."""
    import pathlib

    import torch
    import torch.distributed.checkpoint.metadata as meta
    import torch.distributed.checkpoint.planner as planner
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    allowed: dict[tuple[str, str], object] = {
        ("torch", "Size"): torch.Size,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # layout from its name
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
        ("pathlib", "PosixPath"): pathlib.PosixPath,
        ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
    }
    for name in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"):
        allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(meta, name)
    # megatron-core's saver keeps every rank's save plan in the metadata (`all_local_plans`)
    for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"):
        allowed[("torch.distributed.checkpoint.planner", name)] = getattr(planner, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: dict, path: Path):
        super().__init__(io.BytesIO(data))
        self._allowed, self._path = allowed, path

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise BadInput(f"{self._path}: refuses to unpickle {module}.{name} (not among the classes a "
                           "checkpoint's metadata consists of; the file may be crafted)") from None

    def persistent_load(self, pid):
        raise BadInput(f"{self._path}: unexpected persistent id in a metadata pickle")


def load_dcp_metadata(path: Path):
    """A DCP `.metadata` file, unpickled through the allow-list (torch's own reader calls pickle.load on it)."""
    from torch.distributed.checkpoint.metadata import Metadata

    data = read_bytes(path, DCP_METADATA_MAX_BYTES, "checkpoint metadata file")
    try:
        meta = _AllowListUnpickler(data, _dcp_metadata_globals(), path).load()
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pickles raise many types
        raise BadInput(f"{path}: corrupt checkpoint metadata ({first_line(e)})") from None
    if not isinstance(meta, Metadata) or not isinstance(getattr(meta, "state_dict_metadata", None), dict) \
            or not isinstance(getattr(meta, "storage_data", None), dict):
        raise BadInput(f"{path}: not DCP checkpoint metadata")
    return meta


def _megatron_safe_globals() -> list:
    """megatron-core's own allow-list for the objects its checkpoints pickle (argparse args, RNG and rerun-state
    records, enums): Megatron-LM and Megatron-Bridge checkpoints hold them in their common state and pickled
    entries. Empty when megatron-core is not importable."""
    import logging
    import warnings

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "no CUDA runtime" on CPU machines
    try:
        with warnings.catch_warnings():  # megatron-core's import-time notices (no TE, no Apex) are not for users
            warnings.simplefilter("ignore")
            from megatron.core.safe_globals import SAFE_GLOBALS
    except ImportError:
        return []
    return list(SAFE_GLOBALS)


def load_weights_only(data: bytes, where: str):
    """A torch.save'd object through torch's own allow-list loader (tensors, containers, primitives) plus
    megatron-core's allow-list."""
    import torch

    try:
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # a class outside torch's list: megatron-core's may name it
            with torch.serialization.safe_globals(_megatron_safe_globals()):
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for a refused global, others for corrupt bytes
        raise BadInput(f"{where}: refused or corrupt pickled object ({first_line(e)})") from None
