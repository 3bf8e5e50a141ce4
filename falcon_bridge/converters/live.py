"""The live bridge: HF weights straight into a running Megatron model (any family's), and a running model's weights
out as HF tensors, with no checkpoint on disk.

Both directions go through what the file path uses: the model's own `sharded_state_dict` (the checkpoint keys,
global shapes, offsets and replica ids its torch_dist checkpoints have) and the one map (`core.mapping`) with its
transforms; µP fold and the HF output formats come from `core.mup` and `core.hf_export`. So `model_from_hf` gives
the weights `import-hf` + `dist_checkpointing.load` give, and `hf_weights` the bytes `dist_checkpointing.save` +
`export-hf` give.

Every rank of the model-parallel group calls these functions (megatron's parallel state initialized, as in
training). Export goes through a transfer plan (`transfer_plan`: every HF tensor's name, shape, dtype, owning
pipeline stage and bytes, and which rank holds the main copy of each shard; made once, reused across refit steps):
`export_hf_weights` yields the same HF tensors on every rank, bucket by bucket — the main copies packed into one flat
buffer, broadcast from the stage that holds them, all-gathered within the TP group — with the next bucket in flight
while the current one is transformed.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from falcon_bridge.converters.import_hf import check_tensors, folded_if, import_options
from falcon_bridge.converters.output import atomic_output_dir
from falcon_bridge.core.choices import EXPORT_MAX_SHARD_BYTES, ExportFormat, MupExport, MupMode
from falcon_bridge.core.hf_export import HFExport
from falcon_bridge.core.mapping import COPY, VOCAB, Ctx, Entry, entries
from falcon_bridge.core.parallel import stored_as_hf
from falcon_bridge.errors import BadInput, shown
from falcon_bridge.formats.hf import (
    HFCheckpoint,
    ShardedSafetensorsWriter,
    copy_tokenizer,
    existing_tokenizer_files,
    resolve_source,
    write_config,
)


def _sharded_tensors(sharded_state_dict) -> list:
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    out = [sh for sh in nested_values(sharded_state_dict) if isinstance(sh, ShardedTensor)]
    assert all(sh.flattened_range is None for sh in out), "model shards are whole slices"
    return out


def _region(sh) -> tuple[slice, ...]:
    """The part of the global tensor a shard holds (clipped to the stored shape: a padding-only vocab shard holds
    none of it)."""
    return tuple(slice(min(o, g), min(o + n, g)) for o, n, g in zip(sh.global_offset, sh.local_shape,
                                                                    sh.global_shape))


def _local(region: tuple[slice, ...]) -> tuple[slice, ...]:
    """Where a shard's data holds that part: from its first row (the rest is padding)."""
    return tuple(slice(0, r.stop - r.start) for r in region)


def _export_policy(provider, dtype: torch.dtype | None, mup: MupExport, fmt: ExportFormat) -> HFExport:
    return HFExport(provider.arch, provider.mup_mode, provider.bitnet, lambda name: dtype or provider.params_dtype,
                    mup, fmt)


def _owners(arch) -> tuple[Ctx, dict]:
    """The layout checkpoints store (HF's vocabulary rows and groups) and checkpoint key → (entry, suffix)."""
    ctx = Ctx(arch, stored_as_hf(arch))
    return ctx, {key: (e, key[len(e.megatron):]) for e in entries(arch) for key in e.megatron_keys(ctx)}


# ---- HF → live model ------------------------------------------------------------------------------------------
def provider_from_hf(source: str | Path | HFCheckpoint, mup: MupMode = MupMode.PRESERVE, bitnet: bool = False,
                     params_dtype: torch.dtype | None = None, pg_collection=None, vpp: int = 1):
    """Our provider (of the checkpoint's family) for an HF directory, Hub id or opened checkpoint: the model it
    builds is the one `load_hf_weights` fills. A training framework changes its settings before building —
    `run_settings` (TransformerConfig fields: sequence_parallel, recompute_*, …), `seq_length`, the layout
    (`lay_out_over(pg_collection, vpp)`) — then builds each model chunk with `provide(pp_rank, vp_stage,
    parallel_output, pg_collection)`.

    mup: "preserve" (the model applies the multipliers) or "fold" (folded into the weights); bitnet: BitNet b1.58
    linears (implied by a packed source); params_dtype: default the checkpoint's. The layout: TP and PP of
    `pg_collection`'s groups, or of megatron's global parallel state when it is initialized (else TP = PP = 1),
    with `vpp` virtual pipeline stages per pipeline rank.
    """
    from megatron.core import parallel_state as ps

    from falcon_bridge.core import mup as mup_rules
    from falcon_bridge.megatron.provider import provider_class

    ckpt = _opened(source)
    arch = ckpt.arch.validate_for_megatron()
    bitnet, _, _ = import_options(ckpt, mup, bitnet)
    applied = None  # a family without µP applies none
    if arch.has_mup:
        applied = mup_rules.folded_arch(arch).multipliers if mup == MupMode.FOLD else arch.multipliers
    provider = provider_class(arch)(arch, params_dtype=params_dtype or ckpt.tensors["model.embed_tokens.weight"].dtype,
                                    multipliers=applied, bitnet=bitnet)
    if pg_collection is not None or ps.model_parallel_is_initialized():
        provider.lay_out_over(pg_collection, vpp)
    elif vpp != 1:
        provider.layout = replace(provider.layout, vpp=vpp).validate(arch)  # refused: virtual stages need PP > 1
    return provider


def model_from_hf(source: str | Path, mup: MupMode = MupMode.PRESERVE, bitnet: bool = False,
                  params_dtype: torch.dtype | None = None, parallel_output: bool = True,
                  device: torch.device | str | None = None):
    """Our Megatron model (of the checkpoint's family) for this rank's TP/PP position (megatron's global parallel
    state), its weights read from an HF directory or Hub id: `provider_from_hf` + `provide` + `load_hf_weights`
    in one call. Each rank reads only the map entries whose tensors its stage holds.
    """
    ckpt = _opened(source)
    model = provider_from_hf(ckpt, mup, bitnet, params_dtype).provide(parallel_output=parallel_output)
    if device is not None:
        model = model.to(device)
    load_hf_weights(model, ckpt, mup)
    return model


def _opened(source: str | Path | HFCheckpoint) -> HFCheckpoint:
    return source if isinstance(source, HFCheckpoint) else HFCheckpoint(resolve_source(str(source)))


def _unwrap_all(models) -> list:
    """Our model chunks (any family's) of a module or a list of them (virtual pipeline stages), each possibly
    inside DDP / Float16Module wrappers."""
    from falcon_bridge.megatron.language_model import HFLanguageModel

    chunks = []
    for model in models if isinstance(models, (list, tuple)) else [models]:
        inner = model
        while not isinstance(inner, HFLanguageModel) and hasattr(inner, "module"):
            inner = inner.module
        if not isinstance(inner, HFLanguageModel) or not hasattr(inner, "provider"):
            raise BadInput(f"{type(model).__name__}: not a model built by falcon-bridge's provider")
        chunks.append(inner)
    if not chunks or any(c.provider is not chunks[0].provider for c in chunks):
        raise BadInput("the live bridge takes one model: one module or the chunks one provider built")
    return chunks


def _check_source(ckpt: HFCheckpoint, provider, mup: MupMode) -> None:
    """The source holds the model the provider built, with the µP and BitNet treatment it was built for."""
    arch = ckpt.arch
    if type(arch) is not type(provider.arch):
        raise BadInput(f"{ckpt.path}: a {arch.family} checkpoint, but the model is {provider.arch.family}")
    if arch != provider.arch:
        field = next(f.name for f in fields(arch) if getattr(arch, f.name) != getattr(provider.arch, f.name))
        raise BadInput(f"{ckpt.path}: not the model's architecture: {field} is {getattr(arch, field)!r}, the "
                       f"model's {getattr(provider.arch, field)!r}")
    if mup != provider.mup_mode:
        raise BadInput(f"mup {mup}: the model was built for mup {provider.mup_mode}")
    bitnet, _, _ = import_options(ckpt, mup, provider.bitnet)
    if bitnet != provider.bitnet:
        raise BadInput(f"{ckpt.path}: a BitNet (packed) checkpoint, but the model was built without BitNet linears")
    check_tensors(ckpt)


@torch.no_grad()
def load_hf_weights(models, source: str | Path | HFCheckpoint, mup: MupMode | None = None) -> None:
    """Fill a model built by our provider — one module or the list of its virtual pipeline chunks, each possibly
    wrapped (megatron DDP, Float16Module) — from an HF directory, Hub id or opened checkpoint, the way
    dist_checkpointing.load fills it from a torch_dist checkpoint: every shard of each chunk's sharded_state_dict
    gets its slice of the global tensor the map makes of the HF tensors; factories merge their pieces back;
    vocabulary padding is zero. Parameters are copied into in place (wrappers' buffers stay valid); an optimizer
    built already keeps its own fp32 copies until told to reload them (megatron's reload_model_params).

    mup: how the source relates to the model (default: what the provider was built for; a different one is
    refused). Each rank reads only the entries its chunks hold, and of a tensor a shard is a slice of, that slice.
    """
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import apply_factory_merges
    from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

    chunks = _unwrap_all(models)
    provider, ckpt = chunks[0].provider, _opened(source)
    mup = provider.mup_mode if mup is None else mup
    _check_source(ckpt, provider, mup)
    arch = provider.arch
    ctx, owner = _owners(arch)
    prepared = [load_preprocess(_sharded_state_dict(chunk)) for chunk in chunks]
    shards: dict = {}
    for sharded, _, _ in prepared:
        for sh in _sharded_tensors(sharded):
            entry, suffix = owner[sh.key]
            shards.setdefault(entry, []).append((suffix, sh))
    for entry in entries(arch):  # forward order; an entry no chunk holds anything of is never read
        if entry not in shards:
            continue
        if entry.transform in (COPY, VOCAB):  # the shard is a slice of the HF tensor: read just that slice
            (name,) = entry.hf
            for _, sh in shards[entry]:
                region = _region(sh)
                _fill(sh, region, folded_if(mup, arch, name, ckpt.get_region(name, region)))  # scalar factors
            continue
        hf = [folded_if(mup, arch, n, ckpt.get(n)) for n in entry.hf]
        pieces = entry.transform.to_megatron(ctx, *hf)
        for suffix, sh in shards[entry]:
            region = _region(sh)
            _fill(sh, region, pieces[suffix][region])
        del hf, pieces
    for chunk, (sharded, _, factories) in zip(chunks, prepared):
        loaded = dict_list_map_inplace(lambda x: None if isinstance(x, ShardedObject) else x.data, sharded)
        chunk.load_state_dict(apply_factory_merges(loaded, factories))


def _sharded_state_dict(chunk) -> dict:
    """A chunk's sharded_state_dict, over its own data-parallel group when its process groups name one (megatron
    reads the global parallel state's otherwise, which a model built over a framework's groups may not have)."""
    dp_cp = chunk.pg_collection.dp_cp
    return chunk.sharded_state_dict(metadata=None if dp_cp is None else {"dp_cp_group": dp_cp})


def _fill(sh, region: tuple[slice, ...], values: torch.Tensor) -> None:
    """A shard's data: the region's values, zeros beyond the stored shape (vocabulary padding rows)."""
    sh.data.zero_()
    sh.data[_local(region)].copy_(values)


# ---- live model → HF ------------------------------------------------------------------------------------------
# Pieces start at multiples of this many bytes in a bucket's flat buffer, so any dtype can view its piece.
_ALIGN = 16
DEFAULT_BUCKET_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PlannedTensor:
    """One HF tensor an export yields: its name, shape and dtype, the pipeline rank (`stage`) whose model chunk
    `chunk` (index in that rank's model list: its virtual pipeline stage) holds its main copy, and its bytes."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    stage: int
    chunk: int
    nbytes: int


@dataclass(frozen=True)
class _Piece:
    """One region of one of an entry's Megatron tensors (key suffix), sent by the TP rank of the owning stage that
    holds its main copy."""

    suffix: str
    region: tuple[slice, ...]
    tp_rank: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(r.stop - r.start for r in self.region)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True, eq=False)
class _EntryPlan:
    """One map entry: where its pieces come from, what this rank sends and holds copies of, what it yields."""

    entry: Entry
    stage: int
    shapes: dict[str, tuple[int, ...]]  # key suffix → global (stored) shape
    pieces: tuple[_Piece, ...]
    sends: dict[int, torch.Tensor]  # piece index → this rank's main copy of it (a view of a parameter)
    copies: tuple[tuple[int, torch.Tensor], ...]  # (piece index, another copy of it this rank holds)
    copied: bool  # some rank of the group holds another copy: the entry's drift is reported
    outputs: tuple[PlannedTensor, ...]  # what it yields (all, or a filter's selection)

    def slot_bytes(self, tp: int) -> list[int]:
        """Bytes each TP rank's slot of a bucket needs for this entry."""
        sizes = [0] * tp
        for p in self.pieces:
            sizes[p.tp_rank] += _aligned(p.nbytes)
        return sizes


@dataclass(frozen=True, eq=False)
class _Bucket:
    """Consecutive entries of one owning stage sent in one flat byte buffer: TP rank t's pieces in slot t (bytes
    [t·slot, (t+1)·slot)); `offsets[i][j]` is where entry i's piece j starts in the gathered buffer."""

    stage: int
    slot: int
    entries: tuple[_EntryPlan, ...]
    offsets: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """What an export of a live model yields (`tensors`: name, shape, dtype, owning pipeline rank and chunk, bytes;
    map order) and how each rank takes part, computed once by `transfer_plan` and reused by `export_hf_weights`
    across refit steps. It holds views of the model's parameters (the shards of its sharded_state_dict), so it is
    valid while the parameters keep their storage: training steps update them in place and need no new plan; a
    model whose parameters were reallocated (moved to another device, offloaded and reloaded, wrapped in megatron
    DDP after planning) needs a new plan, and export refuses the stale one. `fingerprint`: architecture, layout and
    export policy."""

    tensors: tuple[PlannedTensor, ...]
    fingerprint: str
    _model: str
    _policy: HFExport
    _ctx: Ctx
    _entries: tuple[_EntryPlan, ...]
    _storage: tuple[int, ...]  # the parameters' data pointers when planned
    _tp: int
    _buckets: dict = field(default_factory=dict, repr=False)  # bucket_bytes → buckets, made on first use

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def filter(self, select: Iterable[str] | Callable[[str], bool]) -> TransferPlan:
        """The plan for some of the tensors: HF names (each must be in the plan) or a predicate on names. Every
        rank must select the same tensors."""
        if callable(select):
            chosen = {t.name for t in self.tensors if select(t.name)}
        else:
            chosen = set(select)
            unknown = chosen - {t.name for t in self.tensors}
            if unknown:
                raise BadInput(f"not in the transfer plan: {shown(sorted(unknown))}")
        kept = []
        for ep in self._entries:
            outputs = tuple(t for t in ep.outputs if t.name in chosen)
            if outputs:
                kept.append(replace(ep, outputs=outputs))
        return replace(self, tensors=tuple(t for ep in kept for t in ep.outputs), _entries=tuple(kept),
                       _buckets={})

    @property
    def min_bucket_bytes(self) -> int:
        """The smallest bucket_bytes export takes: what the largest map entry takes in a bucket (its TP ranks'
        shares, each padded to the largest)."""
        return max((self._tp * max(ep.slot_bytes(self._tp)) for ep in self._entries), default=0)

    def buckets(self, bucket_bytes: int) -> list[_Bucket]:
        """The entries cut into buckets of at most `bucket_bytes` gathered bytes, each from one pipeline stage."""
        if bucket_bytes not in self._buckets:
            self._buckets[bucket_bytes] = self._cut(bucket_bytes)
        return self._buckets[bucket_bytes]

    def _cut(self, bucket_bytes: int) -> list[_Bucket]:
        tp = self._tp
        if self.min_bucket_bytes > bucket_bytes:
            largest = max(self._entries, key=lambda ep: max(ep.slot_bytes(tp)))
            raise BadInput(f"bucket_bytes {bucket_bytes}: below the {self.min_bucket_bytes} bytes that "
                           f"{largest.entry.hf[0]}, the largest tensor, takes in a bucket")
        buckets: list[_Bucket] = []
        group: list[_EntryPlan] = []
        starts: list[list[int]] = []  # per entry of the group: where each piece starts in its TP rank's slot
        used = [0] * tp

        def close() -> None:
            slot = max(used)
            buckets.append(_Bucket(group[0].stage, slot, tuple(group), tuple(
                tuple(p.tp_rank * slot + start for p, start in zip(ep.pieces, entry_starts))
                for ep, entry_starts in zip(group, starts))))

        for ep in self._entries:
            if group and (group[0].stage != ep.stage or tp * max(
                    u + n for u, n in zip(used, ep.slot_bytes(tp))) > bucket_bytes):
                close()
                group, starts, used = [], [], [0] * tp
            group.append(ep)
            starts.append([])
            for p in ep.pieces:
                starts[-1].append(used[p.tp_rank])
                used[p.tp_rank] += _aligned(p.nbytes)
        if group:
            close()
        return buckets


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _model_parallel_groups(chunk):
    """The model's TP, PP and model-parallel (TP × PP) process groups."""
    pg = chunk.pg_collection
    if getattr(pg, "mp", None) is None:
        raise BadInput("the model's pg_collection has no model-parallel group (mp): the export needs one")
    return pg.tp, pg.pp, pg.mp


def _model_identity(provider) -> str:
    return json.dumps([provider.arch.to_hf(), str(provider.layout), provider.mup_mode, provider.bitnet,
                       str(provider.params_dtype)], default=str)


def _storage(chunks) -> tuple[int, ...]:
    return tuple(p.data_ptr() for chunk in chunks for p in chunk.parameters())


def _main_in_group(replica_id) -> bool:
    """Whether a shard is the main copy within its model-parallel group: megatron's replica ids are (pipeline copy,
    tensor-parallel copy, data-parallel rank) or one int; the data-parallel rank does not count here."""
    ids = replica_id if isinstance(replica_id, tuple) else (replica_id,)
    return not any(ids[:2])


def _agree(group, what: str, value) -> None:
    """Every rank of `group` passes the same `value`, or every rank raises the same error (no rank hangs)."""
    values = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(values, value, group=group)
    if any(v != values[0] for v in values):
        raise BadInput(f"the ranks disagree on {what}: " + "; ".join(f"rank {i}: {v}" for i, v in enumerate(values)
                                                                   if v != values[0])[:400])


@torch.no_grad()
def transfer_plan(models, dtype: torch.dtype | None = None, mup: MupExport = MupExport.UNFOLD,
                  fmt: ExportFormat = ExportFormat.LATENT) -> TransferPlan:
    """The transfer plan of a live model — one module or the list of its virtual pipeline chunks, each possibly
    wrapped (megatron DDP, Float16Module) — for HF tensors in `dtype` (default: the model's), µP unfolded or kept
    folded (`mup`), BitNet linears in format `fmt` (see `hf_weights`). Every rank of the model-parallel group calls
    it (two object all-gathers: the ranks' models must agree, and each rank learns which rank holds the main copy
    of every shard)."""
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    chunks = _unwrap_all(models)
    provider = chunks[0].provider
    arch = provider.arch
    tp, pp, mp = _model_parallel_groups(chunks[0])
    model = _model_identity(provider)
    _agree(mp, "the model (architecture, layout, µP, BitNet, dtype)", model)
    policy = _export_policy(provider, dtype, mup, fmt)
    ctx = Ctx(arch, stored_as_hf(arch))

    held = {}  # (key, bounds) → this rank's shard of that region
    for chunk_index, chunk in enumerate(chunks):
        for sh in _sharded_tensors(save_preprocess(_sharded_state_dict(chunk))[0]):
            held.setdefault((sh.key, tuple((r.start, r.stop) for r in _region(sh))), (chunk_index, sh))
    everyone = [None] * mp.size()
    torch.distributed.all_gather_object(everyone, (tp.rank(), pp.rank(), [
        (key, bounds, sh.replica_id, str(sh.data.dtype).removeprefix("torch."), chunk_index)
        for (key, bounds), (chunk_index, sh) in held.items()]), group=mp)
    holders: dict[str, dict] = {}  # key → bounds → [(group rank, tp rank, pp rank, main, dtype, chunk)]
    for rank, (tp_rank, pp_rank, shards) in enumerate(everyone):
        for key, bounds, replica_id, dtype_name, chunk_index in shards:
            holders.setdefault(key, {}).setdefault(bounds, []).append(
                (rank, tp_rank, pp_rank, _main_in_group(replica_id), getattr(torch, dtype_name), chunk_index))
    real_vocab_ranks = -(-arch.vocab_size // (provider.layout.padded_vocab(arch) // tp.size()))

    planned = []
    for e in entries(arch):
        shapes, pieces, sends, copies, copied, owners = {}, [], {}, [], False, set()
        for key, shape in e.megatron_keys(ctx).items():
            suffix = key[len(e.megatron):]
            shapes[suffix] = tuple(shape)
            covered = 0
            for bounds, holding in sorted(holders.get(key, {}).items()):
                main = min((h for h in holding if h[3]), key=lambda h: (h[2], h[1]), default=None)
                if main is None:  # a padding-only vocabulary placeholder: a copy of nothing
                    continue
                rank, tp_rank, pp_rank, _, dtype_, chunk_index = main
                region = tuple(slice(a, b) for a, b in bounds)
                index = len(pieces)
                pieces.append(_Piece(suffix, region, tp_rank, dtype_))
                covered += math.prod(b - a for a, b in bounds)
                owners.add((pp_rank, chunk_index))
                # other real copies of the region (a padding-only vocabulary shard holds none of it)
                others = [h for h in holding if h is not main
                          and not (e.transform is VOCAB and h[1] >= real_vocab_ranks)]
                copied = copied or bool(others)
                if rank == mp.rank():
                    sends[index] = _local_view(held[key, bounds][1], region)
                elif any(h[0] == mp.rank() for h in others):
                    copies.append((index, _local_view(held[key, bounds][1], region)))
            if covered != math.prod(shape):
                raise AssertionError(f"{key}: the main copies of the model-parallel group hold {covered} of its "
                                     f"{math.prod(shape)} elements")
        assert len({stage for stage, _ in owners}) == 1, f"{e.megatron}: main copies on several pipeline stages"
        stage, chunk_index = min(owners)
        outputs = tuple(PlannedTensor(n, tuple(s), d, stage, chunk_index, math.prod(s) * d.itemsize)
                        for name, shape in zip(e.hf, e.hf_shapes) for n, s, d in policy.layout(name, shape))
        planned.append(_EntryPlan(e, stage, shapes, tuple(pieces), sends, tuple(copies), copied, outputs))
    fingerprint = hashlib.sha256(json.dumps([model, policy.mup_export, policy.fmt,
                                             str(policy.dtype_of("model.embed_tokens.weight"))]).encode()).hexdigest()[:16]
    return TransferPlan(tuple(t for ep in planned for t in ep.outputs), fingerprint, model, policy, ctx,
                        tuple(planned), _storage(chunks), tp.size())


def _local_view(sh, region: tuple[slice, ...]) -> torch.Tensor:
    return sh.data[_local(region)]


def _start_export(chunks, plan: TransferPlan, bucket_bytes: int, mp) -> None:
    """One all-gather: every rank's plan fits its model, and the ranks run the same plan and buckets; else every
    rank raises the same error."""
    if _model_identity(chunks[0].provider) != plan._model:
        problem = "the transfer plan was built for another model or layout: build it from this model"
    elif _storage(chunks) != plan._storage:
        problem = ("the transfer plan was built for other parameters (another model, or this one's parameters "
                   "were reallocated since: moved, offloaded, wrapped): build it again")
    else:
        problem = None
    selection = hashlib.sha256("\n".join(t.name for t in plan.tensors).encode()).hexdigest()[:16]
    values = [None] * mp.size()
    torch.distributed.all_gather_object(values, (problem, plan.fingerprint, selection, bucket_bytes), group=mp)
    refused = [(rank, v[0]) for rank, v in enumerate(values) if v[0] is not None]
    if refused:
        raise BadInput(f"rank {refused[0][0]}: {refused[0][1]}")
    if any(v != values[0] for v in values):
        raise BadInput("the ranks disagree on the transfer plan (model, layout, export policy, selected tensors, "
                       "bucket_bytes): " + "; ".join(f"rank {rank}: plan {v[1]}, selection {v[2]}, bucket_bytes "
                                                     f"{v[3]}" for rank, v in enumerate(values))[:400])


def _send(bucket: _Bucket, tp, pp, device) -> tuple[torch.Tensor, list]:
    """Start one bucket's transfer: the owning stage's TP ranks pack their pieces into their slots, each slot is
    broadcast down its pipeline group, then every stage all-gathers the slots of its TP group — 1/TP of the bucket
    crosses stages per pipeline group, and no rank sends zeros. Returns the buffer and the pending work."""
    full = torch.empty(tp.size() * bucket.slot, dtype=torch.uint8, device=device)
    slot = full[tp.rank() * bucket.slot:(tp.rank() + 1) * bucket.slot]
    if pp.rank() == bucket.stage:
        for ep, offsets in zip(bucket.entries, bucket.offsets):
            for index, data in ep.sends.items():
                _piece_view(full, offsets[index], ep.pieces[index]).copy_(data)
    work = []
    if pp.size() > 1:
        work.append(torch.distributed.broadcast(slot, torch.distributed.get_global_rank(pp, bucket.stage),
                                                group=pp, async_op=True))
    if tp.size() > 1:
        for w in work:  # on NCCL: the gather's stream waits for the broadcast, the host does not
            w.wait()
        work = [_all_gather(full, slot, tp)]
    return full, work


def _all_gather(full: torch.Tensor, slot: torch.Tensor, group):
    if torch.distributed.get_backend(group) == "nccl":  # in place, no staging copy
        return torch.distributed.all_gather_into_tensor(full, slot, group=group, async_op=True)
    return torch.distributed.all_gather(list(full.chunk(group.size())), slot, group=group, async_op=True)


def _piece_view(full: torch.Tensor, offset: int, piece: _Piece) -> torch.Tensor:
    return full[offset:offset + piece.nbytes].view(piece.dtype).view(piece.shape)


def _received(bucket: _Bucket, full: torch.Tensor, plan: TransferPlan, drift: torch.Tensor,
              device) -> list[tuple[str, torch.Tensor]]:
    """A gathered bucket's HF tensors (the selected ones); `drift[i]` gets how far this rank's copies of the i-th
    copied entry differ from the main copy (0 when equal)."""
    out = []
    copied = 0
    for ep, offsets in zip(bucket.entries, bucket.offsets):
        views = [_piece_view(full, offset, p) for p, offset in zip(ep.pieces, offsets)]
        if ep.copied:
            for index, mine in ep.copies:
                if mine.numel():
                    drift[copied] = torch.maximum(drift[copied], (mine - views[index]).abs().amax().float())
            copied += 1
        pieces = {}
        for suffix, shape in ep.shapes.items():
            parts = [(p, v) for p, v in zip(ep.pieces, views) if p.suffix == suffix]
            if len(parts) == 1:  # the whole tensor (the plan checked the pieces cover it)
                pieces[suffix] = parts[0][1]
                continue
            pieces[suffix] = torch.empty(shape, dtype=parts[0][0].dtype, device=full.device)
            for p, v in parts:
                pieces[suffix][p.region] = v
        selected = {t.name for t in ep.outputs}
        for name, tensor in zip(ep.entry.hf, ep.entry.transform.to_hf_reporting(plan._ctx, pieces)[0]):
            out += [(n, t.to(device)) for n, t in plan._policy.tensors(name, tensor) if n in selected]
    return out


@torch.no_grad()
def export_hf_buckets(models, plan: TransferPlan, device: torch.device | str | None = None,
                      bucket_bytes: int | None = None,
                      divergence: dict | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`export_hf_weights` one bucket at a time: a list of (HF name, tensor) per bucket."""
    chunks = _unwrap_all(models)
    tp, pp, mp = _model_parallel_groups(chunks[0])
    if bucket_bytes is None:
        bucket_bytes = max(DEFAULT_BUCKET_BYTES, plan.min_bucket_bytes)
    _start_export(chunks, plan, bucket_bytes, mp)
    buckets = plan.buckets(bucket_bytes)
    compute = next(chunks[0].parameters()).device
    device = compute if device is None else device
    # The per-bucket check that nobody stopped carries the drift of the bucket processed before it: [stopped,
    # drift of each copied entry]. Every rank makes the same checks in the same order, a rank that stops makes one
    # more (with stopped = 1) in place of its next, and the others raise there.
    reported: list[tuple[_EntryPlan, ...] | torch.Tensor] = [(), torch.zeros(0, device=compute)]

    finished = False  # set once this rank has made its last check (or learnt that another rank stopped)

    def check(stopping: bool = False) -> None:
        nonlocal finished
        entries_, drift = reported
        flags = torch.cat([torch.full((1,), float(stopping), device=compute), drift])
        torch.distributed.all_reduce(flags, torch.distributed.ReduceOp.MAX, group=mp)
        values = flags.tolist()
        for ep, value in zip(entries_, values[1:]):
            if value != 0:
                warnings.warn(f"{ep.entry.hf[0]}: copies that should be identical differ (max |Δ| {value:.3e}); "
                              "the main copy was used", stacklevel=3)
                if divergence is not None:
                    divergence[ep.entry.hf[0]] = value
        reported[:] = [(), torch.zeros(0, device=compute)]
        if values[0] and not stopping:
            finished = True  # nothing more to tell the others
            raise BadInput("another rank stopped reading the export early: every rank of the model-parallel "
                           "group must iterate it to the end")

    def process(bucket: _Bucket, full: torch.Tensor, work: list) -> list[tuple[str, torch.Tensor]]:
        for w in work:
            w.wait()
        copied = tuple(ep for ep in bucket.entries if ep.copied)
        reported[:] = [copied, torch.zeros(len(copied), device=compute)]
        return _received(bucket, full, plan, reported[1], device)

    try:
        in_flight = None
        for bucket in buckets:
            check()
            full, work = _send(bucket, tp, pp, compute)  # the next bucket travels while this one is transformed
            if in_flight is not None:
                yield process(*in_flight)
            in_flight = (bucket, full, work)
        if in_flight is not None:
            yield process(*in_flight)
        check()
        finished = True
    finally:
        if not finished:  # abandoned (or failed) here: tell the others at their next check
            check(stopping=True)


def export_hf_weights(models, plan: TransferPlan, device: torch.device | str | None = None,
                      bucket_bytes: int | None = None,
                      divergence: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of `plan` (map order), on every rank of the model-parallel group, which
    must all iterate it to the end together; what export-hf writes for the same weights, bit for bit.

    models: the model (or chunk list) the plan was built from; device: where the tensors are yielded (default: the
    model's); bucket_bytes: the most bytes gathered in one bucket (default: 256 MiB, or the largest tensor's
    share if more); a bucket_bytes below what the largest tensor takes is refused. Each bucket is one broadcast
    from the stage holding it (PP > 1) and one all-gather within the TP group (TP > 1), started before the previous
    bucket is transformed and yielded, so a rank holds at most two gathered buckets and one bucket's HF tensors
    beyond its parameters. Yielded tensors do not share memory with the model. Copies that should be identical
    (replicated Mamba B/C groups, TP-replicated norms, tied embeddings across stages) are compared where they are
    held: a warning names a tensor whose copies differ, and `divergence` (when given) records HF name → max |Δ|.
    A rank that stops iterating early (or fails) makes the others raise at their next bucket instead of hanging.
    """
    buckets = export_hf_buckets(models, plan, device, bucket_bytes, divergence)
    try:
        for bucket in buckets:
            yield from bucket
    finally:
        buckets.close()  # an abandoned stream tells the other ranks now, not when it is garbage-collected


def hf_weights(model, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
               mup: MupExport = MupExport.UNFOLD, fmt: ExportFormat = ExportFormat.LATENT,
               divergence: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every HF tensor of a live model (any TP/PP, trained or not; one module or its chunk
    list), in HF layout and map order: `export_hf_weights` with a plan made for this call. A loop that exports
    repeatedly makes the plan once (`transfer_plan`).

    dtype: of every tensor (default: the model's); mup (µP-folded models): "unfold" or "keep-folded"; fmt (BitNet
    models): "latent", "packed" (transformers' bitnet format) or "dequantized".
    """
    yield from export_hf_weights(model, transfer_plan(model, dtype, mup, fmt), device, divergence=divergence)


def save_hf_pretrained(model, out: Path, dtype: torch.dtype | None = None, mup: MupExport = MupExport.UNFOLD,
                       fmt: ExportFormat = ExportFormat.LATENT, tokenizer_from: Path | None = None,
                       max_shard_bytes: int = EXPORT_MAX_SHARD_BYTES,
                       overwrite: bool = False) -> dict | None:
    """Write a live model as an HF checkpoint directory, as export-hf writes it (safetensors shards, config.json,
    generation_config.json, the tokenizer files of directory `tokenizer_from`, manifest; atomic). Every rank calls
    it; global rank 0 writes and returns the summary, the others return None. A refusal on rank 0 (OUT exists, no
    space) is raised on every rank."""
    t0 = time.perf_counter()
    plan = transfer_plan(model, dtype, mup, fmt)
    writes = torch.distributed.get_rank() == 0
    layout = [(t.name, t.shape, t.dtype) for t in plan.tensors]
    divergence: dict = {}
    with ExitStack() as stack:
        refusal = None
        if writes:
            try:
                tokenizer = existing_tokenizer_files(Path(tokenizer_from)) if tokenizer_from else []
                tmp = stack.enter_context(atomic_output_dir(
                    Path(out), overwrite, plan.nbytes,
                    {"name": "save_hf_pretrained", "options": {"mup": mup, "format": fmt, "dtype": str(dtype)}},
                    inputs=[Path(tokenizer_from)] if tokenizer_from else []))
            except BadInput as e:
                refusal = str(e)
        refusals = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(refusals, refusal)
        if refusals[0] is not None:
            raise BadInput(refusals[0])
        stream = export_hf_weights(model, plan, "cpu", divergence=divergence)
        try:
            if not writes:
                for _ in stream:
                    pass
                return None
            writer = ShardedSafetensorsWriter(tmp, layout, max_shard_bytes)
            for name, tensor in stream:
                writer.put(name, tensor)
            writer.close()
        finally:
            stream.close()  # a failure here must reach the other ranks now, not when the traceback is freed
        write_config(tmp, plan._policy.config_arch, plan._policy.dtype_of("model.embed_tokens.weight"),
                     plan._policy.config_extra)
        copy_tokenizer(tokenizer, tmp)
    return {"command": "save_hf_pretrained", "output": str(out), "files": writer.file_names, "tensors": len(layout),
            "diverged_copies": divergence, "seconds": round(time.perf_counter() - t0, 2)}
