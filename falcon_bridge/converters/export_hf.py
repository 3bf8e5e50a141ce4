"""export-hf: Megatron torch_dist (any TP/PP) → HF safetensors, one global tensor at a time, in one CPU process."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch

from falcon_bridge.converters.megatron_source import open_megatron_checkpoint
from falcon_bridge.converters.run import QUIET, ParallelSummary, Run, recorded_as, unrecorded
from falcon_bridge.converters.workers import Team, balanced_shares
from falcon_bridge.core.choices import EXPORT_CHECK_FINITE, EXPORT_MAX_SHARD_BYTES, ExportFormat, MupExport
from falcon_bridge.core.hf_export import HFExport
from falcon_bridge.formats.hf import ShardedSafetensorsWriter, check_max_shard_bytes, copy_tokenizer, write_config


@dataclass(frozen=True)
class ExportOptions:
    """source: a Megatron checkpoint directory (any TP/PP); out: the HF directory to write. card / hf_config: the
    architecture, for checkpoints without our run config. dtype: of every tensor (default: the HF source's).
    mup_export (checkpoints imported with --mup fold): UNFOLD restores the original weights and multipliers;
    KEEP_FOLDED writes the folded weights with the multipliers the folded model applies (1.0).
    fmt (BitNet checkpoints): LATENT the full-precision weights; PACKED transformers' bitnet format (uint8
    ternary + weight_scale per linear); DEQUANTIZED ternary × scale in the checkpoint dtype. workers: processes
    sharing the work (default: what the cores and memory allow; torchrun's ranks when started by torchrun)."""

    source: Path
    out: Path = unrecorded()
    card: str | None = None
    hf_config: Path | None = None
    dtype: torch.dtype | None = None
    max_shard_bytes: int = EXPORT_MAX_SHARD_BYTES
    check_finite: bool = EXPORT_CHECK_FINITE
    overwrite: bool = unrecorded(default=False)
    mup_export: MupExport = recorded_as("mup", default=MupExport.UNFOLD)
    fmt: ExportFormat = recorded_as("format", default=ExportFormat.LATENT)
    workers: int | None = None


@dataclass(frozen=True)
class ExportSummary(ParallelSummary):
    command: ClassVar[str] = "export-hf"
    source: str
    output: str
    files: list[str]
    tensors: int
    mup: str
    format: str
    bytes: int
    tokenizer_files: list[str]
    mamba_groups_collapsed: bool
    diverged_group_replicas: dict[str, float]


def export_hf(options: ExportOptions, run: Run = QUIET) -> ExportSummary | None:
    """The summary; None on a torchrun rank other than 0 (rank 0 reports)."""
    run = run.start()
    check_max_shard_bytes(options.max_shard_bytes)
    source = open_megatron_checkpoint(options.source, options.card, options.hf_config)
    policy = HFExport(source.arch, source.mup_mode, source.bitnet, lambda name: options.dtype or source.hf_dtype(name),
                      options.mup_export, options.fmt)
    plan = source.entries()
    written = [[item for name, shape in zip(e.hf, e.hf_shapes) for item in policy.layout(name, shape)] for e in plan]
    layout = [item for items in written for item in items]
    sizes = [sum(math.prod(s) * d.itemsize for _, s, d in items) for items in written]
    team = Team(options.workers, sum(sizes), max(sizes))
    shares = balanced_shares(sizes, team.size)

    def share(rank: int, tmp: Path, step) -> dict:
        mine = shares[rank]
        writer = ShardedSafetensorsWriter(tmp, layout, options.max_shard_bytes,
                                          names={name for i in mine for name, _, _ in written[i]}, leader=rank == 0,
                                          hash_as_written=True)
        for i in mine:
            for name, tensor in source.hf_tensors(plan[i], options.check_finite).items():
                for item in policy.tensors(name, tensor):
                    writer.put(*item)
            step(plan[i].megatron)
        writer.close()
        # the divergence of this rank's entries; the output files it wrote alone, in order, hashed as written
        return {"divergence": source.divergence, "files": writer.file_names, "hashed": writer.hashed}

    def finish(tmp: Path, sources, results: list[dict]) -> tuple[list[str], list[str]]:
        for result in results:
            source.divergence.update(result["divergence"])
        write_config(tmp, policy.config_arch, policy.dtype_of("model.embed_tokens.weight"), policy.config_extra)
        return results[0]["files"], copy_tokenizer(source.tokenizer_files(), tmp)

    done = team.convert(run, ExportSummary.command, replace(options, workers=team.size), sum(sizes),
                        source.start_file_hashes, source.inputs, len(plan), share, finish)
    if done is None:
        return None
    files, tokenizer = done
    return ExportSummary(
        source=str(options.source), output=str(options.out), files=files, tensors=len(layout),
        mup="unfolded" if policy.unfolding else source.mup_mode, format=str(options.fmt), bytes=sum(sizes),
        tokenizer_files=tokenizer, mamba_groups_collapsed=source.layout.group_factor(source.arch) > 1,
        diverged_group_replicas=source.divergence, workers=team.size, peak_rss_bytes=team.peak_rss,
        seconds=run.seconds(), warnings=source.card_warnings + source.divergence_warnings())
