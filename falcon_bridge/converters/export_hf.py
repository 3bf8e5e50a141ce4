"""export-hf: Megatron torch_dist (any TP/PP) → HF safetensors, one global tensor at a time, in one CPU process."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from falcon_bridge.converters.megatron_source import open_megatron_checkpoint
from falcon_bridge.core import mup, ternary
from falcon_bridge.core.mapping import bitnet_scale_name, is_bitnet_linear
from falcon_bridge.errors import BadInput
from falcon_bridge.formats.hf import ShardedSafetensorsWriter, copy_tokenizer, write_config
from falcon_bridge.formats.output import atomic_output_dir

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
    if mup_export not in ("unfold", "keep-folded"):
        raise BadInput(f"--mup {mup_export}: expected unfold or keep-folded")
    if fmt not in ("latent", "packed", "dequantized"):
        raise BadInput(f"--format {fmt}: expected latent, packed or dequantized")
    source = open_megatron_checkpoint(src, card, hf_config)
    if fmt != "latent" and not source.bitnet:
        raise BadInput(f"--format {fmt}: {src} is not a BitNet checkpoint (import it with --bitnet)")
    arch, plan = source.arch, source.entries()
    unfolding = source.mup_mode == "fold" and mup_export == "unfold"
    config_arch = mup.folded_arch(arch) if source.mup_mode == "fold" and not unfolding else arch

    def dtype_of(name: str) -> torch.dtype:
        return dtype or source.hf_dtype(name)

    def written(name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        if fmt == "packed" and is_bitnet_linear(name):
            return [(name, (shape[0] // ternary.VALUES_PER_BYTE, *shape[1:]), torch.uint8),
                    (bitnet_scale_name(name), (1,), dtype_of(name))]
        return [(name, shape, dtype_of(name))]

    layout = [item for e in plan for name, shape in zip(e.hf, e.hf_shapes) for item in written(name, shape)]
    expected = sum(math.prod(s) * d.itemsize for _, s, d in layout)
    options = {"source": str(src), "card": card, "hf_config": str(hf_config) if hf_config else None,
               "dtype": str(dtype) if dtype else None, "max_shard_bytes": max_shard_bytes, "mup": mup_export}
    with atomic_output_dir(out, overwrite, expected, {"name": "export-hf", "argv": argv, "options": options},
                           source.start_file_hashes(), source.inputs) as tmp:
        writer = ShardedSafetensorsWriter(tmp, layout, max_shard_bytes)
        for i, entry in enumerate(plan):
            for name, tensor in source.hf_tensors(entry, check_finite).items():
                if unfolding:  # never with BitNet: import refuses --mup fold with --bitnet
                    writer.put(name, mup.unfold(arch, name, tensor, dtype_of(name)))  # one rounding
                elif fmt == "packed" and is_bitnet_linear(name):
                    packed, scale = ternary.pack_checkpoint_tensor(tensor.float())
                    writer.put(name, packed)
                    writer.put(bitnet_scale_name(name), scale.to(dtype_of(name)))
                elif fmt == "dequantized" and is_bitnet_linear(name):
                    writer.put(name, ternary.weight_fake_quant(tensor.float()).to(dtype_of(name)))
                else:
                    writer.put(name, tensor.to(dtype_of(name)))
            if progress:
                progress(i + 1, len(plan), entry.megatron)
        writer.close()
        quantization = {"quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                                "quantization_mode": "offline", "modules_to_not_convert": ["lm_head"]}}
        write_config(tmp, config_arch, dtype_of("model.embed_tokens.weight"), quantization if fmt == "packed" else None)
        tokenizer = copy_tokenizer(source.tokenizer_files(), tmp)
    return {"command": "export-hf", "source": str(src), "output": str(out), "files": writer.file_names,
            "tensors": len(layout), "mup": "unfolded" if unfolding else source.mup_mode, "format": fmt,
            "bytes": writer.total_bytes,
            "tokenizer_files": tokenizer,
            "mamba_groups_collapsed": source.layout.group_factor(arch) > 1,
            "diverged_group_replicas": source.divergence, "seconds": round(time.perf_counter() - t0, 2),
            "warnings": source.divergence_warnings()}
