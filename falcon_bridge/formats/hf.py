"""Hugging Face checkpoints: lazy safetensors reading, streaming safetensors writing, config files.

Reading goes through safetensors' own `safe_open` (memory-mapped, one tensor at a time). Writing streams: the
safetensors Python API only writes whole dicts, which would hold a whole shard (up to several GB) in memory, so
`ShardedSafetensorsWriter` lays out each shard's header from the known shapes first and then appends each tensor's
bytes as it arrives. The files are plain safetensors: transformers and `safe_open` read them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from falcon_bridge.core.config import FalconH1Arch
from falcon_bridge.core.packed_ternary import packed_format
from falcon_bridge.errors import BadInput, first_line
from falcon_bridge.formats.untrusted import TOKENIZER_MAX_BYTES, read_json, regular_file_size

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
          "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def resolve_source(src: str) -> Path:
    """A local HF directory, or a Hub repo id downloaded (weights, configs, tokenizer) into the HF cache."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"{src}: expected a directory holding config.json and *.safetensors")
        return path
    if src.count("/") != 1:
        raise BadInput(f"{src}: no such directory (and not a Hub repo id like 'tiiuae/Falcon-H1-0.5B-Base')")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                           "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - every Hub failure (offline, 404, auth) is one line for the user
        raise BadInput(f"{src}: not a local directory, and the Hugging Face Hub could not provide it "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no details'})") from None


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class HFCheckpoint:
    """A Hugging Face checkpoint directory, read lazily one tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_json(self.path / "config.json", "config.json")
        self.arch = FalconH1Arch.from_hf(self.config, source=str(self.path / "config.json"))
        index = self.path / INDEX_FILE
        weight_map = None
        if index.exists():
            weight_map = read_json(index, "safetensors index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise BadInput(f"{index}: field weight_map: expected an object of tensor name → shard file")
            files = sorted({self._shard_path(index, name, f) for name, f in weight_map.items()})
        elif (self.path / SINGLE_FILE).exists():
            files = [self.path / SINGLE_FILE]
        else:
            raise BadInput(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are read)")
        self.files_read = files
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            regular_file_size(f, 1 << 62, "safetensors shard")
            try:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        sl = h.get_slice(name)
                        dtype = DTYPES.get(sl.get_dtype())
                        if dtype is None:
                            raise BadInput(f"{f}: tensor {name} has unsupported dtype {sl.get_dtype()}")
                        if name in self.tensors:  # which copy transformers would load depends on the index
                            raise BadInput(f"{f}: tensor {name} is also stored in {self.tensors[name].file.name}")
                        if weight_map is not None and weight_map.get(name) != f.name:
                            raise BadInput(f"{f}: holds tensor {name}, which {INDEX_FILE} places "
                                           + (f"in {weight_map[name]}" if name in weight_map else "nowhere"))
                        self.tensors[name] = TensorInfo(f, tuple(sl.get_shape()), dtype)
            except BadInput:
                raise
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for corrupt files
                raise BadInput(f"{f}: not a readable safetensors file ({first_line(e)})") from None
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.tensors))
            if missing:
                raise BadInput(f"{index}: tensor {missing[0]} is not in {weight_map[missing[0]]}"
                               + (f" (and {len(missing) - 1} more listed but stored nowhere)" if len(missing) > 1
                                  else ""))
        self.packed: dict[str, TensorInfo] = {}  # logical name → its weight_scale (HF BitNet packed checkpoints)
        quant = self.config.get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise BadInput(f"{self.path / 'config.json'}: field quantization_config: expected an object")
        self.packing = None
        if quant.get("quant_method") == "bitnet":
            self.packing = packed_format(quant, str(self.path / "config.json"))
            self._adopt_packed_linears()

    def _adopt_packed_linears(self) -> None:
        """Present each packed uint8 `X.weight` (with its `X.weight_scale`) as the float tensor `X.weight` of the
        unpacked shape, so the rest of the pipeline sees an ordinary checkpoint."""
        packed = [n for n, i in self.tensors.items() if i.dtype == torch.uint8]
        if not packed:
            raise BadInput(f"{self.path / 'config.json'}: quantization_config says bitnet, but no tensor is packed "
                           "(uint8)")
        for name in packed:
            scale_name = self.packing.scale_name(name)
            scale = self.tensors.pop(scale_name, None)
            if scale is None:
                raise BadInput(f"{self.tensors[name].file}: tensor {scale_name} is missing (packed {name} needs it)")
            info = self.tensors[name]
            self.tensors[name] = TensorInfo(info.file, self.packing.unpacked_shape(info.shape), scale.dtype)
            self.packed[name] = scale

    def _shard_path(self, index: Path, tensor: object, file: object) -> Path:
        """An index entry's shard: a safetensors file directly in the checkpoint directory."""
        if not isinstance(tensor, str) or not isinstance(file, str) or Path(file).name != file \
                or not file.endswith(".safetensors"):
            raise BadInput(f"{index}: weight_map entry {tensor!r:.80}: {file!r:.80} is not a .safetensors file name "
                           "in the checkpoint directory")
        path = self.path / file
        if not path.exists():
            raise BadInput(f"{path}: listed in {INDEX_FILE} but missing")
        return path

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of the file. The file is mapped only for this read: a mapping kept open would
        count every page read so far in the process's resident memory, growing with the model."""
        info = self.tensors.get(name)
        if info is None:
            raise BadInput(f"{self.path}: tensor {name} is missing")
        try:
            if name in self.packed:
                with safe_open(str(self.packed[name].file), framework="pt") as h:
                    weight_scale = h.get_tensor(self.packing.scale_name(name))
                with safe_open(str(info.file), framework="pt") as h:
                    return self.packing.read_back(h.get_tensor(name), weight_scale, info.shape[0]).to(info.dtype)
            with safe_open(str(info.file), framework="pt") as h:
                return h.get_tensor(name).clone()
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"{info.file}: tensor {name} could not be read ({e})") from None

    def get_region(self, name: str, region: tuple[slice, ...]) -> torch.Tensor:
        """`get(name)[region]`, reading only that region from the file (packed ternary tensors are unpacked whole:
        their scale is per tensor)."""
        info = self.tensors.get(name)
        if info is None or name in self.packed:
            return self.get(name)[region]
        try:
            with safe_open(str(info.file), framework="pt") as h:
                return h.get_slice(name)[region].clone()
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"{info.file}: tensor {name} could not be read ({e})") from None

    def files(self) -> list[Path]:
        """Every file a conversion reads (configs, shards, tokenizer): what the manifest's sources record."""
        out = [self.path / "config.json"]
        if (self.path / INDEX_FILE).exists():
            out.append(self.path / INDEX_FILE)
        return out + list(self.files_read) + self.tokenizer_files()

    def tokenizer_files(self) -> list[Path]:
        return existing_tokenizer_files(self.path)



# ---- writing ---------------------------------------------------------------------------------------------------
class ShardedSafetensorsWriter:
    """Writes tensors, in the announced order, into safetensors shards of at most max_shard_bytes each.

    `plan` lists (name, shape, dtype) in write order; `put` must follow that order. Memory: one tensor.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for item in plan:
            n = math.prod(item[1]) * item[2].itemsize
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(item)
            size += n
        total = len(shards)
        self.file_names = [SINGLE_FILE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                                            for i in range(total)]
        self._order = [(i, name, shape, dtype) for i, shard in enumerate(shards) for name, shape, dtype in shard]
        self._shards = shards
        self._pos = 0
        self._file = None
        self._file_index = -1
        self.total_bytes = sum(math.prod(s) * d.itemsize for _, s, d in plan)

    def _open_shard(self, i: int) -> None:
        if self._file:
            self._file.close()
        header, offset = {}, 0
        for name, shape, dtype in self._shards[i]:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors itself writes it
        self._file = open(self.out_dir / self.file_names[i], "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._file_index = i

    def put(self, name: str, tensor: torch.Tensor) -> None:
        i, expected, shape, dtype = self._order[self._pos]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {expected} {shape} {dtype}, got {name} "
                               f"{tuple(tensor.shape)} {tensor.dtype}")
        if i != self._file_index:
            self._open_shard(i)
        self._file.write(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().data)  # no extra copy
        self._pos += 1

    def close(self) -> None:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        if self._file:
            self._file.close()
        if len(self.file_names) > 1:
            weight_map = {name: self.file_names[i] for i, name, _, _ in self._order}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2) + "\n")


def write_config(out_dir: Path, arch: FalconH1Arch, dtype: torch.dtype, extra: dict | None = None) -> None:
    """config.json (every shape key and all 14 multipliers explicit) and generation_config.json."""
    cfg = arch.to_hf()
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.update(extra or {})
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def existing_tokenizer_files(directory: Path) -> list[Path]:
    """The tokenizer files a directory has, each checked to be a regular file of a bounded size (a link to
    /dev/zero would otherwise be copied until the disk is full)."""
    files = [directory / f for f in TOKENIZER_FILES if os.path.lexists(directory / f)]
    for f in files:
        regular_file_size(f, TOKENIZER_MAX_BYTES, "tokenizer file")
    return files


def copy_tokenizer(files: list[Path], out_dir: Path) -> list[str]:
    for f in files:
        shutil.copyfile(f, out_dir / f.name)
    return [f.name for f in files]


def _stored_tensors(directory: Path) -> dict[str, Path]:
    """name → file, for every tensor stored in a directory's safetensors files (as stored: packed uint8 stays)."""
    found = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            found.update(dict.fromkeys(h.keys(), f))
    return found


def ulp_differences(a_dir: Path, b_dir: Path) -> dict[str, int | None]:
    """For every tensor stored in either directory: the largest difference between the two stored copies in units
    in the last place (0: the same bytes), or None when one directory lacks it or its dtype or shape differs.
    One pair of tensors in memory at a time."""
    a, b = _stored_tensors(a_dir), _stored_tensors(b_dir)
    out: dict[str, int | None] = dict.fromkeys(sorted(set(a) ^ set(b)))
    for name in sorted(set(a) & set(b)):
        with safe_open(str(a[name]), framework="pt") as fa, safe_open(str(b[name]), framework="pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            out[name] = None
            continue
        bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
        out[name] = int((x.view(bits).long() - y.view(bits).long()).abs().max()) if x.numel() else 0
    return out
