"""Pure-torch reference implementations of the mamba_ssm entry points megatron-core calls.

The chunked SSD scan (``mamba_chunk_scan_combined``), the fused split-conv1d-scan
(``mamba_split_conv1d_scan_combined``) and the gated RMSNorm (``layernorm_gated.RMSNorm``), written from the
Mamba-2 math, in fp32. ``cpu_support.install()`` makes megatron's ``MambaMixer`` call them on a CPU-only machine.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RMSNormGated",
    "mamba_split_conv1d_scan_combined",
    "rms_norm_gated",
    "ssd_chunk_scan",
]


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
