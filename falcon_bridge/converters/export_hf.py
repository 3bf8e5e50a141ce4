"""export-hf: Megatron torch_dist (any TP/PP) → HF safetensors, one global tensor at a time, in one CPU process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from falcon_bridge.converters.megatron_source import open_megatron_checkpoint
from falcon_bridge.core.hf_export import HFExport
from falcon_bridge.formats.hf import ShardedSafetensorsWriter, copy_tokenizer, write_config
from falcon_bridge.converters.output import atomic_output_dir

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def export_hf(src: Path, out: Path, card: str | None = None, hf_config: Path | None = None,
              dtype: torch.dtype | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              check_finite: bool = True, overwrite: bool = False,
              progress: Callable[[int, int, str], None] | None = None, mup_export: str = "unfold",
              argv: list[str] | None = None, fmt: str = "latent") -> dict:
    """mup_export (checkpoints imported with --mup fold): "unfold" restores the original weights and multipliers;
    "keep-folded" writes the folded weights with the multipliers the folded model applies (1.0).
    fmt (BitNet checkpoints): "latent" the full-precision weights; "packed" transformers' bitnet format (uint8
    ternary + weight_scale per linear); "dequantized" ternary × scale in the checkpoint dtype."""
    t0 = time.perf_counter()
    source = open_megatron_checkpoint(src, card, hf_config)
    policy = HFExport(source.arch, source.mup_mode, source.bitnet, lambda name: dtype or source.hf_dtype(name),
                      mup_export, fmt)
    plan = source.entries()
    layout = [item for e in plan for name, shape in zip(e.hf, e.hf_shapes) for item in policy.layout(name, shape)]
    expected = sum(math.prod(s) * d.itemsize for _, s, d in layout)
    options = {"source": str(src), "card": card, "hf_config": str(hf_config) if hf_config else None,
               "dtype": str(dtype) if dtype else None, "max_shard_bytes": max_shard_bytes, "mup": mup_export}
    with atomic_output_dir(out, overwrite, expected, {"name": "export-hf", "argv": argv, "options": options},
                           source.start_file_hashes(), source.inputs) as tmp:
        writer = ShardedSafetensorsWriter(tmp, layout, max_shard_bytes)
        for i, entry in enumerate(plan):
            for name, tensor in source.hf_tensors(entry, check_finite).items():
                for item in policy.tensors(name, tensor):
                    writer.put(*item)
            if progress:
                progress(i + 1, len(plan), entry.megatron)
        writer.close()
        write_config(tmp, policy.config_arch, policy.dtype_of("model.embed_tokens.weight"), policy.config_extra)
        tokenizer = copy_tokenizer(source.tokenizer_files(), tmp)
    return {"command": "export-hf", "source": str(src), "output": str(out), "files": writer.file_names,
            "tensors": len(layout), "mup": "unfolded" if policy.unfolding else source.mup_mode, "format": fmt,
            "bytes": writer.total_bytes,
            "tokenizer_files": tokenizer,
            "mamba_groups_collapsed": source.layout.group_factor(source.arch) > 1,
            "diverged_group_replicas": source.divergence, "seconds": round(time.perf_counter() - t0, 2),
            "warnings": source.divergence_warnings()}
