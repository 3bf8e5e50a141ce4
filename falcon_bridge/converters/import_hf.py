"""import-hf: HF safetensors → (map + transform, one rule at a time) → Megatron torch_dist, streaming."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from falcon_bridge.converters.megatron_sink import MegatronSink
from falcon_bridge.converters.run import QUIET, ParallelSummary, Run, recorded_as, unrecorded
from falcon_bridge.converters.workers import Team, balanced_shares
from falcon_bridge.core import mup
from falcon_bridge.core.choices import IMPORT_CHECK_FINITE, MupMode, one_of
from falcon_bridge.core.config import Multipliers
from falcon_bridge.core.mapping import Ctx, Entry, entries, hf_tensor_shapes, is_bitnet_linear
from falcon_bridge.core.packed_ternary import DEFAULT_PACKED_FORMAT
from falcon_bridge.core.parallel import MegatronLayout, stored_as_hf
from falcon_bridge.core.transforms import all_finite
from falcon_bridge.errors import BadInput, shown
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.hf import HFCheckpoint, copy_tokenizer, resolve_source
from falcon_bridge.formats.manifest import BackgroundHashes


def check_tensors(ckpt: HFCheckpoint, allow_extra: bool = False) -> None:
    """Every expected tensor present with its exact shape and a floating-point dtype; nothing unexpected."""
    expected = hf_tensor_shapes(ckpt.arch)
    for name, shape in expected.items():
        info = ckpt.tensors.get(name)
        if info is None:
            raise BadInput(f"{ckpt.path}: tensor {name} is missing (expected shape {shown(list(shape))})")
        if info.shape != shape:
            raise BadInput(f"{info.file}: tensor {name} has shape {list(info.shape)}, config.json implies "
                           f"{shown(list(shape))}")
        if not info.dtype.is_floating_point:
            raise BadInput(f"{info.file}: tensor {name} has dtype {str(info.dtype).removeprefix('torch.')}, "
                           "expected a floating-point dtype")
    extra = sorted(set(ckpt.tensors) - set(expected))
    if extra and not allow_extra:
        raise BadInput(f"{ckpt.tensors[extra[0]].file}: unexpected tensor {extra[0]}"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                       + " for this config.json (pass --allow-extra to ignore)")


def import_options(ckpt: HFCheckpoint, mup_mode: str, bitnet: bool) -> tuple[bool, dict, list[str]]:
    """The checks every HF → Megatron route makes on its options (file or live): (BitNet, the run config's µP record,
    warnings). A packed ternary source implies BitNet."""
    arch = ckpt.arch
    if mup_mode not in tuple(MupMode):
        raise BadInput(f"--mup {mup_mode}: expected {one_of(MupMode)}")
    mup_record = mup.run_config_entry(arch, mup_mode)  # refuses folds that cannot be exact (tied embeddings)
    warnings = []
    bitnet = bitnet or ckpt.bitnet  # a BitNet source: packed, or latent weights the model quantizes (autobitlinear
    # online)
    if ckpt.packed:
        # the HF model keeps a linear left unpacked (modules_to_not_convert) in full precision; ours would ternarize it
        unpacked = next((n for n in hf_tensor_shapes(arch) if is_bitnet_linear(arch, n) and n not in ckpt.packed),
                        None)
        if unpacked is not None:
            raise BadInput(f"{ckpt.tensors[unpacked].file}: tensor {unpacked} is not packed, but the model "
                           "ternarizes it (only lm_head, embeddings and norms may stay unquantized)")
        warnings.append(f"{ckpt.path}: packed ternary checkpoint: imported as ternary × scale; the latent (pre-"
                        "quantization) weights are not in it, so continued training starts from those")
    if bitnet:
        if mup_mode == MupMode.FOLD:
            raise BadInput("--mup fold with --bitnet: folding the non-uniform ssm_multipliers before ternarizing "
                           "changes which weights round to 0 and ±1; use --mup preserve")
        for name, shape in hf_tensor_shapes(arch).items():
            problem = DEFAULT_PACKED_FORMAT.shape_problem(name, shape) if is_bitnet_linear(arch, name) else None
            if problem:
                raise BadInput(f"--bitnet: {problem}")
    return bitnet, mup_record, warnings


def folded_if(mup_mode: str, arch, name: str, t: torch.Tensor) -> torch.Tensor:
    """An HF tensor as the Megatron weights hold it: µP folded in fp64 (rounded once, when stored) or as it is."""
    return mup.fold(arch, name, t, torch.float64) if mup_mode == MupMode.FOLD else t


@dataclass(frozen=True)
class ImportOptions:
    """source: an HF checkpoint directory or Hub repo id; out: the Megatron checkpoint directory to write.
    dtype: of the stored weights (default: the source's). mup_mode: PRESERVE keeps the weights and lets the model
    apply the multipliers; FOLD multiplies each multiplier into its weights (one rounding to the storage dtype) and
    the model applies none. allow_extra: ignore tensors the architecture does not use (default: refuse them).
    check_finite: refuse NaN/Inf weights. bitnet: the Megatron model uses BitNet b1.58 linears (implied by a packed
    HF source). workers: processes sharing the work (default: what the cores and memory allow; torchrun's ranks
    when started by torchrun)."""

    source: str
    out: Path = unrecorded()
    layout: MegatronLayout = MegatronLayout()
    dtype: torch.dtype | None = None
    overwrite: bool = unrecorded(default=False)
    mup_mode: MupMode = recorded_as("mup", default=MupMode.PRESERVE)
    allow_extra: bool = False
    check_finite: bool = IMPORT_CHECK_FINITE
    bitnet: bool = False
    workers: int | None = None


@dataclass(frozen=True)
class ImportSummary(ParallelSummary):
    command: ClassVar[str] = "import-hf"
    source: str
    output: str
    tp: int
    pp: int
    dtype: str
    mup: str
    bitnet: bool
    tensors: int
    parameters: int
    mamba_groups: int | None  # the B/C groups stored (HF's); None: a family without Mamba


def import_hf(options: ImportOptions, run: Run = QUIET) -> ImportSummary | None:
    """The summary; None on a torchrun rank other than 0 (rank 0 reports)."""
    run = run.start()
    path = resolve_source(options.source)
    ckpt = HFCheckpoint(path)
    arch = ckpt.arch.validate_for_megatron()
    options.layout.validate(arch)
    bitnet, mup_record, warnings = import_options(ckpt, options.mup_mode, options.bitnet)
    check_tensors(ckpt, options.allow_extra)
    hf_dtype = ckpt.tensors["model.embed_tokens.weight"].dtype
    store_dtype = options.dtype or hf_dtype
    if options.mup_mode == MupMode.FOLD and store_dtype != torch.float32:
        warnings.append(f"--mup fold into {str(store_dtype).removeprefix('torch.')}: each folded weight is rounded "
                        f"once to it (relative error up to {torch.finfo(store_dtype).eps / 2:.1e}), so the model's "
                        "logits move slightly from the unfolded model's; verify judges the conversion against HF's "
                        "weights folded with the same rounding and reports the rounding's effect; --dtype fp32 keeps "
                        "the fold exact")
    plan = entries(arch)
    sink = MegatronSink(Ctx(arch, stored_as_hf(arch)), plan, lambda e: store_dtype)
    # The HF dtype of every tensor whose dtype differs from the embedding's, so export restores it exactly.
    odd_dtypes = {n: str(i.dtype).removeprefix("torch.") for n, i in ckpt.tensors.items() if i.dtype != hf_dtype}

    def hf_tensors(e: Entry) -> list[torch.Tensor]:
        hf = [ckpt.get(n) for n in e.hf]
        if options.check_finite:
            for n, t in zip(e.hf, hf):
                if not all_finite(t):
                    raise BadInput(f"{ckpt.tensors[n].file}: tensor {n} holds NaN or Inf values")
        return [folded_if(options.mup_mode, arch, n, t) for n, t in zip(e.hf, hf)]

    sizes = sink.entry_bytes()
    team = Team(options.workers, sink.total_bytes, max(sizes))
    shares = balanced_shares(sizes, team.size)

    def share(rank: int, tmp: Path, step) -> dict:
        return {"hashed": sink.write(tmp / mg.iteration_dir_name(0), hf_tensors, step, mg.common_state(0),
                                     [plan[i] for i in shares[rank]], distributed=team.size > 1)}

    def finish(tmp: Path, sources: BackgroundHashes, results: list) -> dict:
        it_dir = tmp / mg.iteration_dir_name(0)
        tokenizer = copy_tokenizer(ckpt.tokenizer_files(), it_dir)
        run_config = mg.run_config(
            arch, options.layout, store_dtype, hf_dtype=str(hf_dtype).removeprefix("torch."), hf_odd_dtypes=odd_dtypes,
            tokenizer_files=tokenizer, source={"path": str(options.source), "sha256": sources.result()}, mup=mup_record,
            bitnet=bitnet)
        mg.write_run_config(it_dir, run_config)
        mg.write_tracker(tmp, 0)
        mg.write_interop_files(tmp, it_dir, arch, Multipliers.from_hf(mup_record["applied_multipliers"]),
                               store_dtype, options.layout.tp, options.layout.pp)
        return run_config

    # the manifest records what was stored, and how many processes wrote it
    resolved = replace(options, dtype=store_dtype, bitnet=bitnet, workers=team.size)
    run_config = team.convert(run, ImportSummary.command, resolved, sink.total_bytes,
                              lambda: BackgroundHashes(ckpt.files()), [path], len(plan), share, finish)
    if run_config is None:
        return None
    return ImportSummary(
        source=str(options.source), output=str(options.out), tp=options.layout.tp, pp=options.layout.pp,
        dtype=run_config["dtype"], mup=str(options.mup_mode), bitnet=bitnet, tensors=len(sink.shapes),
        parameters=sum(math.prod(s) for s, _ in sink.shapes.values()),
        mamba_groups=stored_as_hf(arch).mamba_groups(arch), workers=team.size, peak_rss_bytes=team.peak_rss,
        seconds=run.seconds(), warnings=warnings)
