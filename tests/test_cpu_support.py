"""CPU support: the pure-torch Mamba-2 ops against the plain recurrence, and megatron's MambaMixer on CPU.

The references here are written independently of falcon_bridge.megatron.reference_ops (per-token loops in
fp64), so a shared misunderstanding of the math cannot make both sides agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from falcon_bridge.megatron.cpu_support import install
from falcon_bridge.megatron.reference_ops import RMSNormGated, mamba_split_conv1d_scan_combined, ssd_chunk_scan

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only support; GPU runs use mamba_ssm")


def _recurrence(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    initial: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential SSM in fp64; dt is already discretized. Returns y [b,l,h,p] and the final state [b,h,p,n]."""
    b, seqlen, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    state = torch.zeros(b, h, p, n, dtype=torch.float64) if initial is None else initial.double().clone()
    ys = []
    for t in range(seqlen):
        for head in range(h):
            grp = head // (h // g)
            decay = torch.exp(dt[:, t, head] * A[head])[:, None, None]
            state[:, head] = state[:, head] * decay + dt[:, t, head, None, None] * torch.einsum(
                "bp,bn->bpn", x[:, t, head], B[:, t, grp]
            )
        y = torch.stack([state[:, hd] @ C[:, t, hd // (h // g), :, None] for hd in range(h)], dim=1)[..., 0]
        ys.append(y)
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x * (D.double() if D.dim() == 2 else D.double()[:, None])
    if z is not None:
        y = y * F.silu(z.double())
    return y, state


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize(
    ("seqlen", "chunk", "ngroups", "d_per_channel", "with_z", "with_init"),
    [
        (37, 8, 2, False, True, False),  # seqlen not a multiple of the chunk
        (32, 16, 1, True, False, True),  # exact multiple, D per channel, initial state
        (21, 64, 4, False, True, True),  # one partial chunk, one head per group
        (50, 1, 2, True, True, False),  # degenerate chunk of 1
    ],
)
def test_ssd_chunk_scan_matches_recurrence(
    seqlen: int, chunk: int, ngroups: int, d_per_channel: bool, with_z: bool, with_init: bool
) -> None:
    gen = torch.Generator().manual_seed(seqlen * 100 + chunk)
    b, h, p, n = 2, 4, 3, 5
    x = torch.randn(b, seqlen, h, p, generator=gen)
    dt_raw = torch.randn(b, seqlen, h, generator=gen)
    dt_bias = torch.randn(h, generator=gen)
    A = -torch.rand(h, generator=gen) * 8 - 0.5
    B = torch.randn(b, seqlen, ngroups, n, generator=gen)
    C = torch.randn(b, seqlen, ngroups, n, generator=gen)
    D = torch.randn(h, p, generator=gen) if d_per_channel else torch.randn(h, generator=gen)
    z = torch.randn(b, seqlen, h, p, generator=gen) if with_z else None
    init = torch.randn(b, h, p, n, generator=gen) if with_init else None

    y, final = ssd_chunk_scan(
        x, dt_raw, A, B, C, chunk, D=D, z=z, dt_bias=dt_bias, initial_states=init,
        dt_softplus=True, return_final_states=True,
    )  # fmt: skip
    y_ref, final_ref = _recurrence(x, F.softplus(dt_raw + dt_bias), A, B, C, D, z, init)

    assert y.dtype == torch.float32 and y.shape == x.shape
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(final, final_ref) < 1e-5


def test_ssd_chunk_scan_dt_limit_and_dtype() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 10, 2, 2, generator=gen).to(torch.bfloat16)
    dt = torch.randn(1, 10, 2, generator=gen) * 3
    A = -torch.ones(2)
    B, C = torch.randn(2, 1, 10, 1, 4, generator=gen)
    y = ssd_chunk_scan(x, dt, A, B, C, 4, dt_softplus=True, dt_limit=(0.05, 0.5))
    y_ref, _ = _recurrence(x.float(), F.softplus(dt).clamp(0.05, 0.5), A, B, C, None, None)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y.float(), y_ref) < 1e-2  # bf16 output rounding only


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_rmsnorm_matches_formula(norm_before_gate: bool, group_size: int | None) -> None:
    gen = torch.Generator().manual_seed(2)
    hidden = 12
    norm = RMSNormGated(hidden, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    assert torch.equal(norm.weight, torch.ones(hidden))
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    x = torch.randn(3, 5, hidden, generator=gen)
    z = torch.randn(3, 5, hidden, generator=gen)

    gs = group_size or hidden
    gate = z.double() * torch.sigmoid(z.double())
    xd = x.double() if norm_before_gate else x.double() * gate
    groups = xd.reshape(3, 5, hidden // gs, gs)
    normed = (groups / torch.sqrt(groups.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(3, 5, hidden)
    expected = normed * norm.weight.double() * (gate if norm_before_gate else 1.0)
    assert _rel_err(norm(x, z), expected) < 1e-6

    plain = x.double().reshape(3, 5, hidden // gs, gs)
    plain = (plain / torch.sqrt(plain.pow(2).mean(-1, keepdim=True) + 1e-5)).reshape(3, 5, hidden)
    assert _rel_err(norm(x), plain * norm.weight.double()) < 1e-6


def test_split_conv1d_scan_with_norm_and_outproj() -> None:
    """The fused path's optional rmsnorm and out projection, which megatron itself leaves unused."""
    gen = torch.Generator().manual_seed(3)
    b, seqlen, h, p, g, n, w, out_dim = 2, 13, 4, 2, 2, 3, 4, 5
    dim, conv_dim = h * p, h * p + 2 * g * n
    zxbcdt = torch.randn(b, seqlen, 2 * dim + 2 * g * n + h, generator=gen)
    conv_w, conv_b = torch.randn(conv_dim, w, generator=gen), torch.randn(conv_dim, generator=gen)
    dt_bias, A, D = (
        torch.randn(h, generator=gen),
        -torch.rand(h, generator=gen) - 0.1,
        torch.randn(h, generator=gen),
    )
    norm_w, proj_w, proj_b = (
        torch.rand(dim, generator=gen) + 0.5,
        torch.randn(out_dim, dim, generator=gen),
        torch.randn(out_dim, generator=gen),
    )
    y = mamba_split_conv1d_scan_combined(
        zxbcdt, conv_w, conv_b, dt_bias, A, D, chunk_size=4, rmsnorm_weight=norm_w, rmsnorm_eps=1e-6,
        outproj_weight=proj_w, outproj_bias=proj_b, headdim=p, ngroups=g, norm_before_gate=False,
    )  # fmt: skip

    z, xbc, dt = zxbcdt.double().split([dim, conv_dim, h], dim=-1)
    padded = F.pad(xbc, (0, 0, w - 1, 0))
    conv = torch.stack([(padded[:, t : t + w] * conv_w.double().T).sum(1) for t in range(seqlen)], 1)
    xbc = F.silu(conv + conv_b.double())
    x, B, C = xbc.split([dim, g * n, g * n], dim=-1)
    ys, _ = _recurrence(
        x.reshape(b, seqlen, h, p), F.softplus(dt + dt_bias.double()), A,
        B.reshape(b, seqlen, g, n), C.reshape(b, seqlen, g, n), D, None,
    )  # fmt: skip
    gated = (ys.reshape(b, seqlen, dim) * F.silu(z)).reshape(b, seqlen, g, dim // g)
    normed = (gated / torch.sqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape(b, seqlen, dim)
    expected = (normed * norm_w.double()) @ proj_w.double().T + proj_b.double()
    assert _rel_err(y, expected) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# megatron-core MambaMixer on CPU
# ----------------------------------------------------------------------------------------------------------------

HIDDEN, HEADS, HEAD_DIM, GROUPS, STATE, D_CONV, CHUNK = 16, 4, 4, 2, 8, 4, 8


def _mixer_config(mem_eff: bool):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        bias_dropout_fusion=False,
        mamba_num_heads=HEADS,
        mamba_head_dim=HEAD_DIM,
        mamba_num_groups=GROUPS,
        mamba_state_dim=STATE,
        use_mamba_mem_eff_path=mem_eff,
    )


def _build_mixer(mem_eff: bool, rmsnorm: bool, d_has_hdim: bool):
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return MambaMixer(
        _mixer_config(mem_eff),
        MambaMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
        d_model=HIDDEN,
        d_conv=D_CONV,
        D_has_hdim=d_has_hdim,
        rmsnorm=rmsnorm,
        chunk_size=CHUNK,
        layer_number=1,
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
    )


def _full_params(rmsnorm: bool, d_has_hdim: bool, seed: int) -> dict[str, torch.Tensor]:
    """Random full (TP=1) mixer parameters; D and the norm weight are randomized too so they matter."""
    gen = torch.Generator().manual_seed(seed)
    d_inner, conv_dim = HEADS * HEAD_DIM, HEADS * HEAD_DIM + 2 * GROUPS * STATE
    params = {
        "in_proj.weight": torch.randn(2 * d_inner + 2 * GROUPS * STATE + HEADS, HIDDEN, generator=gen) * 0.3,
        "conv1d_weight": torch.randn(conv_dim, 1, D_CONV, generator=gen) * 0.5,
        "conv1d_bias": torch.randn(conv_dim, generator=gen) * 0.1,
        "dt_bias": torch.randn(HEADS, generator=gen),
        "A_log": torch.rand(HEADS, generator=gen) * 2,
        "D": torch.randn(d_inner if d_has_hdim else HEADS, generator=gen),
        "out_proj.weight": torch.randn(HIDDEN, d_inner, generator=gen) * 0.3,
    }
    if rmsnorm:
        params["norm.weight"] = torch.rand(d_inner, generator=gen) + 0.5
    return params


def _shard(params: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    """Megatron's TP layout: z|x|B|C|dt and x|B|C are split block by block; out_proj by input columns."""
    d_inner, gs = HEADS * HEAD_DIM, GROUPS * STATE

    def rows(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        return torch.cat([blk.chunk(tp)[rank] for blk in t.split(sizes)])

    out = {k: v.chunk(tp)[rank] for k, v in params.items() if k in ("dt_bias", "A_log", "D", "norm.weight")}
    out["in_proj.weight"] = rows(params["in_proj.weight"], [d_inner, d_inner, gs, gs, HEADS])
    out["conv1d_weight"] = rows(params["conv1d_weight"], [d_inner, gs, gs])
    out["conv1d_bias"] = rows(params["conv1d_bias"], [d_inner, gs, gs])
    out["out_proj.weight"] = params["out_proj.weight"].chunk(tp, dim=1)[rank]
    return out


def _reference_mixer(hidden: torch.Tensor, p: dict[str, torch.Tensor], rmsnorm: bool) -> torch.Tensor:
    """MambaMixer forward written token by token in fp64 from the full parameters: [s, b, d] -> [s, b, d]."""
    p = {k: v.double() for k, v in p.items()}
    seqlen, batch, _ = hidden.shape
    d_inner, gs = HEADS * HEAD_DIM, GROUPS * STATE
    proj = hidden.double() @ p["in_proj.weight"].T
    z, xbc, dt = proj.split([d_inner, d_inner + 2 * gs, HEADS], dim=-1)
    w = p["conv1d_weight"][:, 0]  # [channels, d_conv]; tap d_conv-1 multiplies the current token
    conv = torch.zeros_like(xbc)
    for t in range(seqlen):
        for k in range(D_CONV):
            src = t - (D_CONV - 1) + k
            if src >= 0:
                conv[t] += xbc[src] * w[:, k]
    xbc = F.silu(conv + p["conv1d_bias"])
    x, B, C = xbc.split([d_inner, gs, gs], dim=-1)
    dt = F.softplus(dt + p["dt_bias"])
    A = -torch.exp(p["A_log"])
    D = p["D"].reshape(HEADS, HEAD_DIM) if p["D"].numel() == d_inner else p["D"][:, None]
    state = torch.zeros(batch, HEADS, HEAD_DIM, STATE, dtype=torch.float64)
    y = torch.zeros(seqlen, batch, HEADS, HEAD_DIM, dtype=torch.float64)
    per_group = HEADS // GROUPS
    for t in range(seqlen):
        xt = x[t].reshape(batch, HEADS, HEAD_DIM)
        Bt, Ct = B[t].reshape(batch, GROUPS, STATE), C[t].reshape(batch, GROUPS, STATE)
        for h in range(HEADS):
            g = h // per_group
            decay = torch.exp(dt[t, :, h] * A[h])[:, None, None]
            inject = dt[t, :, h, None, None] * xt[:, h, :, None] * Bt[:, g, None, :]
            state[:, h] = decay * state[:, h] + inject
            y[t, :, h] = (state[:, h] * Ct[:, g, None, :]).sum(-1) + D[h] * xt[:, h]
    y = y.reshape(seqlen, batch, d_inner) * F.silu(z)
    if rmsnorm:
        grouped = y.reshape(seqlen, batch, GROUPS, d_inner // GROUPS)
        grouped = grouped / torch.sqrt(grouped.pow(2).mean(-1, keepdim=True) + 1e-5)
        y = grouped.reshape(seqlen, batch, d_inner) * p["norm.weight"]
    return y @ p["out_proj.weight"].T


def _load(mixer: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    live = dict(mixer.named_parameters())
    assert set(live) == set(params), sorted(set(live) ^ set(params))
    with torch.no_grad():
        for name, value in params.items():
            live[name].copy_(value)


@pytest.fixture
def world_of_one(tmp_path: Path):
    """A gloo world of size 1 with TP=PP=1, torn down afterwards so other tests can build their own."""
    from megatron.core import parallel_state

    assert install() is True
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_install_is_idempotent_and_hides_stand_ins() -> None:
    assert install() is True
    assert install() is True
    import megatron.core.ssm.mamba_mixer as mm

    assert mm.HAVE_MAMBA_SSM and mm.mamba_chunk_scan_combined is ssd_chunk_scan
    assert mm.causal_conv1d_fn is None  # the F.conv1d fallback
    # transformers resolves mamba_ssm at import; it must keep its own torch path, not ours.
    assert (
        "mamba_ssm" not in sys.modules
        or sys.modules["mamba_ssm"].__doc__ != "falcon_bridge CPU stand-in package"
    )


@pytest.mark.parametrize(
    ("mem_eff", "rmsnorm", "d_has_hdim"),
    [
        (True, True, False),
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, True, True),
    ],
)
def test_megatron_mamba_mixer_matches_recurrence(
    world_of_one, mem_eff: bool, rmsnorm: bool, d_has_hdim: bool
) -> None:
    mixer = _build_mixer(mem_eff, rmsnorm, d_has_hdim)
    params = _full_params(rmsnorm, d_has_hdim, seed=4)
    _load(mixer, params)
    hidden = torch.randn(19, 2, HIDDEN, generator=torch.Generator().manual_seed(5))  # 19: partial last chunk

    out, bias = mixer(hidden)
    assert bias is None and out.shape == hidden.shape and out.dtype == torch.float32
    assert _rel_err(out, _reference_mixer(hidden, params, rmsnorm)) < 1e-4

    out.square().sum().backward()  # the stand-ins are plain torch, so training works too
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mixer.parameters())


def _tp_worker(rank: int, world: int, init_file: str) -> None:
    from megatron.core import parallel_state

    install()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(world, 1)
    try:
        params = _full_params(rmsnorm=True, d_has_hdim=False, seed=6)
        hidden = torch.randn(11, 2, HIDDEN, generator=torch.Generator().manual_seed(7))
        expected = _reference_mixer(hidden, params, rmsnorm=True)
        for mem_eff in (True, False):
            mixer = _build_mixer(mem_eff, rmsnorm=True, d_has_hdim=False)
            _load(mixer, _shard(params, rank, world))
            out, _ = mixer(hidden)  # RowParallelLinear all-reduces over gloo
            err = _rel_err(out, expected)
            assert err < 1e-4, f"rank {rank}, mem_eff={mem_eff}: relative error {err}"
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_megatron_mamba_mixer_tensor_parallel_2(tmp_path: Path) -> None:
    """TP=2 over gloo: sharded parameters reproduce the full-model recurrence (both SSM code paths)."""
    mp.spawn(_tp_worker, args=(2, str(tmp_path / "pg")), nprocs=2)


def test_install_refuses_once_the_mixer_was_imported_without_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mixer binds its kernels at import time, so install() must refuse loudly rather than do nothing."""
    from falcon_bridge.megatron import cpu_support

    assert install() is True  # the mixer module is now imported
    monkeypatch.setattr(cpu_support, "_installed", False)
    with pytest.raises(RuntimeError, match="imported before"):
        install()
