"""How a Megatron model is laid out for a given TP/PP (vocab padding, Mamba group replication, PP stages), and how
its checkpoint stores the two things TP pads or replicates.

Checkpoint tensors are global and TP-independent: they hold HF's vocabulary rows and HF's B/C groups
(`stored_as_hf`), and the model's sharded_state_dict maps each rank's padded vocabulary shard and replicated groups
onto them. Checkpoints written before that stored their TP's padded vocabulary and replicated groups; the stored_*
fields describe such a file when it is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from falcon_bridge.core.config import Arch
from falcon_bridge.core.transforms import padded_vocab_size
from falcon_bridge.errors import BadInput

VOCAB_DIVISIBLE_BY = 128  # Megatron-LM's default --make-vocab-size-divisible-by


@dataclass(frozen=True)
class MegatronLayout:
    tp: int = 1
    pp: int = 1
    pp_layers: tuple[int, ...] | None = None  # layers per pipeline stage; None = even split
    # Virtual pipeline stages per pipeline rank (megatron's interleaved schedule): each stage's layers split evenly
    # into vpp model chunks, chunk vp_stage·pp + pp_rank holding the next run of layers (see `chunk`).
    vpp: int = 1
    vocab_divisible_by: int = VOCAB_DIVISIBLE_BY
    allow_group_replication: bool = True
    # What a checkpoint file stores (read off its shapes, or stored_as_hf); None = what this TP runs with.
    stored_padded_vocab: int | None = None
    stored_mamba_groups: int | None = None

    def padded_vocab(self, arch: Arch) -> int:
        if self.stored_padded_vocab is not None:
            return self.stored_padded_vocab
        return padded_vocab_size(arch.vocab_size, self.tp, self.vocab_divisible_by)

    def mamba_groups(self, arch: Arch) -> int | None:
        """B/C groups as stored in Megatron: the HF count, replicated up to a multiple of TP if needed (None: a
        family without Mamba)."""
        if not arch.has_mamba:
            return None
        if self.stored_mamba_groups is not None:
            return self.stored_mamba_groups
        return math.lcm(arch.mamba_n_groups, self.tp)

    def group_factor(self, arch: Arch) -> int:
        return self.mamba_groups(arch) // arch.mamba_n_groups if arch.has_mamba else 1

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.pp_layers is not None:
            return self.pp_layers
        return (num_layers // self.pp,) * self.pp

    def chunk(self, num_layers: int, pp_rank: int, vp_stage: int = 0) -> tuple[int, int]:
        """(layers, global index of the first) of the model chunk at (pp_rank, vp_stage). Megatron interleaves
        chunks: pipeline rank r runs chunks r, pp + r, 2·pp + r, …, so with vpp > 1 a rank's layers are not one run
        (megatron-core's get_transformer_layer_offset numbers them so)."""
        stages = self.stage_layers(num_layers)
        layers = [stages[r] // self.vpp for _ in range(self.vpp) for r in range(self.pp)]
        index = vp_stage * self.pp + pp_rank
        return layers[index], sum(layers[:index])

    def validate(self, arch: Arch) -> MegatronLayout:
        tp, pp = self.tp, self.pp
        if tp < 1 or pp < 1 or self.vpp < 1:
            raise BadInput(f"--tp/--pp and virtual pipeline stages must be ≥ 1, got tp={tp} pp={pp} vpp={self.vpp}")
        if self.vpp > 1 and pp == 1:
            raise BadInput(f"virtual pipeline stages (vpp={self.vpp}) need a pipeline (pp > 1), as megatron's "
                           "interleaved schedule does")
        heads = [("num_attention_heads", arch.num_heads)]
        if arch.has_mamba:
            heads.append(("mamba_n_heads", arch.mamba_n_heads))
        for what, n in heads:
            if n % tp:
                raise BadInput(f"--tp {tp} does not divide {what} ({n})")
        # megatron-core splits whole KV groups across ranks, or (TP > groups) gives each group to TP/groups ranks
        if arch.num_kv_heads % tp and tp % arch.num_kv_heads:
            raise BadInput(f"--tp {tp} and num_key_value_heads ({arch.num_kv_heads}): one must divide the other")
        if self.pp_layers is not None:
            if len(self.pp_layers) != pp or sum(self.pp_layers) != arch.num_layers or min(self.pp_layers) < 1:
                raise BadInput(f"--pp-layers {','.join(map(str, self.pp_layers))}: need {pp} positive counts "
                               f"summing to num_hidden_layers ({arch.num_layers})")
        elif arch.num_layers % pp:
            raise BadInput(f"--pp {pp} does not divide num_hidden_layers ({arch.num_layers}); "
                           "pass --pp-layers for an uneven split")
        if any(n % self.vpp for n in self.stage_layers(arch.num_layers)):
            raise BadInput(f"{self.vpp} virtual pipeline stages per rank: the layers of each pipeline stage "
                           f"({', '.join(map(str, self.stage_layers(arch.num_layers)))} of num_hidden_layers "
                           f"{arch.num_layers}) must split into {self.vpp} equal non-empty model chunks")
        groups = self.mamba_groups(arch)
        if arch.has_mamba and groups != arch.mamba_n_groups:
            if not self.allow_group_replication:
                raise BadInput(f"--tp {tp} exceeds mamba_n_groups ({arch.mamba_n_groups}); megatron-core needs "
                               "n_groups % tp == 0")
            if arch.mamba_n_heads % groups:
                raise BadInput(f"--tp {tp}: replicating mamba_n_groups {arch.mamba_n_groups}→{groups} needs "
                               f"mamba_n_heads ({arch.mamba_n_heads}) divisible by {groups}")
            if arch.mamba_rms_norm and tp % arch.mamba_n_groups:
                # each gated-norm group must span whole ranks for the cross-rank norm statistic
                raise BadInput(f"--tp {tp}: the gated Mamba norm (mamba_rms_norm) needs mamba_n_groups "
                               f"({arch.mamba_n_groups}) to divide the TP size when TP exceeds it")
        return self


def stored_as_hf(arch: Arch) -> MegatronLayout:
    """What every checkpoint we write stores, whatever TP it is for: HF's vocabulary rows and B/C groups."""
    return MegatronLayout(stored_padded_vocab=arch.vocab_size,
                          stored_mamba_groups=arch.mamba_n_groups if arch.has_mamba else None)
