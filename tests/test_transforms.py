"""Each transform on a hand-checkable example, and each pair as an exact inverse."""

import pytest
import torch

from falcon_bridge.core import transforms as T


def rows(*values):
    return torch.tensor(values, dtype=torch.float32).unsqueeze(1)  # one column: rows are easy to read


def test_qkv_interleave_orders_rows_per_query_group():
    # 4 query heads, 2 KV groups, head_dim 1: group g holds q heads 2g, 2g+1, then k_g, then v_g
    q, k, v = rows(0, 1, 2, 3), rows(10, 11), rows(20, 21)
    fused = T.qkv_interleave(q, k, v, num_groups=2, head_dim=1)
    assert fused.squeeze(1).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    q2, k2, v2 = T.qkv_split(fused, num_heads=4, num_groups=2, head_dim=1)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_qkv_roundtrip_with_head_dim_and_bias_shapes():
    q, k, v = torch.randn(6 * 4, 5), torch.randn(2 * 4, 5), torch.randn(2 * 4, 5)
    fused = T.qkv_interleave(q, k, v, num_groups=2, head_dim=4)
    assert fused.shape == (40, 5)
    assert torch.equal(fused[:12], q[:12]) and torch.equal(fused[12:16], k[:4]) and torch.equal(fused[16:20], v[:4])
    assert all(torch.equal(a, b) for a, b in zip(T.qkv_split(fused, 6, 2, 4), (q, k, v)))
    qb, kb, vb = torch.randn(24), torch.randn(8), torch.randn(8)  # biases are 1-D
    back = T.qkv_split(T.qkv_interleave(qb, kb, vb, 2, 4), 6, 2, 4)
    assert all(torch.equal(a, b) for a, b in zip(back, (qb, kb, vb)))


def test_gate_up_is_gate_then_up():
    gate, up = rows(1, 2), rows(3, 4)
    fused = T.gate_up_fuse(gate, up)
    assert fused.squeeze(1).tolist() == [1, 2, 3, 4]
    assert all(torch.equal(a, b) for a, b in zip(T.gate_up_split(fused), (gate, up)))


def test_split_and_join_rows():
    t = rows(*range(7))
    parts = T.split_rows(t, {"z": 2, "x": 2, "B": 1, "C": 1, "dt": 1})
    assert parts["B"].squeeze(1).tolist() == [4] and parts["dt"].squeeze(1).tolist() == [6]
    assert torch.equal(T.join_rows(parts, ("z", "x", "B", "C", "dt")), t)


def test_replicate_groups_repeats_each_group_in_place():
    bc = rows(1, 2, 3, 4)  # 2 groups of state size 2: [1, 2] and [3, 4]
    rep = T.replicate_groups(bc, n_groups=2, factor=2)
    assert rep.squeeze(1).tolist() == [1, 2, 1, 2, 3, 4, 3, 4]
    back, divergence = T.collapse_groups(rep, n_groups=2, factor=2)
    assert torch.equal(back, bc) and divergence == 0.0


def test_collapse_groups_averages_diverged_replicas_and_reports_it():
    rep = rows(1, 2, 3, 4)  # one group of size 2, replicated twice, the replicas drifted apart
    back, divergence = T.collapse_groups(rep, n_groups=1, factor=2)
    assert back.squeeze(1).tolist() == [2, 3] and divergence == 2.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_all_finite(dtype):
    t = torch.randn(4, 1000).to(dtype)
    assert T.all_finite(t) and T.all_finite(torch.arange(3)) and T.all_finite(t[:0])
    infinities = () if dtype == torch.float8_e4m3fn else (float("inf"), -float("inf"))  # e4m3fn saturates them
    for bad in (float("nan"), *infinities):
        for where in ((0, 0), (2, 517), (3, 999)):
            u = t.clone()
            u[where] = bad
            assert not T.all_finite(u), (bad, where)
    assert T.all_finite(torch.full((4,), torch.finfo(dtype).max, dtype=dtype))  # extreme but finite


def test_vocab_padding():
    assert T.padded_vocab_size(1001, tp=2, divisible_by=128) == 1024
    assert T.padded_vocab_size(32784, tp=1, divisible_by=16) == 32784
    w = torch.randn(3, 2)
    padded = T.pad_vocab(w, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[3:], torch.zeros(2, 2))
    assert torch.equal(T.unpad_vocab(padded, 3), w)
