"""Running our Megatron Falcon-H1 model: process groups, checkpoint loading, a forward pass across TP×PP ranks.

`launch(fn, world_size, *args)` starts world_size processes (gloo on CPU, NCCL on GPU) that each call
`fn(rank, *args)`; rank 0's return value comes back through a file (read with weights_only=True).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

from falcon_bridge.core.config import FalconH1Arch, Multipliers
from falcon_bridge.core.parallel import MegatronLayout
from falcon_bridge.formats import megatron as mg
from falcon_bridge.megatron.provider import FalconH1ModelProvider


def provider_from_checkpoint(root: Path, params_dtype: torch.dtype | None = None, tp: int | None = None,
                             pp: int | None = None) -> tuple[FalconH1ModelProvider, Path]:
    """The provider recorded in a falcon-bridge checkpoint's run config (optionally at another TP/PP)."""
    it_dir = mg.find_iteration_dir(Path(root))
    rc = mg.read_run_config(it_dir)
    arch = FalconH1Arch.from_dict(rc["architecture"], str(it_dir / mg.RUN_CONFIG_FILE))
    lay = rc["layout"]
    tp, pp = lay["tp"] if tp is None else tp, lay["pp"] if pp is None else pp
    pp_layers = tuple(lay["pp_layers"]) if pp == lay["pp"] else None
    layout = MegatronLayout(tp=tp, pp=pp, pp_layers=pp_layers, vocab_divisible_by=lay["vocab_divisible_by"])
    dtype = params_dtype or getattr(torch, rc["dtype"])
    multipliers = Multipliers.from_hf(rc["mup"]["applied_multipliers"], str(it_dir / mg.RUN_CONFIG_FILE))
    return FalconH1ModelProvider(arch, layout.validate(arch), params_dtype=dtype, multipliers=multipliers,
                                 bitnet=rc.get("bitnet", False)), it_dir


def init_distributed(rank: int, world_size: int, tp: int, pp: int, cuda_graphs: bool = False) -> torch.device:
    """Process group + megatron model-parallel state; CPU support patches when no GPU is present. cuda_graphs: the
    RNG tracker holds graph-safe generators, which megatron-core's CUDA graph wrappers register with their graphs
    (Megatron-LM seeds it so when CUDA graphs are on)."""
    from falcon_bridge.megatron import cpu_support

    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    else:
        cpu_support.install()
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world_size)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    if on_gpu:
        model_parallel_cuda_manual_seed(1234, use_cudagraphable_rng=cuda_graphs, force_reset_rng=True)
        if cuda_graphs:
            # Autograd nodes made on the legacy default stream (DDP's grad-accumulator hooks, at wrap time) make a
            # later capture fail ("would make the legacy stream depend on a capturing blocking stream") unless
            # torch can override stale capture streams (pytorch#180090, which megatron uses when present): run
            # everything on a side stream from the start, as megatron's own per-layer graphs do.
            torch.cuda.set_stream(torch.cuda.Stream())
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def shutdown_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def load_model(provider: FalconH1ModelProvider, it_dir: Path, device: torch.device, parallel_output: bool = False):
    """Build this rank's stage and load the checkpoint into it through megatron's own dist_checkpointing, at any
    TP/PP (older checkpoints that stored replicated Mamba groups included)."""
    from megatron.core import dist_checkpointing

    from falcon_bridge.megatron.model import STORED_MAMBA_GROUPS

    # our checkpoints carry common.pt for megatron-core ≤ 0.18, which 0.19 reads with a deprecation notice per load
    logging.getLogger("megatron.core.dist_checkpointing.strategies.common").setLevel(logging.ERROR)

    model = provider.provide(parallel_output=parallel_output)
    stored_groups = mg.stored_mamba_groups(mg.TorchDistReader(it_dir), provider.arch)
    # a file storing replicated groups has copies this model never reads, which megatron's access check (made for
    # saving: every chunk exactly once) would call an error
    as_hf = stored_groups == provider.arch.mamba_n_groups
    wanted = model.sharded_state_dict(metadata={STORED_MAMBA_GROUPS: stored_groups})
    state = dist_checkpointing.load(wanted, str(it_dir), validate_access_integrity=as_hf)
    # load returns the checkpoint's common state (iteration, args, …) merged in: the model takes what it asked for
    model.load_state_dict({key: state[key] for key in wanted})
    return model.to(device).eval()


def wrap_for_training(model, lr: float = 1e-3):
    """Our model wrapped as Megatron-LM trains it: megatron-core's DDP (fp32 gradient buffers) with
    finalize_model_grads as the schedule's gradient finalizer, and get_megatron_optimizer's AdamW (weight decay
    0.1, betas 0.9/0.95, no clipping; bf16 weights get fp32 master copies). Returns (ddp, optimizer)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    bf16 = config.params_dtype == torch.bfloat16
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=0.1, clip_grad=0.0, adam_beta1=0.9, adam_beta2=0.95, bf16=bf16,
        params_dtype=config.params_dtype), [ddp])
    return ddp, optimizer


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


def next_token_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Per-token loss [b, s-1] of predicting each next token, as HF's labels=input_ids loss (one stage, TP
    vocab-parallel): the last position has no next token and is left out."""
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    return model(tokens, positions, None, labels=torch.roll(tokens, -1, dims=1))[:, :-1]


@torch.no_grad()
def pipeline_forward(model, tokens: torch.Tensor, hidden_size: int, dtype: torch.dtype):
    """One forward pass through all pipeline stages (send/recv of the hidden states between stages).

    Returns the full-vocabulary logits [b, s, V_padded] on the last stage, None elsewhere.
    """
    from megatron.core import parallel_state as ps

    device = tokens.device
    b, s = tokens.shape
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, hidden_size, dtype=dtype, device=device)
        torch.distributed.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    out = model(tokens, positions, None)  # causal attention needs no mask
    if not ps.is_pipeline_last_stage():
        torch.distributed.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def quiet() -> None:
    """Silence known-harmless noise in worker processes: torch's CUDA_HOME probe on CPU machines and the
    deprecation/tuning notices megatron-core and torch.distributed print on every rank."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # "use_mem_eff_path==False is not tested for training", once per layer: expected for evaluation without
    # causal-conv1d's CUDA extension
    logging.getLogger("megatron.core.ssm.mamba_mixer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch\.distributed)\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(megatron|torch\.distributed)\.")


def _entry(rank: int, world_size: int, port: int, result_file: str, fn, args) -> None:
    quiet()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    result = fn(rank, *args)
    if rank == 0:
        torch.save(result, result_file)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(fn, world_size: int, *args):
    """Run fn(rank, *args) in world_size fresh processes; return rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pt")
        mp.start_processes(_entry, args=(world_size, free_port(), result_file, fn, args), nprocs=world_size,
                           join=True, start_method="spawn")
        return torch.load(result_file, weights_only=True)


def record_scaled_outputs(modules: dict[str, tuple[torch.nn.Module, float]], captured: dict[str, torch.Tensor],
                          megatron: bool) -> list:
    """Forward hooks storing each module's output × its multiplier in captured[name] as [b, s, h] fp32 on CPU.
    megatron: outputs are (output, bias) pairs in [s, b, h] (the bias is added); else HF's [b, s, h] outputs,
    whose tuple extras (attention weights) are dropped."""
    def hook(name, multiplier):
        def record(module, inputs, output):
            if isinstance(output, tuple):
                out, extra = output[0], output[1] if len(output) > 1 else None
            else:
                out, extra = output, None
            if megatron:
                out = (out if extra is None else out + extra).transpose(0, 1)
            captured[name] = (out * multiplier).float().cpu()
        return record

    return [module.register_forward_hook(hook(name, multiplier)) for name, (module, multiplier) in modules.items()]


def capture_branches(model, captured: dict[str, torch.Tensor]) -> list:
    """Forward hooks recording what each block adds to the residual stream, as HF's module outputs × multipliers:
    `embedding`, `{layer}.mamba`, `{layer}.attention`, `{layer}.mlp`, `final_norm` ([b, s, h], fp32, CPU).
    With µP folded the model's multipliers are 1.0 and the folded weights carry them, so both compare alike."""
    c = model.config
    modules = {"embedding": (model.embedding, c.embedding_multiplier)} if model.pre_process else {}
    for layer in model.decoder.layers:
        i = layer.layer_number - 1
        modules |= {f"{i}.mamba": (layer.mamba_mixer, c.ssm_out_multiplier),
                    f"{i}.attention": (layer.self_attention, c.attention_out_multiplier),
                    f"{i}.mlp": (layer.mlp, c.mlp_multipliers[1])}
    if model.post_process:
        modules["final_norm"] = (model.decoder.final_norm, 1.0)
    return record_scaled_outputs(modules, captured, megatron=True)


def megatron_logits_worker(rank: int, roots: list[str], tp: int, pp: int, tokens: torch.Tensor,
                           dtype_name: str | None, capture: bool = False) -> list | None:
    """For each checkpoint in `roots` (sharing one TP×PP process group): the logits [b, s, vocab] of our Megatron
    model on `tokens`, returned on global rank 0 — or, with capture, a dict of every block's branch outputs
    (see capture_branches) plus `logits`.

    The last pipeline stage's TP rank 0 holds the logits; with PP it sends them to global rank 0, and captured
    branches of every stage are gathered there.
    """
    from megatron.core import parallel_state as ps

    dtype = getattr(torch, dtype_name) if dtype_name else None
    device = init_distributed(rank, tp * pp, tp, pp)
    results = []
    try:
        for root in roots:
            provider, it_dir = provider_from_checkpoint(Path(root), dtype, tp, pp)
            model = load_model(provider, it_dir, device)
            captured: dict[str, torch.Tensor] = {}
            handles = capture_branches(model, captured) if capture else []
            logits = pipeline_forward(model, tokens.to(device), provider.arch.hidden_size, provider.params_dtype)
            for h in handles:
                h.remove()
            if pp > 1:
                last_stage = ps.get_pipeline_model_parallel_last_rank()
                if rank == last_stage and ps.get_tensor_model_parallel_rank() == 0:
                    torch.distributed.send(logits.float().contiguous(), dst=0)
                elif rank == 0:
                    logits = torch.empty((*tokens.shape, provider.layout.padded_vocab(provider.arch)),
                                         dtype=torch.float32, device=device)
                    torch.distributed.recv(logits, src=last_stage)
                if capture:
                    stages = [None] * (tp * pp) if rank == 0 else None
                    torch.distributed.gather_object(captured if ps.get_tensor_model_parallel_rank() == 0 else None,
                                                    stages, dst=0)
                    if rank == 0:
                        captured = {k: v for stage in stages if stage for k, v in stage.items()}
            if rank == 0:
                logits = logits[..., :provider.arch.vocab_size].float().cpu()
                results.append({**captured, "logits": logits} if capture else logits)
            del model
        return results if rank == 0 else None
    finally:
        shutdown_distributed()
