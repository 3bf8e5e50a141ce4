"""A falcon-bridge Megatron checkpoint ↔ our model: the provider its run config records, loading it into this
rank's stage at any TP/PP, and saving a (trained) model back as a checkpoint export-hf reads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from falcon_bridge.core.config import Arch, Multipliers
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats import megatron as mg
from falcon_bridge.megatron.provider import ModelProvider, provider_class


def provider_from_checkpoint(root: Path, params_dtype: torch.dtype | None = None, tp: int | None = None,
                             pp: int | None = None) -> tuple[ModelProvider, Path]:
    """The provider recorded in a falcon-bridge checkpoint's run config (optionally at another TP/PP)."""
    it_dir = mg.find_iteration_dir(Path(root))
    rc = mg.read_run_config(it_dir)
    arch = mg.arch_from_run_config(rc, str(it_dir / mg.RUN_CONFIG_FILE))
    lay = rc["layout"]
    tp, pp = lay["tp"] if tp is None else tp, lay["pp"] if pp is None else pp
    pp_layers = tuple(lay["pp_layers"]) if pp == lay["pp"] else None
    layout = MegatronLayout(tp=tp, pp=pp, pp_layers=pp_layers, vocab_divisible_by=lay["vocab_divisible_by"])
    dtype = params_dtype or getattr(torch, rc["dtype"])
    multipliers = recorded_multipliers(rc, arch, str(it_dir / mg.RUN_CONFIG_FILE))
    return provider_class(arch)(arch, layout.validate(arch), params_dtype=dtype, multipliers=multipliers,
                                bitnet=rc.get("bitnet", False)), it_dir


def recorded_multipliers(run_config: dict, arch: Arch, source: str) -> Multipliers | None:
    """The µP multipliers a run config says the model applies; None for a family without µP (its run config
    records none)."""
    return Multipliers.from_hf(run_config["mup"]["applied_multipliers"], source) if arch.has_mup else None


def load_model(provider: ModelProvider, it_dir: Path, device: torch.device, parallel_output: bool = False):
    """Build this rank's stage and load the checkpoint into it through megatron's own dist_checkpointing, at any
    TP/PP (older checkpoints that stored replicated Mamba groups included)."""
    from megatron.core import dist_checkpointing

    # our checkpoints carry common.pt for megatron-core ≤ 0.18, which 0.19 reads with a deprecation notice per load
    logging.getLogger("megatron.core.dist_checkpointing.strategies.common").setLevel(logging.ERROR)

    model = provider.provide(parallel_output=parallel_output)
    metadata, as_hf = None, True
    if provider.arch.has_mamba:
        from falcon_bridge.megatron.model import STORED_MAMBA_GROUPS

        stored_groups = mg.stored_mamba_groups(mg.TorchDistReader(it_dir), provider.arch)
        # a file storing replicated groups has copies this model never reads, which megatron's access check (made
        # for saving: every chunk exactly once) would call an error
        as_hf = stored_groups == provider.arch.mamba_n_groups
        metadata = {STORED_MAMBA_GROUPS: stored_groups}
    wanted = model.sharded_state_dict(metadata=metadata)
    state = dist_checkpointing.load(wanted, str(it_dir), validate_access_integrity=as_hf)
    # load returns the checkpoint's common state (iteration, args, …) merged in: the model takes what it asked for
    model.load_state_dict({key: state[key] for key in wanted})
    return model.to(device).eval()


def save_checkpoint(model, root: Path, loaded_from: Path) -> None:
    """dist_checkpointing.save of this rank's (trained) model into root/iter_0000000, plus (rank 0) the run config
    of the checkpoint it was loaded from and the tracker: a checkpoint export-hf and load_model read. Every rank
    calls it."""
    from megatron.core import dist_checkpointing

    it_dir = Path(root) / mg.iteration_dir_name(0)
    it_dir.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(it_dir))
    if torch.distributed.get_rank() == 0:
        mg.write_run_config(it_dir, mg.read_run_config(Path(loaded_from)))
        mg.write_tracker(Path(root), 0)
