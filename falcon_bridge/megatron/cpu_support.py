"""Run megatron-core 0.19.2 models (MambaMixer included) on a CPU-only machine, in fp32, over gloo.

megatron-core assumes CUDA everywhere: it allocates on ``torch.cuda.current_device()``, forks a CUDA RNG
tracker, synchronizes CUDA before checkpoint writes, and its ``MambaMixer`` has no pure-torch SSM path (it
refuses to build without mamba_ssm, whose kernels are Triton/CUDA only). ``install()`` patches exactly those
gaps so that CI and the conversion tests can build and run real megatron modules without a GPU.

The pure-torch reference implementations of the three mamba_ssm entry points megatron uses (chunked SSD scan,
fused split-conv1d-scan, gated RMSNorm) live in ``reference_ops``; this module registers them as mamba_ssm
stand-ins, so they are what ``MambaMixer`` calls on CPU after ``install()``.

On a CUDA machine ``install()`` does nothing: GPU runs must use the real mamba_ssm kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from falcon_bridge.megatron.reference_ops import RMSNormGated, mamba_split_conv1d_scan_combined, ssd_chunk_scan

__all__ = ["install"]

_MIXER_MODULE = "megatron.core.ssm.mamba_mixer"
_installed = False
_training_installed = False


def _stand_in_modules() -> dict[str, types.ModuleType | None]:
    """The module names megatron's mamba_mixer imports at load time, mapped to our pure-torch stand-ins.

    ``causal_conv1d`` maps to None so its import raises ImportError and megatron falls back to ``F.conv1d``
    (a half-installed causal_conv1d would otherwise be picked and fail in its CUDA extension).
    """
    modules: dict[str, types.ModuleType | None] = {}
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        package = types.ModuleType(name, "falcon_bridge CPU stand-in package")
        package.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        package.__path__ = []
        modules[name] = package
    ssd = types.ModuleType("mamba_ssm.ops.triton.ssd_combined", "falcon_bridge CPU stand-in (pure torch)")
    ssd.__spec__ = importlib.machinery.ModuleSpec(ssd.__name__, None)
    ssd.mamba_chunk_scan_combined = ssd_chunk_scan
    ssd.mamba_split_conv1d_scan_combined = mamba_split_conv1d_scan_combined
    norm = types.ModuleType("mamba_ssm.ops.triton.layernorm_gated", "falcon_bridge CPU stand-in (pure torch)")
    norm.__spec__ = importlib.machinery.ModuleSpec(norm.__name__, None)
    norm.RMSNorm = RMSNormGated
    modules[ssd.__name__] = ssd
    modules[norm.__name__] = norm
    modules["causal_conv1d"] = None
    return modules


@contextmanager
def _registered(modules: Mapping[str, types.ModuleType | None]) -> Iterator[None]:
    """Put ``modules`` into sys.modules for the duration of the block, then restore what was there.

    The stand-ins must not outlive megatron's import: transformers resolves ``mamba_ssm`` when its Falcon-H1
    modeling file is imported and would otherwise run *our* scan as HF's "kernel", so an HF-vs-Megatron
    parity check would compare this code with itself.
    """
    saved = {name: sys.modules[name] for name in modules if name in sys.modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name in modules:
            if name in saved:
                sys.modules[name] = saved[name]
            else:
                sys.modules.pop(name, None)


def _cpu_current_device() -> str:
    """Stands in for ``torch.cuda.current_device()``, which megatron passes as ``device=`` for allocations."""
    return "cpu"


def _no_synchronize(device: torch.device | str | int | None = None) -> None:
    """Stands in for ``torch.cuda.synchronize()``: CPU ops are synchronous."""


def _without_tensor_cuda(method):
    """`method` with Tensor.cuda() returning the tensor unchanged while it runs."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda t, *a, **k: t
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return wrapper


def install() -> bool:
    """Patch torch.cuda and megatron-core so megatron models run on CPU; return False (no-op) when CUDA exists.

    Call before ``megatron.core.ssm.mamba_mixer`` is first imported (this function imports it itself, with
    the pure-torch mamba_ssm stand-ins in place). Idempotent. Raises RuntimeError if the mixer module was
    already imported without the stand-ins, since its kernel bindings are fixed at import time.
    """
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    if _MIXER_MODULE in sys.modules:
        raise RuntimeError(
            f"{_MIXER_MODULE} was imported before falcon_bridge.megatron.cpu_support.install(); "
            "call install() first so MambaMixer binds the pure-torch Mamba ops"
        )

    # Imported before torch.cuda is patched, so nothing megatron runs at import time sees the stand-ins.
    from megatron.core.models.common.language_module import language_module
    from megatron.core.tensor_parallel.random import initialize_rng_tracker

    # megatron allocates parameters, RoPE buffers, the attention memory buffer and TP gather buffers on
    # torch.cuda.current_device(); without CUDA that raises "Torch not compiled with CUDA enabled".
    torch.cuda.current_device = _cpu_current_device
    # dist_checkpointing calls torch.cuda.synchronize() before writing a checkpoint; it raises without CUDA.
    torch.cuda.synchronize = _no_synchronize
    # megatron's DDP orders its gradient reduction after CUDA-graph replays by waiting on the current stream.
    torch.cuda.current_stream = _CpuStream

    # MambaMixer.__init__ (and the TP linears' init) run under get_cuda_rng_tracker().fork(), which raises
    # "cuda rng state model-parallel-rng is not added" unless model_parallel_cuda_manual_seed (CUDA-only)
    # ran. The inference tracker's fork() is a null context, so CPU init just uses torch's CPU generator.
    initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)

    # MambaMixer raises "MambaSSM is not installed" without mamba_ssm, and mamba_ssm's Triton kernels cannot
    # run on CPU: let the mixer bind reference_ops' pure-torch ops instead (registered only during its import).
    with _registered(_stand_in_modules()):
        importlib.import_module(_MIXER_MODULE)

    # With tied embeddings and PP > 1, LanguageModule copies the first stage's embedding to the last stage's
    # output layer through `weight.data.cuda()` + all_reduce; on CPU keep the tensor where it is.
    language_module.LanguageModule.setup_embeddings_and_output_layer = _without_tensor_cuda(
        language_module.LanguageModule.setup_embeddings_and_output_layer)

    # megatron's training schedules, optimizers and gradient clipping create small bookkeeping tensors (token
    # counts, loss scale, found-inf flag, norm) with device='cuda': give those modules a torch whose factories
    # put them on the CPU.
    for name in ("megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel.utils",
                 "megatron.core.optimizer.optimizer", "megatron.core.optimizer.clip_grads", "megatron.core.utils"):
        importlib.import_module(name).torch = _TorchWithCudaFactoriesOnCpu()

    _installed = True
    return True


class _CpuStream:
    """What megatron asks of torch.cuda.current_stream() and torch.cuda.Stream() on a CPU machine: waits with
    nothing to wait for."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass


class _TorchWithCudaFactoriesOnCpu:
    """`torch`, except that tensor factories asked for device='cuda' build the tensor on the CPU."""

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in ("tensor", "zeros", "ones", "empty", "full"):
            def on_cpu(*args, device=None, **kwargs):
                return attr(*args, device="cpu" if str(device).startswith("cuda") else device, **kwargs)
            return on_cpu
        return attr


def install_training() -> bool:
    """install(), and what Megatron-LM's training package (`megatron.training`, driven by `falcon-bridge train`)
    additionally assumes of CUDA; False (no-op) when CUDA exists. Idempotent."""
    global _training_installed
    if not install():
        return False
    if _training_installed:
        return True
    from megatron.training import arguments, initialize, training

    # pretrain() calls initialize_megatron(), which asserts torch.cuda.is_available() unless allow_no_cuda: the
    # flag exists for CPU-only use and pretrain() does not pass it.
    training.initialize_megatron = functools.partial(training.initialize_megatron, allow_no_cuda=True)
    # validate_args asks the GPU's architecture (CUDA_DEVICE_MAX_CONNECTIONS rules at TP > 1): on CPU answer as
    # for a GPU before Blackwell, whose rule (the variable set to 1) `train` follows anyway.
    arguments.get_device_arch_version = _pre_blackwell
    # _initialize_distributed creates megatron's model-parallel groups only `if torch.cuda.device_count() > 0` (and
    # then pins the process to its GPU): let it count the CPU as the one device, whose pinning is a no-op.
    initialize._initialize_distributed = _with_cpu_as_device(initialize._initialize_distributed)
    # set_jit_fusion_options warms megatron's fused bias-GeLU/bias-dropout kernels up on CUDA tensors; on CPU
    # there is no fuser to warm (and our model uses neither fusion).
    training.set_jit_fusion_options = _no_jit_fusion_warmup
    # get_model moves the built model to the GPU with Module.cuda(): on CPU it stays where it was built. It wraps
    # the model in DDP on a side stream, torch.cuda.Stream(), which needs a GPU: on CPU a stream that never waits.
    training.get_model = _without_tensor_cuda(training.get_model)
    torch.cuda.Stream = _CpuStream
    # The rerun state machine (before every step) and checkpoints save and restore the CUDA generator's state next
    # to the CPU generator's: without CUDA there is no such generator, so its state is empty.
    torch.cuda.get_rng_state, torch.cuda.set_rng_state = _no_cuda_rng_state, _set_no_cuda_rng_state
    # Activation recompute (--recompute-granularity) saves and restores the same states through megatron's own
    # getter and setter.
    from megatron.core.tensor_parallel import random

    random._get_cuda_rng_state, random._set_cuda_rng_state = _no_cuda_rng_state, _set_no_cuda_rng_state
    # Gradient clipping (--clip-grad, 1.0 by default) asserts every gradient is a torch.cuda.FloatTensor and scales
    # them with apex/TE's multi-tensor kernel: on CPU, the same scaling with torch.
    from megatron.core.optimizer import optimizer

    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm
    # The mixed-precision optimizers (bf16/fp16 models, and --use-distributed-optimizer) sort parameters into fp32
    # and fp16/bf16 groups by their CUDA type names and refuse any other: on CPU, CPU tensors answer with the CUDA
    # name of their dtype.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    for mixed_precision in (DistributedOptimizer, Float16OptimizerWithFloat16Params):
        mixed_precision.__init__ = _cpu_tensors_typed_as_cuda(mixed_precision.__init__)
    # The loop's own bookkeeping tensors (start time, loss sums, iteration counts all-reduced across ranks) are
    # created with device='cuda', as in install()'s schedule and optimizer modules.
    for name in ("megatron.training.training", "megatron.training.checkpointing", "megatron.core.rerun_state_machine",
                 "megatron.training.utils.common_utils"):
        importlib.import_module(name).torch = _TorchWithCudaFactoriesOnCpu()
    _training_installed = True
    return True


def _pre_blackwell() -> int:
    """Stands in for megatron.training's get_device_arch_version() on CPU (a compute capability major below 10)."""
    return 9


def _no_jit_fusion_warmup(tp_size=None) -> None:
    """Stands in for megatron.training's set_jit_fusion_options on CPU."""


def _no_cuda_rng_state(device="cuda", clone=False, graph_safe=False) -> torch.Tensor:
    """Stands in for torch.cuda.get_rng_state() on CPU: there is no CUDA generator, so its state is empty."""
    return torch.empty(0, dtype=torch.uint8)


def _set_no_cuda_rng_state(state: torch.Tensor, device="cuda", graph_safe=False) -> None:
    """Stands in for torch.cuda.set_rng_state() on CPU: restores the empty state _no_cuda_rng_state saved."""


def _clip_grad_by_total_norm(parameters, max_norm, total_norm, use_decoupled_grad=False) -> None:
    """Stands in for megatron's clip_grad_by_total_norm_fp32 on CPU: scale the gradients by max_norm / total_norm
    when that is below 1 (in place, as megatron does)."""
    coefficient = max_norm / (total_norm + 1.0e-6)
    if isinstance(coefficient, torch.Tensor):
        coefficient = coefficient.clamp_max(1.0)
    elif coefficient >= 1.0:
        return
    for param in parameters:
        grad = getattr(param, "decoupled_grad", None) if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(coefficient)


def _cpu_tensors_typed_as_cuda(function):
    """`function` with Tensor.type() (no arguments) naming a CPU tensor's type as its CUDA counterpart's, e.g.
    torch.FloatTensor → torch.cuda.FloatTensor, while it runs."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        type_of = torch.Tensor.type

        def cuda_name(tensor, *a, **k):
            name = type_of(tensor, *a, **k)
            return name.replace("torch.", "torch.cuda.", 1) if not a and not k and tensor.device.type == "cpu" \
                else name

        torch.Tensor.type = cuda_name
        try:
            return function(*args, **kwargs)
        finally:
            torch.Tensor.type = type_of

    return wrapper


def _with_cpu_as_device(function):
    """`function` with torch.cuda.device_count() = 1 and torch.cuda.set_device() a no-op while it runs."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        count, set_device = torch.cuda.device_count, torch.cuda.set_device
        torch.cuda.device_count, torch.cuda.set_device = (lambda: 1), (lambda device: None)
        try:
            return function(*args, **kwargs)
        finally:
            torch.cuda.device_count, torch.cuda.set_device = count, set_device

    return wrapper
