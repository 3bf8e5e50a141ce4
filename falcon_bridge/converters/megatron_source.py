"""Reading side of export-hf and reshard: a Megatron checkpoint as a stream of HF tensors, one map entry at a time.

Accepts checkpoints written by falcon-bridge (architecture in our run config), and — given the architecture with
`--card` or `--hf-config` — by Megatron-Bridge's Falcon-H1 model or Megatron-LM (same megatron-core keys). The
stored layout (padded vocabulary, replicated Mamba groups) is read off the tensor shapes, so it never has to be
told.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from falcon_bridge.cards import load_card
from falcon_bridge.core.choices import MupMode
from falcon_bridge.core.config import Arch
from falcon_bridge.core.families import arch_from_hf
from falcon_bridge.core.mapping import (
    MEGATRON_LAYER_PREFIX,
    Ctx,
    Entry,
    entries,
    megatron_tensor_shapes,
    refuse_more_layers_than_stored,
)
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.core.transforms import all_finite
from falcon_bridge.errors import BadInput, shown
from falcon_bridge.formats import megatron as mg
from falcon_bridge.formats.hf import existing_tokenizer_files
from falcon_bridge.formats.manifest import BackgroundHashes
from falcon_bridge.formats.untrusted import read_json


@dataclass
class MegatronSource:
    root: Path
    it_dir: Path
    arch: Arch
    layout: MegatronLayout  # as stored: padded vocab and Mamba groups read from the checkpoint
    run_config: dict | None
    reader: mg.TorchDistReader
    arch_file: Path | None = None  # --hf-config, when the architecture came from there
    divergence: dict[str, float] = field(default_factory=dict)  # HF tensor → max |Δ| between its group replicas
    card_warnings: list[str] = field(default_factory=list)  # --card with unverified values

    @property
    def inputs(self) -> list[Path]:
        """What a conversion from this checkpoint reads: no output may overlap it."""
        return [self.root] + ([self.arch_file] if self.arch_file else [])

    @property
    def ctx(self) -> Ctx:
        return Ctx(self.arch, self.layout)

    def entries(self) -> list[Entry]:
        return entries(self.arch)

    def hf_tensors(self, entry: Entry, check_finite: bool = False) -> dict[str, torch.Tensor]:
        """The HF tensors of one map entry (B/C group replicas collapsed, vocabulary padding removed)."""
        keys = entry.megatron_keys(self.ctx)
        pieces = self.reader.get_many(list(keys))
        if check_finite:
            for key, t in pieces.items():
                if not all_finite(t):
                    raise BadInput(f"{self.it_dir}: tensor {key} holds NaN or Inf values")
        tensors, divergence = entry.transform.to_hf_reporting(
            self.ctx, {k[len(entry.megatron):]: v for k, v in pieces.items()})
        if divergence > 0:  # training updated the replicas separately: they were averaged; the caller reports it
            self.divergence[entry.hf[0]] = divergence
        return dict(zip(entry.hf, tensors))

    def divergence_warnings(self) -> list[str]:
        """One line per tensor whose replicated Mamba B/C groups had drifted apart (read so far)."""
        return [f"{name}: the replicated Mamba B/C groups diverged during training (max |Δ| {delta:.3e}); their "
                "average was written" for name, delta in self.divergence.items()]

    @property
    def bitnet(self) -> bool:
        return bool((self.run_config or {}).get("bitnet", False))

    @property
    def mup_mode(self) -> MupMode:
        return MupMode((self.run_config or {}).get("mup", {}).get("mode", MupMode.PRESERVE))

    def start_file_hashes(self) -> BackgroundHashes:
        """Start hashing every file of the checkpoint read (tracker and iteration folder) in the background."""
        beside = [mg.run_config_path(self.it_dir)] if mg.run_config_path(self.it_dir) else []
        beside += [f for f in self.tokenizer_files() if f.parent == self.root / mg.TOKENIZER_DIR]
        files = [self.root / mg.TRACKER_FILE] + sorted({*beside, *(p for p in self.it_dir.rglob("*")
                                                                   if p.is_file() and not p.is_symlink())})
        return BackgroundHashes(files)

    def tokenizer_files(self) -> list[Path]:
        # import-hf's sit in the iteration folder, Megatron-Bridge's under iter_N/tokenizer/, `train`'s in the save
        # directory's tokenizer/
        return next((files for d in (self.it_dir, self.it_dir / mg.TOKENIZER_DIR, self.root / mg.TOKENIZER_DIR)
                     if (files := existing_tokenizer_files(d))), [])

    def hf_dtype(self, name: str) -> torch.dtype:
        """The dtype the HF source had for this tensor (falcon-bridge checkpoints), else the embedding's stored
        dtype."""
        if self.run_config is None:
            return self.reader.tensors["embedding.word_embeddings.weight"][1]
        odd = self.run_config.get("hf_odd_dtypes", {})
        return getattr(torch, odd.get(name, self.run_config["hf_dtype"]))


def open_megatron_checkpoint(src: Path, card: str | None = None, hf_config: Path | None = None) -> MegatronSource:
    if card and hf_config:
        raise BadInput("--card and --hf-config are alternatives (each gives the whole architecture): pass one")
    root = Path(src)
    if not root.is_dir():
        raise BadInput(f"{root}: no such directory")
    if not (root / mg.TRACKER_FILE).exists() and (root / "config.json").is_file() and any(root.glob("*.safetensors")):
        raise BadInput(f"{root}: a Hugging Face checkpoint (config.json and safetensors), not a Megatron one; "
                       "`falcon-bridge import-hf` converts it to Megatron")
    it_dir = mg.find_iteration_dir(root)
    if any(it_dir.glob("mp_rank_*")):
        raise BadInput(f"{it_dir}: legacy per-rank checkpoint (mp_rank_* folders); convert it to torch_dist first "
                       "(Megatron-LM: --ckpt-convert-format torch_dist)")
    reader = mg.TorchDistReader(it_dir)
    run_config = mg.read_run_config(it_dir) if mg.run_config_path(it_dir) else None
    card_warnings = []
    if card:
        given = load_card(card)
        arch, layers_field, card_warnings = given.arch, f"card {card}: field num_layers", given.unverified_warning()
    elif hf_config:
        arch = arch_from_hf(read_json(Path(hf_config), "config.json"), str(hf_config))
        layers_field = f"{hf_config}: field num_hidden_layers"
    elif run_config is not None:
        arch = mg.arch_from_run_config(run_config, f"{mg.run_config_path(it_dir)}")
        layers_field = f"{mg.run_config_path(it_dir)}: field architecture.num_layers"
    elif (it_dir / mg.BRIDGE_RUN_CONFIG_FILE).exists():  # Megatron-Bridge: its provider's config
        arch = mg.arch_from_bridge_run_config(it_dir)
        layers_field = f"{it_dir / mg.BRIDGE_RUN_CONFIG_FILE}: field model.num_layers"
    else:  # Megatron-LM's args hold no Falcon-H1 multipliers (it has no Falcon-H1 model): they must come from us
        raise BadInput(f"{it_dir}: no {mg.RUN_CONFIG_FILE} or Megatron-Bridge {mg.BRIDGE_RUN_CONFIG_FILE}; pass "
                       "the architecture with --card NAME or --hf-config config.json")
    refuse_more_layers_than_stored(arch, reader.tensors, MEGATRON_LAYER_PREFIX, layers_field)
    layout = _stored_layout(arch, reader, it_dir)
    _check_keys(arch, layout, reader, it_dir)
    return MegatronSource(root, it_dir, arch, layout, run_config, reader, Path(hf_config) if hf_config else None,
                          card_warnings=card_warnings)


def _stored_layout(arch: Arch, reader: mg.TorchDistReader, it_dir: Path) -> MegatronLayout:
    embed = reader.tensors.get("embedding.word_embeddings.weight")
    if embed is None or embed[0][0] < arch.vocab_size:
        raise BadInput(f"{it_dir}: tensor shapes do not match the architecture: embedding.word_embeddings.weight "
                       f"has {embed[0][0] if embed else 'no'} rows, vocab_size is {arch.vocab_size}")
    return MegatronLayout(stored_padded_vocab=embed[0][0], stored_mamba_groups=mg.stored_mamba_groups(reader, arch))


def _check_keys(arch: Arch, layout: MegatronLayout, reader: mg.TorchDistReader, it_dir: Path) -> None:
    expected = megatron_tensor_shapes(arch, layout)
    for key, shape in expected.items():
        if key not in reader.tensors:
            raise BadInput(f"{it_dir}: tensor {key} is missing for this architecture")
        if reader.tensors[key][0] != shape:
            raise BadInput(f"{it_dir}: tensor {key} has shape {list(reader.tensors[key][0])}, the architecture "
                           f"implies {shown(list(shape))}")
    # Training state (optimizer, RNG) may sit beside the weights; anything else is a model we do not know.
    extra = sorted(k for k in set(reader.tensors) - set(expected) if not k.startswith(("optimizer.", "rng_state")))
    if extra:
        raise BadInput(f"{it_dir}: tensor {extra[0]} does not belong to this architecture"
                       + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
