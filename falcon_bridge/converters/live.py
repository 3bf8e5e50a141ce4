"""The live bridge: HF weights straight into a running Megatron model (any family's), and a running model's weights
out as HF tensors, with no checkpoint on disk.

Both directions go through what the file path uses: the model's own `sharded_state_dict` (the checkpoint keys,
global shapes, offsets and replica ids its torch_dist checkpoints have) and the one map (`core.mapping`) with its
transforms; µP fold and the HF output formats come from `core.mup` and `core.hf_export`. So `model_from_hf` gives
the weights `import-hf` + `dist_checkpointing.load` give, and `hf_weights` the bytes `dist_checkpointing.save` +
`export-hf` give.

Every rank of the model-parallel group calls these functions (megatron's parallel state initialized, as in
training). `hf_weights` yields the same HF tensors on every rank, one map entry at a time: each global tensor is
assembled by a sum-all-reduce of the ranks' main-replica shards (other ranks add zeros), so a rank holds at most one
entry's global tensors beyond its own shards.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import fields, replace
from pathlib import Path

import torch

from falcon_bridge.converters.import_hf import check_tensors, folded_if, import_options
from falcon_bridge.converters.output import atomic_output_dir
from falcon_bridge.core.choices import EXPORT_MAX_SHARD_BYTES, ExportFormat, MupExport, MupMode
from falcon_bridge.core.hf_export import HFExport
from falcon_bridge.core.mapping import COPY, VOCAB, Ctx, entries
from falcon_bridge.core.parallel import stored_as_hf
from falcon_bridge.errors import BadInput
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
        raise BadInput("load_hf_weights takes the chunks one provider built (one or more)")
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
def _unwrap(model):
    """Our model (any family's) inside DDP / Float16Module wrappers."""
    from falcon_bridge.megatron.language_model import HFLanguageModel

    inner = model
    while not isinstance(inner, HFLanguageModel) and hasattr(inner, "module"):
        inner = inner.module
    if not isinstance(inner, HFLanguageModel) or not hasattr(inner, "provider"):
        raise BadInput(f"{type(model).__name__}: not a model built by falcon-bridge's provider")
    return inner


def _agree(group, what: str, value) -> None:
    """Every rank of `group` passes the same `value`, or every rank raises the same error (no rank hangs)."""
    values = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(values, value, group=group)
    if any(v != values[0] for v in values):
        raise BadInput(f"the ranks disagree on {what}: " + "; ".join(f"rank {i}: {v}" for i, v in enumerate(values)
                                                                   if v != values[0])[:400])


def hf_weights(model, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
               mup: MupExport = MupExport.UNFOLD, fmt: ExportFormat = ExportFormat.LATENT,
               divergence: dict | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every HF tensor of a live model (any TP/PP, trained or not), in HF layout and map
    order, on every rank of the model-parallel group, which must all iterate it to the end together.

    dtype: of every tensor (default: the model's); mup (µP-folded models): "unfold" or "keep-folded"; fmt (BitNet
    models): "latent", "packed" (transformers' bitnet format) or "dequantized". Copies that should be identical
    (replicated Mamba B/C groups, tied embeddings across stages) yield one copy; if they differ, a warning names the
    tensor and `divergence` (when given) records HF name → max |Δ|. A rank that stops iterating early makes the
    other ranks raise at their next tensor instead of hanging.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import is_main_replica
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess

    inner = _unwrap(model)
    provider = inner.provider
    arch = provider.arch
    group = ps.get_model_parallel_group()
    _agree(group, "the model (architecture, TP, PP, µP, BitNet, dtype)",
           json.dumps([arch.to_hf(), provider.layout.tp, provider.layout.pp, provider.mup_mode, provider.bitnet,
                       str(provider.params_dtype)]))
    policy = _export_policy(provider, dtype, mup, fmt)
    ctx = Ctx(arch, stored_as_hf(arch))
    sharded, _ = save_preprocess(inner.sharded_state_dict())
    local: dict = {}
    for sh in _sharded_tensors(sharded):
        local.setdefault(sh.key, []).append(sh)
    compute = next(inner.parameters()).device
    keep_going = torch.ones(1, device=compute)
    finished = False
    try:
        for entry in entries(arch):
            torch.distributed.all_reduce(keep_going, torch.distributed.ReduceOp.MIN, group=group)
            if keep_going.item() == 0:
                finished = True  # another rank stopped; nothing more to tell it
                raise BadInput("another rank stopped reading hf_weights early: every rank of the model-parallel "
                               "group must iterate it to the end")
            pieces, drift = {}, torch.zeros(1, device=compute)
            for key, shape in entry.megatron_keys(ctx).items():
                shards = local.get(key, [])
                full = torch.zeros(shape, dtype=provider.params_dtype, device=compute)
                for sh in shards:
                    if is_main_replica(sh.replica_id):
                        region = _region(sh)
                        full[region] = sh.data[_local(region)]
                torch.distributed.all_reduce(full, group=group)
                for sh in shards:  # every copy, main or not, against the assembled tensor
                    region = _region(sh)
                    mine = sh.data[_local(region)]
                    if mine.numel() and not torch.equal(mine, full[region]):  # fp32 copies only when they differ
                        drift = torch.maximum(drift, (mine.float() - full[region].float()).abs().max().reshape(1))
                pieces[key[len(entry.megatron):]] = full
            torch.distributed.all_reduce(drift, torch.distributed.ReduceOp.MAX, group=group)
            if drift.item() > 0:
                warnings.warn(f"{entry.hf[0]}: copies that should be identical differ (max |Δ| {drift.item():.3e}); "
                              "the first copy was used", stacklevel=2)
                if divergence is not None:
                    divergence[entry.hf[0]] = drift.item()
            for name, tensor in zip(entry.hf, entry.transform.to_hf_reporting(ctx, pieces)[0]):
                for item in policy.tensors(name, tensor):
                    yield item[0], item[1].to(device)
            del pieces
        torch.distributed.all_reduce(keep_going, torch.distributed.ReduceOp.MIN, group=group)
        finished = True
        if keep_going.item() == 0:
            raise BadInput("another rank stopped reading hf_weights early")
    finally:
        if not finished:  # abandoned (or failed) here: tell the others at their next step
            torch.distributed.all_reduce(torch.zeros(1, device=compute), torch.distributed.ReduceOp.MIN, group=group)


def save_hf_pretrained(model, out: Path, dtype: torch.dtype | None = None, mup: MupExport = MupExport.UNFOLD,
                       fmt: ExportFormat = ExportFormat.LATENT, tokenizer_from: Path | None = None,
                       max_shard_bytes: int = EXPORT_MAX_SHARD_BYTES,
                       overwrite: bool = False) -> dict | None:
    """Write a live model as an HF checkpoint directory, as export-hf writes it (safetensors shards, config.json,
    generation_config.json, the tokenizer files of directory `tokenizer_from`, manifest; atomic). Every rank calls
    it; global rank 0 writes and returns the summary, the others return None. A refusal on rank 0 (OUT exists, no
    space) is raised on every rank."""
    t0 = time.perf_counter()
    inner = _unwrap(model)
    provider, arch = inner.provider, inner.provider.arch
    writes = torch.distributed.get_rank() == 0
    policy = _export_policy(provider, dtype, mup, fmt)
    layout = [item for e in entries(arch) for name, shape in zip(e.hf, e.hf_shapes)
              for item in policy.layout(name, shape)]
    divergence: dict = {}
    with ExitStack() as stack:
        refusal = None
        if writes:
            try:
                tokenizer = existing_tokenizer_files(Path(tokenizer_from)) if tokenizer_from else []
                tmp = stack.enter_context(atomic_output_dir(
                    Path(out), overwrite, sum(math.prod(s) * d.itemsize for _, s, d in layout),
                    {"name": "save_hf_pretrained", "options": {"mup": mup, "format": fmt, "dtype": str(dtype)}},
                    inputs=[Path(tokenizer_from)] if tokenizer_from else []))
            except BadInput as e:
                refusal = str(e)
        refusals = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(refusals, refusal)
        if refusals[0] is not None:
            raise BadInput(refusals[0])
        stream = hf_weights(model, dtype, "cpu", mup, fmt, divergence)
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
        write_config(tmp, policy.config_arch, policy.dtype_of("model.embed_tokens.weight"), policy.config_extra)
        copy_tokenizer(tokenizer, tmp)
    return {"command": "save_hf_pretrained", "output": str(out), "files": writer.file_names, "tensors": len(layout),
            "diverged_copies": divergence, "seconds": round(time.perf_counter() - t0, 2)}
