"""Hugging Face checkpoints: lazy safetensors reading, streaming safetensors writing, config files.

Reading parses each file's safetensors header once (safe_open would parse it again for every tensor, and a header
may be 100 MB) and maps one tensor's bytes at a time. Writing streams: the safetensors Python API only writes whole
dicts, which would hold a whole shard (up to several GB) in memory, so `ShardedSafetensorsWriter` lays out each
shard's header from the known shapes first and then writes each tensor's bytes at its offset as it arrives (so
several processes can write one checkpoint). The files are plain safetensors: transformers and `safe_open` read
them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from falcon_bridge.core.config import HF_KEYS, Arch
from falcon_bridge.core.families import arch_from_hf
from falcon_bridge.core.mapping import HF_LAYER_PREFIX, refuse_more_layers_than_stored
from falcon_bridge.core.packed_ternary import packed_format
from falcon_bridge.errors import BadInput, first_line, shown
from falcon_bridge.formats.untrusted import (
    SAFETENSORS_HEADER_MAX_BYTES,
    TENSOR_NAME_MAX_CHARS,
    TOKENIZER_MAX_BYTES,
    read_json,
    regular_file_size,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8,
          "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_TENSOR_DIMS = 64  # torch's limit; a header's shape of millions of dimensions would take long to multiply out
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # weights, configs, tokenizer
# huggingface_hub's requests have no timeout: where connections to the Hub hang (a firewall dropping them), one
# missing `a/b` took 76 s to fail. A Hub that is there answers well within this.
HUB_PROBE_SECONDS = 3.0


def resolve_source(src: str) -> Path:
    """A local HF directory, or a Hub repo id, optionally `@REVISION` (a branch, tag or commit: Falcon-E ships its
    latent weights as the `prequantized` branch), downloaded (weights, configs, tokenizer) into the HF cache."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise BadInput(f"{src}: expected a directory holding config.json and *.safetensors")
        return path
    repo, at, revision = src.partition("@")
    if repo.count("/") != 1 or (at and not revision):
        raise BadInput(f"{src}: no such directory (and not a Hub repo id like 'tiiuae/Falcon-H1-0.5B-Base' or "
                       "'tiiuae/Falcon-E-1B-Base@prequantized')")
    from huggingface_hub import snapshot_download

    unreachable = why_hub_unreachable()
    try:
        # unreachable: only the local Hub cache is looked in, so a repo downloaded before still opens offline
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES,
                                      local_files_only=unreachable is not None))
    except Exception as e:  # noqa: BLE001 - every Hub failure (not cached, 404, auth) is one line for the user
        if unreachable is not None:
            raise BadInput(f"{src}: neither a local directory nor in the local Hugging Face cache, and the Hub "
                           f"cannot be reached ({unreachable})") from None
        raise BadInput(f"{src}: not a local directory, and the Hugging Face Hub could not provide it "
                       f"({first_line(e)})") from None


def why_hub_unreachable() -> str | None:
    """None when the Hugging Face Hub answers one request within HUB_PROBE_SECONDS, else why not. Asked through
    huggingface_hub's own session, so its proxies count and HF_HUB_OFFLINE refuses at once. The request runs in a
    daemon thread because the name lookup before it is bounded by no timeout; a thread left waiting does not keep
    the process alive."""
    from huggingface_hub import constants, get_session

    outcome = [f"{constants.ENDPOINT} did not answer within {HUB_PROBE_SECONDS:g} s"]

    def probe():
        try:
            get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
        except Exception as e:  # noqa: BLE001 - offline mode, no route, refused, TLS, timeout: all unreachable
            outcome[0] = first_line(e)
        else:
            outcome[0] = None

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_SECONDS)
    return outcome[0]


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # where a stored tensor's bytes start in the file


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file holds, from its header: each one's dtype, shape and bytes, checked to lie
    inside the file (so no size a header claims is ever allocated or read)."""
    problem = f"{path}: not a readable safetensors file"
    size = regular_file_size(path, 1 << 62, "safetensors shard")
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BadInput(f"{problem} (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(SAFETENSORS_HEADER_MAX_BYTES, size - 8):
                raise BadInput(f"{problem} (its header length, {length:,} bytes, exceeds the file or safetensors' "
                               f"limit of {SAFETENSORS_HEADER_MAX_BYTES:,})")
            header = json.loads(f.read(length))
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise BadInput(f"{problem} (header: {first_line(e)})") from None
    if not isinstance(header, dict):
        raise BadInput(f"{problem} (its header is not a JSON object)")
    data_start, tensors = 8 + length, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if len(name) > TENSOR_NAME_MAX_CHARS:
            raise BadInput(f"{problem} (a tensor name of {len(name):,} characters: {shown(name)})")
        dtype_name, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                                      for k in ("dtype", "shape", "data_offsets"))
        if isinstance(dtype_name, str) and dtype_name not in DTYPES:
            raise BadInput(f"{path}: tensor {name} has unsupported dtype {shown(dtype_name)}")
        dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
        if not (dtype is not None and isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS
                and all(type(n) is int and n >= 0 for n in shape) and isinstance(offsets, list)
                and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= size - data_start):
            raise BadInput(f"{problem} (tensor {name}: expected a dtype, a shape and data_offsets inside the "
                           f"file, got {shown(entry)})")
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise BadInput(f"{problem} (tensor {name}: shape {shown(shape)} needs {nbytes:,} bytes, its data_offsets "
                           f"give {offsets[1] - offsets[0]:,})")
        tensors[name] = TensorInfo(path, tuple(shape), dtype, data_start + offsets[0])
    return tensors


def read_tensor(info: TensorInfo, region: tuple[slice, ...] | None = None) -> torch.Tensor:
    """A stored tensor (or a region of it), copied out of its file. The file is mapped only for this read: a
    mapping kept open would count every page read so far in the process's resident memory, growing with the
    model; a region reads only its own pages."""
    nbytes = math.prod(info.shape) * info.dtype.itemsize
    if nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)[region or ...]
    raw = torch.from_file(str(info.file), shared=False, size=info.offset + nbytes, dtype=torch.uint8)[info.offset:]
    if info.offset % info.dtype.itemsize:  # viewed as the dtype only from an aligned start
        raw = raw.clone()
    tensor = raw.view(info.dtype).reshape(info.shape)
    return tensor[region or ...].clone()


class HFCheckpoint:
    """A Hugging Face checkpoint directory, read lazily one tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config = read_json(self.path / "config.json", "config.json")
        self.arch = arch_from_hf(self.config, source=str(self.path / "config.json"))
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
        self.stored: dict[str, TensorInfo] = {}  # every tensor as the files hold it (packed linears as uint8)
        for f in files:
            for name, info in read_safetensors_header(f).items():
                if name in self.stored:  # which copy transformers would load depends on the index
                    raise BadInput(f"{f}: tensor {name} is also stored in {self.stored[name].file.name}")
                if weight_map is not None and weight_map.get(name) != f.name:
                    raise BadInput(f"{f}: holds tensor {name}, which {INDEX_FILE} places "
                                   + (f"in {weight_map[name]}" if name in weight_map else "nowhere"))
                self.stored[name] = info
        refuse_more_layers_than_stored(self.arch, self.stored, HF_LAYER_PREFIX,
                                       f"{self.path / 'config.json'}: field {HF_KEYS['num_layers']}")
        self.tensors: dict[str, TensorInfo] = dict(self.stored)  # as the model sees them (packed ones unpacked)
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.stored))
            if missing:
                raise BadInput(f"{index}: tensor {missing[0]} is not in {weight_map[missing[0]]}"
                               + (f" (and {len(missing) - 1} more listed but stored nowhere)" if len(missing) > 1
                                  else ""))
        self.packed: dict[str, TensorInfo] = {}  # logical name → its weight_scale (HF BitNet packed checkpoints)
        quant = self.config.get("quantization_config") or {}
        if not isinstance(quant, dict):
            raise BadInput(f"{self.path / 'config.json'}: field quantization_config: expected an object")
        self.packing = None
        # a BitNet model: packed linears, or (autobitlinear online) latent weights the model quantizes as it runs
        self.bitnet = quant.get("quant_method") == "bitnet"
        if self.bitnet:
            self.packing = packed_format(quant, str(self.path / "config.json"))
            if self.packing is not None:
                self._adopt_packed_linears()

    def _adopt_packed_linears(self) -> None:
        """Present each quantized `X.weight` (packed uint8, or autobitlinear's ternary floats, with its
        `X.weight_scale`) as the float tensor `X.weight` of the unpacked shape, so the rest of the pipeline sees
        an ordinary checkpoint."""
        scales = {n for n in self.tensors if n.endswith(".weight_scale")}
        packed = sorted({n for n, i in self.tensors.items() if i.dtype == torch.uint8}
                        | {n.removesuffix("_scale") for n in scales if n.removesuffix("_scale") in self.tensors})
        if not packed:
            raise BadInput(f"{self.path / 'config.json'}: quantization_config says bitnet, but no tensor is packed "
                           "(uint8, or with a weight_scale)")
        for name in packed:
            scale_name = self.packing.scale_name(name)
            scale = self.tensors.pop(scale_name, None)
            if scale is None:
                raise BadInput(f"{self.tensors[name].file}: tensor {scale_name} is missing (packed {name} needs it)")
            info = self.tensors[name]
            self.tensors[name] = TensorInfo(info.file, self.packing.unpacked_shape(info.shape, info.dtype),
                                            scale.dtype)
            self.packed[name] = scale

    def _shard_path(self, index: Path, tensor: object, file: object) -> Path:
        """An index entry's shard: a safetensors file directly in the checkpoint directory."""
        if not isinstance(tensor, str) or len(tensor) > TENSOR_NAME_MAX_CHARS or not isinstance(file, str) \
                or Path(file).name != file or not file.endswith(".safetensors"):
            raise BadInput(f"{index}: weight_map entry {shown(tensor)}: {shown(file)} is not a .safetensors file "
                           "name in the checkpoint directory")
        path = self.path / file
        if not path.exists():
            raise BadInput(f"{path}: listed in {INDEX_FILE} but missing")
        return path

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of its file (packed ternary ones unpacked)."""
        info = self.tensors.get(name)
        if info is None:
            raise BadInput(f"{self.path}: tensor {name} is missing")
        try:
            if name in self.packed:
                weight_scale = read_tensor(self.packed[name])
                return self.packing.read_back(read_tensor(self.stored[name]), weight_scale, info.shape[0],
                                              info.dtype)
            return read_tensor(info)
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"{info.file}: tensor {name} could not be read ({first_line(e)})") from None

    def get_region(self, name: str, region: tuple[slice, ...]) -> torch.Tensor:
        """`get(name)[region]`, reading only that region from the file (packed ternary tensors are unpacked whole:
        their scale is per tensor)."""
        info = self.tensors.get(name)
        if info is None or name in self.packed:
            return self.get(name)[region]
        try:
            return read_tensor(info, region)
        except Exception as e:  # noqa: BLE001
            raise BadInput(f"{info.file}: tensor {name} could not be read ({first_line(e)})") from None

    def files(self) -> list[Path]:
        """Every file a conversion reads (configs, shards, tokenizer): what the manifest's sources record."""
        out = [self.path / "config.json"]
        if (self.path / INDEX_FILE).exists():
            out.append(self.path / INDEX_FILE)
        return out + list(self.files_read) + self.tokenizer_files()

    def tokenizer_files(self) -> list[Path]:
        return existing_tokenizer_files(self.path)



# ---- writing ---------------------------------------------------------------------------------------------------
def check_max_shard_bytes(max_shard_bytes: int) -> None:
    if type(max_shard_bytes) is not int or max_shard_bytes < 1:
        raise BadInput(f"--max-shard-size {shown(max_shard_bytes)}: expected a positive number of bytes")


class ShardedSafetensorsWriter:
    """Writes tensors into safetensors shards of at most max_shard_bytes each (a tensor larger than that gets a shard
    of its own), each tensor's bytes at the offset the shard's header gives it.

    `plan` lists (name, shape, dtype) in shard order; the headers are laid out from it first, so tensors may arrive
    in any order. Several writers (processes) may write one checkpoint together: each is given the `names` it
    writes, and the one with `leader` set writes every shard's header and the index. Memory: one tensor (two while
    hashing).

    hash_as_written: a file whose tensors this writer puts in file order, all of them, is hashed from those bytes on
    a thread while the next tensor is produced (its header is known to every writer), so the manifest need not read
    it back after the conversion: `hashed` (file name → {sha256, bytes}) once closed. A file written out of order or
    by several writers is left out of `hashed` (the manifest hashes it from disk). The writer hashes a tensor after
    `put` returns: the caller must not change it in place.
    """

    def __init__(self, out_dir: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int,
                 names: set[str] | None = None, leader: bool = True, hash_as_written: bool = False):
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
        self.total_bytes = sum(math.prod(s) * d.itemsize for _, s, d in plan)
        self._where: dict[str, tuple[str, int, tuple[int, ...], torch.dtype]] = {}  # name → file, offset, shape, dtype
        headers = []
        for file_name, shard in zip(self.file_names, shards):
            header, offset = {}, 0
            for name, shape, dtype in shard:
                n = math.prod(shape) * dtype.itemsize
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
                offset += n
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as safetensors itself writes it
            headers.append((file_name, struct.pack("<Q", len(raw)) + raw))
            for name, shape, dtype in shard:
                self._where[name] = (file_name, 8 + len(raw) + header[name]["data_offsets"][0], shape, dtype)
        self._todo = set(self._where) if names is None else set(names)
        self._leader = leader
        if leader:
            for file_name, raw in headers:
                self._write_at(file_name, 0, raw)
        self.hashed: dict[str, dict] = {}
        # file name → (its running sha256, the offset its next bytes must come from, its size), while in order
        self._streams: dict[str, tuple] = {}
        if hash_as_written:
            for (file_name, raw), shard in zip(headers, shards):
                size = len(raw) + sum(math.prod(s) * d.itemsize for _, s, d in shard)
                self._streams[file_name] = (hashlib.sha256(raw), len(raw), size)
        self._hashing = ThreadPoolExecutor(max_workers=1) if hash_as_written else None
        self._hashing_now: Future | None = None

    def _write_at(self, file_name: str, offset: int, data) -> None:
        # no O_TRUNC: other writers' bytes may already be in the file
        fd = os.open(self.out_dir / file_name, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            view = memoryview(data).cast("B")
            while view:  # pwrite may write less than asked (Linux caps one call near 2 GiB)
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._todo:
            raise RuntimeError(f"writer: {name} is not one of this writer's tensors, or was written already")
        file_name, offset, shape, dtype = self._where[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"writer expected {name} {shape} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().contiguous().cpu().view(torch.uint8).numpy()  # no copy
        self._write_at(file_name, offset, data)
        self._todo.discard(name)
        self._hash_in_order(file_name, offset, data)

    def _hash_in_order(self, file_name: str, offset: int, data) -> None:
        stream = self._streams.pop(file_name, None)
        if stream is None or stream[1] != offset:
            return  # out of order (or not hashing): the manifest reads this file back
        digest, _, size = stream
        self._streams[file_name] = (digest, offset + data.nbytes, size)
        if self._hashing_now is not None:
            self._hashing_now.result()  # one tensor hashing at a time: memory stays bounded
        self._hashing_now = self._hashing.submit(digest.update, data)  # hashlib releases the GIL on large blocks

    def close(self) -> None:
        if self._hashing is not None:
            self._hashing.shutdown(wait=True)
            if self._hashing_now is not None:
                self._hashing_now.result()
            self.hashed = {name: {"sha256": digest.hexdigest(), "bytes": size}
                           for name, (digest, written, size) in self._streams.items() if written == size}
        if self._todo:
            raise RuntimeError(f"writer closed with {len(self._todo)} tensors unwritten, e.g. {min(self._todo)}")
        if self._leader and len(self.file_names) > 1:
            weight_map = {name: where[0] for name, where in self._where.items()}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2) + "\n")


def write_config(out_dir: Path, arch: Arch, dtype: torch.dtype, extra: dict | None = None) -> None:
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
