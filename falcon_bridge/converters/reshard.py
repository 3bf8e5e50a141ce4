"""reshard: Megatron torch_dist → Megatron torch_dist at another TP/PP, offline on CPU, streaming.

Tensors are global and stored as HF has them, so a checkpoint we wrote loads at any TP/PP without resharding;
reshard records another default TP/PP and rewrites older checkpoints that stored a TP's padded vocabulary and
replicated Mamba groups (ours before, Megatron-LM's padding) as HF's: each map entry goes Megatron(old) → HF
tensors → Megatron(HF-shaped).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

from falcon_bridge.converters.megatron_sink import MegatronSink
from falcon_bridge.converters.megatron_source import open_megatron_checkpoint
from falcon_bridge.converters.run import QUIET, ParallelSummary, Run, unrecorded
from falcon_bridge.converters.workers import Team, balanced_shares
from falcon_bridge.core.choices import MupMode
from falcon_bridge.core.config import Multipliers
from falcon_bridge.core.mapping import Ctx
from falcon_bridge.core.mup import run_config_entry
from falcon_bridge.core.parallel import MegatronLayout, stored_as_hf
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.hf import copy_tokenizer


@dataclass(frozen=True)
class ReshardOptions:
    """source: a Megatron checkpoint directory; out: the one to write, for `layout`. card / hf_config: the
    architecture, for checkpoints without our run config. workers: processes sharing the work (default: what the
    cores and memory allow; torchrun's ranks when started by torchrun)."""

    source: Path
    out: Path = unrecorded()
    layout: MegatronLayout = MegatronLayout()
    card: str | None = None
    hf_config: Path | None = None
    overwrite: bool = unrecorded(default=False)
    workers: int | None = None


@dataclass(frozen=True)
class ReshardSummary(ParallelSummary):
    command: ClassVar[str] = "reshard"
    source: str
    output: str
    tp: int
    pp: int
    pp_layers: list[int]
    mamba_groups: int | None  # the B/C groups stored (HF's); None: a family without Mamba
    diverged_group_replicas: dict[str, float]


def reshard(options: ReshardOptions, run: Run = QUIET) -> ReshardSummary | None:
    """The summary; None on a torchrun rank other than 0 (rank 0 reports)."""
    run = run.start()
    layout = options.layout
    source = open_megatron_checkpoint(options.source, options.card, options.hf_config)
    arch = source.arch.validate_for_megatron()
    layout.validate(arch)
    plan = source.entries()
    # each entry keeps the dtype it is stored in
    sink = MegatronSink(Ctx(arch, stored_as_hf(arch)), plan,
                        lambda e: source.reader.tensors[next(iter(e.megatron_keys(source.ctx)))][1])
    stored_dtype = sink.shapes["embedding.word_embeddings.weight"][1]
    sizes = sink.entry_bytes()
    team = Team(options.workers, sink.total_bytes, max(sizes))
    shares = balanced_shares(sizes, team.size)

    def share(rank: int, tmp: Path, step) -> dict:
        hashed = sink.write(tmp / mg.iteration_dir_name(0), lambda e: list(source.hf_tensors(e).values()), step,
                            mg.common_state(0), [plan[i] for i in shares[rank]], distributed=team.size > 1)
        return {"hashed": hashed, "divergence": source.divergence}  # the divergence of this rank's entries

    def finish(tmp: Path, sources, results: list[dict]) -> bool:
        for result in results:
            source.divergence.update(result["divergence"])
        it_dir = tmp / mg.iteration_dir_name(0)
        tokenizer = copy_tokenizer(source.tokenizer_files(), it_dir)
        previous = source.run_config or {}
        mup_record = previous.get("mup") or run_config_entry(arch, MupMode.PRESERVE)
        mg.write_run_config(it_dir, mg.run_config(
            arch, layout, stored_dtype,
            hf_dtype=previous.get("hf_dtype", str(stored_dtype).removeprefix("torch.")),
            hf_odd_dtypes=previous.get("hf_odd_dtypes", {}), tokenizer_files=tokenizer, mup=mup_record,
            source={"path": str(options.source), "resharded_from": previous.get("layout")},
            bitnet=source.bitnet))
        mg.write_tracker(tmp, 0)
        mg.write_interop_files(tmp, it_dir, arch, Multipliers.from_hf(mup_record["applied_multipliers"]),
                               stored_dtype, layout.tp, layout.pp)
        return True

    if not team.convert(run, ReshardSummary.command, replace(options, workers=team.size), sink.total_bytes,
                        source.start_file_hashes, source.inputs, len(plan), share, finish):
        return None
    return ReshardSummary(
        source=str(options.source), output=str(options.out), tp=layout.tp, pp=layout.pp,
        pp_layers=list(layout.stage_layers(arch.num_layers)), mamba_groups=stored_as_hf(arch).mamba_groups(arch),
        diverged_group_replicas=source.divergence, workers=team.size, peak_rss_bytes=team.peak_rss,
        seconds=run.seconds(), warnings=source.divergence_warnings())
