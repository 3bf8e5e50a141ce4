"""Run megatron-core 0.19.2 models (MambaMixer included) on a CPU-only machine, in fp32, over gloo.

megatron-core assumes CUDA everywhere: it allocates on ``torch.cuda.current_device()``, forks a CUDA RNG
tracker, synchronizes CUDA before checkpoint writes, and its ``MambaMixer`` has no pure-torch SSM path (it
refuses to build without mamba_ssm, whose kernels are Triton/CUDA only). ``install()`` patches exactly those
gaps so that CI and the conversion tests can build and run real megatron modules without a GPU.

This module also holds pure-torch reference implementations of the three mamba_ssm entry points megatron
uses (chunked SSD scan, fused split-conv1d-scan, gated RMSNorm). They are written from the Mamba-2 math, in
fp32, and are what ``MambaMixer`` calls on CPU after ``install()``.

On a CUDA machine ``install()`` does nothing: GPU runs must use the real mamba_ssm kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.machinery
import math
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RMSNormGated",
    "install",
    "mamba_split_conv1d_scan_combined",
    "rms_norm_gated",
    "ssd_chunk_scan",
]

_MIXER_MODULE = "megatron.core.ssm.mamba_mixer"
_installed = False


# --------------------------------------------------------------------------------------------------------------
# Pure-torch Mamba-2 reference ops
# --------------------------------------------------------------------------------------------------------------


def rms_norm_gated(
    x: torch.Tensor,
    weight: torch.Tensor,
    z: torch.Tensor | None = None,
    eps: float = 1e-6,
    group_size: int | None = None,
    norm_before_gate: bool = True,
) -> torch.Tensor:
    """Grouped RMSNorm with an optional SiLU gate, computed in fp32 and returned in ``x``'s dtype.

    ``norm_before_gate=False`` gives ``rmsnorm(x * silu(z)) * weight`` (Mamba-2 / Falcon-H1);
    ``True`` gives ``rmsnorm(x) * weight * silu(z)``. The statistics are taken over consecutive groups of
    ``group_size`` channels (the whole last dimension when None), which is how Mamba-2 keeps the norm
    independent of how heads are split across tensor-parallel ranks.
    """
    hidden = x.shape[-1]
    group_size = hidden if group_size is None else group_size
    if hidden % group_size != 0:
        raise ValueError(f"hidden size {hidden} is not a multiple of group_size {group_size}")
    out = x.float()
    gate = None if z is None else F.silu(z.float())
    if gate is not None and not norm_before_gate:
        out = out * gate
    grouped = out.reshape(*out.shape[:-1], hidden // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.square().mean(dim=-1, keepdim=True) + eps)
    out = grouped.reshape(out.shape) * weight.float()
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


class RMSNormGated(nn.Module):
    """Drop-in for ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (same constructor, ``forward(x, z=None)``).

    megatron's ``ExtendedRMSNorm`` subclasses whatever this name resolves to, so the constructor signature
    and the single ``weight`` parameter (ones at init) must match mamba_ssm's.
    """

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity scale, as mamba_ssm initializes it."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Normalize ``x`` per group, gated by ``silu(z)`` before or after the norm."""
        return rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate)


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """``out[..., t, s] = sum(a[..., s+1 : t+1])`` for ``s <= t`` and ``-inf`` above the diagonal.

    Summing each segment directly (a masked cumulative sum) rather than subtracting two prefix sums keeps the
    short, numerically dominant segments exact even when the chunk's total log-decay is large.
    """
    length = a.shape[-1]
    lower_strict = torch.ones(length, length, dtype=torch.bool, device=a.device).tril(-1)
    terms = a.unsqueeze(-1).expand(*a.shape, length).masked_fill(~lower_strict, 0.0)
    sums = terms.cumsum(dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=a.device).tril()
    return sums.masked_fill(~lower, -math.inf)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 SSD scan with the signature and semantics of mamba_ssm's ``mamba_chunk_scan_combined``.

    Shapes: x ``[b, l, h, p]``, dt ``[b, l, h]``, A ``[h]``, B/C ``[b, l, g, n]`` (head ``i`` reads group
    ``i // (h / g)``), D ``[h]`` or ``[h, p]``, z ``[b, l, h, p]``, initial_states ``[b, h, p, n]``.
    It equals the sequential recurrence ``S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T``,
    ``y_t = S_t C_t + D x_t``, ``y_t *= silu(z_t)`` (when z is given). The chunked form (quadratic attention
    with segment-sum decay inside each chunk, state passing between chunks) keeps a few thousand tokens fast.
    Computed in fp32; y is returned in x's dtype and the final state ``[b, h, p, n]`` in fp32.
    """
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"{nheads} heads cannot be split evenly over {ngroups} groups")
    out_dtype = x.dtype

    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    per_group = nheads // ngroups
    xf = x.float()

    # Zero-padding the tail with dt = 0 adds neither input nor decay, so the final state is unaffected.
    nchunks = -(-seqlen // chunk_size)
    pad = nchunks * chunk_size - seqlen

    def chunked(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, nchunks, chunk_size, *t.shape[2:])

    # Heads are laid out as (group g, head-in-group k) so B and C are used per group, never copied per head.
    xc = chunked(xf).unflatten(3, (ngroups, per_group))  # [b, c, T, g, k, p]
    dtc = chunked(dt).unflatten(3, (ngroups, per_group))  # [b, c, T, g, k]
    Bc, Cc = chunked(B.float()), chunked(C.float())  # [b, c, T, g, n]
    log_decay = (dtc * A.float().view(ngroups, per_group)).permute(0, 1, 3, 4, 2)  # [b, c, g, k, T]
    segsum = _segment_sums(log_decay)  # [b, c, g, k, T, T]
    dtx = xc * dtc.unsqueeze(-1)

    # Inside each chunk: y_t += sum_{s<=t} (C_t . B_s) exp(sum a_{s+1..t}) dt_s x_s
    weights = segsum.exp() * torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc).unsqueeze(3)
    y = torch.einsum("bcgkts,bcsgkp->bctgkp", weights, dtx)

    # State each chunk adds by its end, then pass states from chunk to chunk.
    decay_to_end = segsum[..., -1, :].exp().permute(0, 1, 4, 2, 3).unsqueeze(-1)  # [b, c, T, g, k, 1]
    chunk_states = torch.einsum("bcsgkp,bcsgn->bcgkpn", dtx * decay_to_end, Bc)
    chunk_decay = log_decay.sum(dim=-1).exp()[..., None, None]  # [b, c, g, k, 1, 1]
    state_shape = (batch, ngroups, per_group, headdim, dstate)
    state = (
        torch.zeros(state_shape, dtype=torch.float32, device=x.device)
        if initial_states is None
        else initial_states.float().reshape(state_shape)
    )
    entering = []
    for c in range(nchunks):
        entering.append(state)
        state = state * chunk_decay[:, c] + chunk_states[:, c]

    # Contribution of the state that entered the chunk: y_t += exp(sum a_{0..t}) S_in C_t
    # [b, c, T, g, k, 1]
    decay_from_start = log_decay.cumsum(dim=-1).exp().permute(0, 1, 4, 2, 3).unsqueeze(-1)
    y = y + torch.einsum("bctgn,bcgkpn->bctgkp", Cc, torch.stack(entering, dim=1)) * decay_from_start
    y = y.reshape(batch, nchunks * chunk_size, nheads, headdim)[:, :seqlen]
    state = state.reshape(batch, nheads, headdim, dstate)

    if D is not None:
        y = y + xf * (D.float() if D.dim() == 2 else D.float()[:, None])
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)
    return (y, state) if return_final_states else y


def mamba_split_conv1d_scan_combined(
    zxbcdt: torch.Tensor,
    conv1d_weight: torch.Tensor,
    conv1d_bias: torch.Tensor | None,
    dt_bias: torch.Tensor,
    A: torch.Tensor,
    D: torch.Tensor,
    chunk_size: int,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    activation: str | None = "silu",
    rmsnorm_weight: torch.Tensor | None = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: torch.Tensor | None = None,
    outproj_bias: torch.Tensor | None = None,
    headdim: int | None = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch version of mamba_ssm's fused Mamba-2 block (megatron's default ``use_mamba_mem_eff_path``).

    zxbcdt ``[b, l, 2*d + 2*g*n + h]`` is split into z | xBC | dt; xBC goes through the depthwise causal
    conv1d (``conv1d_weight [d + 2*g*n, w]``) and the activation, then the SSD scan with ``dt_softplus``.
    Without ``rmsnorm_weight`` the output is gated by ``silu(z)`` inside the scan; with it, the gated RMSNorm
    (groups of ``d / ngroups`` channels) is applied instead, and ``outproj_weight`` optionally projects the
    result. Returns ``[b, l, d]`` (or the projection), plus the final SSM state if requested.
    """
    if seq_idx is not None:
        raise NotImplementedError("packed sequences (seq_idx) are not supported by the CPU Mamba scan")
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"unsupported activation {activation!r}; expected None, 'silu' or 'swish'")
    nheads = A.shape[0]
    if D.dim() == 2:
        headdim = D.shape[1]
    elif headdim is None:
        raise ValueError("headdim is required when D has one value per head")
    dim = nheads * headdim
    conv_dim, width = conv1d_weight.shape
    dstate = (conv_dim - dim) // (2 * ngroups)
    expected = 2 * dim + 2 * ngroups * dstate + nheads
    if zxbcdt.shape[-1] != expected:
        raise ValueError(
            f"zxbcdt has {zxbcdt.shape[-1]} channels but heads={nheads}, headdim={headdim}, "
            f"ngroups={ngroups}, d_state={dstate} need {expected}"
        )
    batch, seqlen, _ = zxbcdt.shape
    z, xbc, dt = zxbcdt.float().split([dim, conv_dim, nheads], dim=-1)

    # Depthwise causal conv: pad width-1 on both sides and keep the first seqlen outputs.
    bias = None if conv1d_bias is None else conv1d_bias.float()
    xbc = F.conv1d(
        xbc.transpose(1, 2), conv1d_weight.float().unsqueeze(1), bias, padding=width - 1, groups=conv_dim
    )[..., :seqlen].transpose(1, 2)
    if activation is not None:
        xbc = F.silu(xbc)
    x, B, C = xbc.split([dim, ngroups * dstate, ngroups * dstate], dim=-1)

    scan = ssd_chunk_scan(
        x.reshape(batch, seqlen, nheads, headdim),
        dt,
        A,
        B.reshape(batch, seqlen, ngroups, dstate),
        C.reshape(batch, seqlen, ngroups, dstate),
        chunk_size,
        D=D,
        z=None if rmsnorm_weight is not None else z.reshape(batch, seqlen, nheads, headdim),
        dt_bias=dt_bias,
        initial_states=initial_states,
        dt_softplus=True,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
    y, final_states = scan if return_final_states else (scan, None)
    y = y.reshape(batch, seqlen, dim)
    if rmsnorm_weight is not None:
        y = rms_norm_gated(y, rmsnorm_weight, z, rmsnorm_eps, dim // ngroups, norm_before_gate)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight.float(), None if outproj_bias is None else outproj_bias.float())
    y = y.to(zxbcdt.dtype)
    return (y, final_states) if return_final_states else y


# --------------------------------------------------------------------------------------------------------------
# install()
# --------------------------------------------------------------------------------------------------------------


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
    # run on CPU: let the mixer bind the pure-torch ops above instead (registered only during its import).
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
    """What megatron asks of torch.cuda.current_stream() on a CPU machine: waits with nothing to wait for."""

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
