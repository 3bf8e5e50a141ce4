"""reshard: Megatron torch_dist → Megatron torch_dist at another TP/PP, offline on CPU, streaming.

Tensors are global and stored as HF has them, so a checkpoint we wrote loads at any TP/PP without resharding;
reshard records another default TP/PP and rewrites older checkpoints that stored a TP's padded vocabulary and
replicated Mamba groups (ours before, Megatron-LM's padding) as HF's: each map entry goes Megatron(old) → HF
tensors → Megatron(HF-shaped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from falcon_bridge.converters.megatron_sink import MegatronSink
from falcon_bridge.converters.megatron_source import open_megatron_checkpoint
from falcon_bridge.core.config import Multipliers
from falcon_bridge.core.mapping import Ctx
from falcon_bridge.core.mup import run_config_entry
from falcon_bridge.core.parallel import MegatronLayout, stored_as_hf
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.hf import copy_tokenizer
from falcon_bridge.converters.output import atomic_output_dir


def reshard(src: Path, out: Path, layout: MegatronLayout, card: str | None = None, hf_config: Path | None = None,
            overwrite: bool = False, progress: Callable[[int, int, str], None] | None = None,
            argv: list[str] | None = None) -> dict:
    t0 = time.perf_counter()
    source = open_megatron_checkpoint(src, card, hf_config)
    arch = source.arch.validate_for_megatron()
    layout.validate(arch)
    # each entry keeps the dtype it is stored in
    sink = MegatronSink(Ctx(arch, stored_as_hf(arch)), source.entries(),
                        lambda e: source.reader.tensors[next(iter(e.megatron_keys(source.ctx)))][1])
    stored_dtype = sink.shapes["embedding.word_embeddings.weight"][1]
    options = {"source": str(src), "tp": layout.tp, "pp": layout.pp, "pp_layers": layout.pp_layers, "card": card,
               "hf_config": str(hf_config) if hf_config else None}
    with atomic_output_dir(out, overwrite, sink.total_bytes, {"name": "reshard", "argv": argv, "options": options},
                           source.start_file_hashes(), source.inputs) as tmp:
        it_dir = tmp / mg.iteration_dir_name(0)
        sink.write(it_dir, lambda e: list(source.hf_tensors(e).values()), progress, mg.common_state(0))
        tokenizer = copy_tokenizer(source.tokenizer_files(), it_dir)
        previous = source.run_config or {}
        mg.write_run_config(it_dir, mg.run_config(
            arch, layout, stored_dtype,
            hf_dtype=previous.get("hf_dtype", str(stored_dtype).removeprefix("torch.")),
            hf_odd_dtypes=previous.get("hf_odd_dtypes", {}), tokenizer_files=tokenizer,
            mup=previous.get("mup") or run_config_entry(arch, "preserve"),
            source={"path": str(src), "resharded_from": previous.get("layout")},
            bitnet=source.bitnet))
        mg.write_tracker(tmp, 0)
        mup_record = previous.get("mup") or run_config_entry(arch, "preserve")
        mg.write_interop_files(tmp, it_dir, arch, Multipliers.from_hf(mup_record["applied_multipliers"]),
                               stored_dtype, layout.tp, layout.pp)
    return {"command": "reshard", "source": str(src), "output": str(out), "tp": layout.tp, "pp": layout.pp,
            "pp_layers": list(layout.stage_layers(arch.num_layers)), "mamba_groups": arch.mamba_n_groups,
            "diverged_group_replicas": source.divergence, "seconds": round(time.perf_counter() - t0, 2),
            "warnings": source.divergence_warnings()}
