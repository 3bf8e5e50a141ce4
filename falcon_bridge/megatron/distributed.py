"""Process groups and process launch for our Megatron Falcon-H1 model.

`launch(fn, world_size, *args)` starts world_size processes (gloo on CPU, NCCL on GPU) that each call
`fn(rank, *args)`; rank 0's return value comes back through a file (read with weights_only=True).
`init_distributed` / `shutdown_distributed` set up and tear down a rank's process group and megatron's
model-parallel state.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import warnings

import torch
import torch.multiprocessing as mp


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


def quiet() -> None:
    """Silence known-harmless noise in worker processes: torch's CUDA_HOME probe on CPU machines and the
    deprecation/tuning notices megatron-core and torch.distributed print on every rank."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # "use_mem_eff_path==False is not tested for training", once per layer: expected for evaluation without
    # causal-conv1d's CUDA extension
    logging.getLogger("megatron.core.ssm.mamba_mixer").setLevel(logging.ERROR)
    # "GPTModel IS DEPRECATED … use HybridModel", per build: our Llama is a GPTModel on purpose (HybridModel would
    # store attention and MLP as separate layers, not the checkpoint keys Llama's map and Megatron-LM use)
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
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
