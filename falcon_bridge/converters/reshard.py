"""reshard: Megatron torch_dist → Megatron torch_dist at another TP/PP, offline on CPU, streaming.

Tensors are global and stored as HF has them, so a checkpoint we wrote loads at any TP/PP without resharding;
reshard records another default TP/PP and rewrites older checkpoints that stored a TP's padded vocabulary and
replicated Mamba groups (ours before, Megatron-LM's padding) as HF's: each map entry goes Megatron(old) → HF
tensors → Megatron(HF-shaped).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from falcon_bridge.converters.megatron_sink import MegatronSink
from falcon_bridge.converters.megatron_source import open_megatron_checkpoint
from falcon_bridge.converters.run import QUIET, Run, Summary, unrecorded
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
    architecture, for checkpoints without our run config."""

    source: Path
    out: Path = unrecorded()
    layout: MegatronLayout = MegatronLayout()
    card: str | None = None
    hf_config: Path | None = None
    overwrite: bool = unrecorded(default=False)


@dataclass(frozen=True)
class ReshardSummary(Summary):
    command: ClassVar[str] = "reshard"
    source: str
    output: str
    tp: int
    pp: int
    pp_layers: list[int]
    mamba_groups: int
    diverged_group_replicas: dict[str, float]


def reshard(options: ReshardOptions, run: Run = QUIET) -> ReshardSummary:
    run = run.start()
    layout = options.layout
    source = open_megatron_checkpoint(options.source, options.card, options.hf_config)
    arch = source.arch.validate_for_megatron()
    layout.validate(arch)
    # each entry keeps the dtype it is stored in
    sink = MegatronSink(Ctx(arch, stored_as_hf(arch)), source.entries(),
                        lambda e: source.reader.tensors[next(iter(e.megatron_keys(source.ctx)))][1])
    stored_dtype = sink.shapes["embedding.word_embeddings.weight"][1]
    with run.output(ReshardSummary.command, options, sink.total_bytes, source.start_file_hashes(),
                    source.inputs) as tmp:
        it_dir = tmp / mg.iteration_dir_name(0)
        sink.write(it_dir, lambda e: list(source.hf_tensors(e).values()), run.step, mg.common_state(0))
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
    return ReshardSummary(
        source=str(options.source), output=str(options.out), tp=layout.tp, pp=layout.pp,
        pp_layers=list(layout.stage_layers(arch.num_layers)), mamba_groups=arch.mamba_n_groups,
        diverged_group_replicas=source.divergence, seconds=run.seconds(), warnings=source.divergence_warnings())
