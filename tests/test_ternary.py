"""Ternary (BitNet b1.58) quantizers and the HF packed format: hand-checked examples, invariances, round trips, and
byte/number equality with transformers' own pack_weights / unpack_weights / BitLinear (used here only as oracles)."""

import math

import pytest
import torch
import torch.nn.functional as F

from falcon_bridge.core import packed_ternary
from falcon_bridge.core import ternary as tq

bitnet = pytest.importorskip("transformers.integrations.bitnet")


@pytest.fixture
def eager():
    """transformers decorates unpack_weights and BitLinear's helpers with @torch.compile; run them eagerly (no C++
    compile on CPU, and the eager ops are the same math)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def random_ternary(*shape, seed=0, dtype=torch.int8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 3, shape, generator=g) - 1).to(dtype)


# ---- packed format: worked examples of the reference (§4.3) --------------------------------------------------------
def test_pack_single_column_byte_134():
    # rows [1, 0, -1, 1] → u = [2, 1, 0, 2] → 2 | 1<<2 | 0<<4 | 2<<6 = 0b10000110
    p = packed_ternary.pack_ternary(torch.tensor([[1], [0], [-1], [1]], dtype=torch.int8))
    assert p.dtype == torch.uint8 and p.shape == (1, 1)
    assert p.item() == 134 == 0b10000110
    assert packed_ternary.unpack_ternary(p).squeeze(1).tolist() == [1, 0, -1, 1]


def test_unpack_transformers_docstring_example():
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    t = packed_ternary.unpack_ternary(packed)
    assert t.dtype == torch.int8 and t.shape == (8, 2)
    assert t[:, 0].tolist() == [0, -1, -1, -1, 1, 0, 1, 1]
    # the full output printed in transformers' docstring
    assert t.tolist() == [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]]
    assert torch.equal(packed_ternary.pack_ternary(t), packed)


def test_planar_layout_packed_row_mixes_rows_r_plus_k_R4():
    # 8 rows → R4 = 2: packed row 0 holds rows 0, 2, 4, 6 (bits 0-1, 2-3, 4-5, 6-7), packed row 1 rows 1, 3, 5, 7
    t = torch.tensor([1, -1, 0, -1, -1, -1, 1, -1], dtype=torch.int8)
    p = packed_ternary.pack_ternary(t)
    assert p.tolist() == [2 | 1 << 2 | 0 << 4 | 2 << 6, 0 | 0 << 2 | 0 << 4 | 0 << 6]


# ---- packed format: round trips and transformers equality ------------------------------------------------------------
SHAPES = [(4, 3), (8, 1), (12, 7), (64, 16), (4,), (16,), (40,), (8, 3, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_roundtrip(shape):
    t = random_ternary(*shape, seed=sum(shape))
    p = packed_ternary.pack_ternary(t)
    assert p.dtype == torch.uint8 and p.shape == (shape[0] // 4, *shape[1:])
    assert torch.equal(packed_ternary.unpack_ternary(p), t)
    assert torch.equal(packed_ternary.unpack_ternary(p, rows=shape[0]), t)
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        u = packed_ternary.unpack_ternary(p, dtype=dtype)
        assert u.dtype == dtype and torch.equal(u, t.to(dtype))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32, torch.bfloat16])
def test_pack_does_not_mutate_input(dtype):
    t = random_ternary(16, 5, dtype=dtype)
    before = t.clone()
    packed_ternary.pack_ternary(t)
    assert torch.equal(t, before)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_bytes_equal_transformers_pack_weights(shape, dtype, eager):
    t = random_ternary(*shape, seed=7 + sum(shape), dtype=dtype)
    theirs = bitnet.pack_weights(t.clone())  # it adds 1 to its argument in place
    ours = packed_ternary.pack_ternary(t)
    assert theirs.dtype == ours.dtype == torch.uint8
    assert theirs.shape == ours.shape and torch.equal(theirs, ours)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 6, 7, 9, 10, 13])
def test_padded_rows_match_transformers_and_trim(rows, eager):
    t = random_ternary(rows, 3, seed=rows)
    with pytest.raises(ValueError, match=f"{rows} rows"):
        packed_ternary.pack_ternary(t)
    ours = packed_ternary.pack_ternary(t, allow_padding=True)
    assert ours.shape == (math.ceil(rows / 4), 3)
    assert torch.equal(ours, bitnet.pack_weights(t.clone()))
    assert torch.equal(packed_ternary.unpack_ternary(ours, rows=rows), t)
    full = packed_ternary.unpack_ternary(ours)
    assert full.shape[0] == 4 * math.ceil(rows / 4)
    assert (full[rows:] == -1).all()  # padding bits are 0 → -1, as the reference says


@pytest.mark.parametrize("shape", [(16, 8), (4,), (40,), (12, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_unpack_equals_transformers_unpack_weights(shape, dtype, eager):
    g = torch.Generator().manual_seed(3)
    # any byte whose 2-bit fields are all in {0, 1, 2}
    fields = torch.randint(0, 3, (4, shape[0] // 4, *shape[1:]), generator=g)
    p = (fields[0] | fields[1] << 2 | fields[2] << 4 | fields[3] << 6).to(torch.uint8)
    theirs = bitnet.unpack_weights(p, dtype=dtype)
    ours = packed_ternary.unpack_ternary(p, dtype=dtype)
    assert theirs.dtype == ours.dtype == dtype
    assert theirs.shape == ours.shape == shape and torch.equal(theirs, ours)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="values in"):
        packed_ternary.pack_ternary(torch.tensor([2, 0, 0, 0]))
    with pytest.raises(ValueError, match="values in"):
        packed_ternary.pack_ternary(torch.tensor([0.5, 0, 0, 0]))
    with pytest.raises(ValueError, match="uint8"):
        packed_ternary.unpack_ternary(torch.zeros(2, dtype=torch.int8))
    with pytest.raises(ValueError, match="rows"):
        packed_ternary.unpack_ternary(torch.zeros(2, dtype=torch.uint8), rows=9)


# ---- quantizers ----------------------------------------------------------------------------------------------------
def test_weight_quant_hand_example():
    w = torch.tensor([[0.5, -1.5], [0.1, 2.0]])
    s = tq.weight_scale(w)
    assert s.dim() == 0 and s.dtype == torch.float32
    assert s.item() == pytest.approx(1 / 1.025)  # mean|W| = 4.1 / 4 = 1.025, s = 0.97560…
    # W·s = [[0.488, -1.463], [0.098, 1.951]] → round → [[0, -1], [0, 2]] → clamp → [[0, -1], [0, 1]]
    t = tq.ternarize(w)
    assert t.dtype == torch.int8 and t.tolist() == [[0, -1], [0, 1]]
    assert torch.allclose(tq.weight_fake_quant(w), torch.tensor([[0.0, -1.025], [0.0, 1.025]]))


def test_weight_quant_rounds_half_to_even():
    # mean|W| = 1 exactly, so W·s = W: 0.5 → 0 and -0.5 → 0 (half-to-even); floor(x + 0.5) would give 1 and 0
    w = torch.tensor([0.5, -0.5, 1.5, -1.5])
    assert tq.ternarize(w).tolist() == [0, 0, 1, -1]


def test_weight_scale_bf16_mean_in_fp32_and_eps_clamp():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert tq.weight_scale(w).dtype == torch.float32
    assert tq.weight_scale(w).item() == pytest.approx(1 / w.float().abs().mean().item(), rel=1e-6)
    assert tq.weight_scale(torch.zeros(4, 4)).item() == pytest.approx(1e5)
    assert (tq.ternarize(torch.zeros(4, 4)) == 0).all()


@pytest.mark.parametrize("c", [1e-3, 0.37, 2.0, 1234.5])
def test_weight_quant_scale_invariance(c):
    w = torch.randn(32, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(tq.ternarize(c * w), tq.ternarize(w))
    assert tq.weight_scale(c * w).item() == pytest.approx(tq.weight_scale(w).item() / c, rel=1e-6)


def test_ternarize_with_given_scale_matches_full_tensor_scale():
    # a shard ternarized with the full tensor's scale gives exactly the rows of the full ternarization
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    s = tq.weight_scale(w)
    assert torch.equal(tq.ternarize(w[:8], s), tq.ternarize(w)[:8])
    assert torch.equal(tq.ternarize(w[:8], s.reshape(1)), tq.ternarize(w)[:8])  # a checkpoint-style [1] scale
    assert torch.equal(tq.weight_fake_quant(w[8:], float(s)), tq.weight_fake_quant(w)[8:])


def test_weight_fake_quant_dtype_and_matches_transformers_weight_quant(eager):
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(4))
    for dtype in (torch.float32, torch.bfloat16):
        ours = tq.weight_fake_quant(w.to(dtype))
        assert ours.dtype == dtype
        assert torch.equal(ours, bitnet.WeightQuant.apply(w.to(dtype)))


def test_activation_quant_hand_example():
    x = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0]])
    q = tq.activation_fake_quant(x)
    # row 0: s_a = 127; 127·x = [127, -63.5, 31.75, 0] → round half-even → [127, -64, 32, 0] → / 127
    assert torch.equal(q[0], torch.tensor([127.0, -64.0, 32.0, 0.0]) / 127)
    assert torch.equal(q[1], torch.zeros(4))  # all-zero token: absmax clamped to 1e-5, no NaN


def test_activation_quant_per_token_and_given_absmax():
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(5))
    q = tq.activation_fake_quant(x)
    for b in range(2):
        for t in range(3):
            assert torch.equal(q[b, t], tq.activation_fake_quant(x[b, t]))
    # an absmax reduced over the full hidden dim, given to each shard, reproduces the unsharded result
    absmax = x.abs().amax(-1, keepdim=True)
    halves = [tq.activation_fake_quant(h, absmax=absmax) for h in x.chunk(2, dim=-1)]
    assert torch.equal(torch.cat(halves, dim=-1), q)
    # the local absmax alone generally does not
    assert not torch.equal(torch.cat([tq.activation_fake_quant(h) for h in x.chunk(2, dim=-1)], dim=-1), q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quant_matches_transformers_act_quant(dtype, eager):
    x = (3 * torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(6))).to(dtype)
    ours = tq.activation_fake_quant(x)
    assert ours.dtype == dtype
    assert torch.equal(ours, bitnet.ActQuant.apply(x))


@pytest.mark.parametrize("c", [1e-2, 0.5, 3.0, 100.0])
def test_activation_quant_scale_equivariance(c):
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    # same integer codes up to fp rounding of x·s_a at a .5 tie, so compare values with a tolerance
    assert torch.allclose(tq.activation_fake_quant(c * x), c * tq.activation_fake_quant(x), rtol=1e-5, atol=1e-12)


def test_ste_forward_value_and_identity_gradient():
    w = torch.randn(8, 4, generator=torch.Generator().manual_seed(8), requires_grad=True)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(9), requires_grad=True)
    wq = tq.ste(w, tq.weight_fake_quant(w))
    xq = tq.ste(x, tq.activation_fake_quant(x))
    assert torch.allclose(wq, tq.weight_fake_quant(w)) and torch.allclose(xq, tq.activation_fake_quant(x))
    g = torch.randn(8, 4)
    (wq * g).sum().backward()
    assert torch.equal(w.grad, g)  # d(ste)/dw = identity
    y = F.linear(xq, wq)
    gy = torch.randn(3, 8)
    w.grad = None
    (y * gy).sum().backward()
    # gradient of linear(x', W') with the quantizers treated as identity
    assert torch.allclose(x.grad, gy @ tq.weight_fake_quant(w).detach(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(w.grad, gy.T @ tq.activation_fake_quant(x).detach(), rtol=1e-5, atol=1e-6)


# ---- HF "bitlinear" checkpoint tensors -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_tensor_convention_and_roundtrip(dtype):
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(10)).to(dtype)
    packed, scale = packed_ternary.pack_checkpoint_tensor(w)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 16)
    assert scale.dtype == dtype and scale.shape == (1,)
    # stored weight_scale = 1/mean|W| (onebitllms' s_w), not mean|W| (that is the autobitlinear convention)
    assert scale.float().item() == pytest.approx(1 / w.float().abs().mean().item(), rel=1e-2 if dtype != torch.float32
                                                 else 1e-6)
    assert torch.equal(packed_ternary.unpack_ternary(packed), tq.ternarize(w))
    deq = packed_ternary.unpack_checkpoint_tensor(packed, scale, out_features=24, dtype=dtype)
    assert deq.dtype == dtype and deq.shape == w.shape
    ref = tq.weight_fake_quant(w)
    if dtype == torch.float32:
        assert torch.allclose(deq, ref, rtol=1e-6, atol=0)
    else:  # the stored scale is itself rounded to bf16: within a couple of bf16 ulps
        assert torch.allclose(deq.float(), ref.float(), rtol=2 ** -7, atol=0)


def test_checkpoint_tensor_1d_and_rows_error():
    packed, scale = packed_ternary.pack_checkpoint_tensor(torch.tensor([0.5, -1.5, 0.1, 2.0]))
    assert packed.shape == (1,) and packed_ternary.unpack_ternary(packed).tolist() == [0, -1, 0, 1]
    with pytest.raises(ValueError, match=r"out_features \(dim 0\) = 10 is not a multiple of 4"):
        packed_ternary.pack_checkpoint_tensor(torch.randn(10, 8))
    with pytest.raises(ValueError, match="6 rows"):
        packed_ternary.pack_ternary(random_ternary(6, 2))


def make_bitlinear(w, bias, dtype):
    packed, scale = packed_ternary.pack_checkpoint_tensor(w)
    lin = bitnet.BitLinear(w.shape[1], w.shape[0], bias=bias is not None, dtype=dtype)  # plain nn.Module, CPU ok
    lin.load_state_dict({"weight": packed, "weight_scale": scale, **({"bias": bias} if bias is not None else {})})
    return lin


@pytest.mark.parametrize("with_bias", [False, True])
def test_transformers_bitlinear_equals_our_fake_quant_forward_fp32(with_bias, eager):
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(32, 48, generator=g), torch.randn(2, 5, 48, generator=g)
    bias = torch.randn(32, generator=g) if with_bias else None
    lin = make_bitlinear(w, bias, torch.float32)
    # BitLinear: y = linear(x_int8, T) / (s_a · weight_scale) (+ bias); ours: linear(Q_a(x), T / s_w) (+ bias)
    theirs = lin(x)
    ours = F.linear(tq.activation_fake_quant(x), tq.weight_fake_quant(w), bias)
    assert theirs.dtype == ours.dtype == torch.float32
    assert torch.allclose(theirs, ours, rtol=1e-5, atol=1e-5 * ours.abs().max().item())


def test_transformers_bitlinear_bf16_close_to_our_forward(eager):
    # in bf16 BitLinear computes s_a and the matmul in bf16 (ours in fp32, one final rounding): close, not equal
    g = torch.Generator().manual_seed(12)
    w, x = torch.randn(32, 48, generator=g).bfloat16(), torch.randn(2, 5, 48, generator=g).bfloat16()
    lin = make_bitlinear(w, None, torch.bfloat16)
    theirs = lin(x)
    ours = F.linear(tq.activation_fake_quant(x), tq.weight_fake_quant(w))
    assert theirs.dtype == ours.dtype == torch.bfloat16
    assert torch.allclose(theirs.float(), ours.float(), rtol=3e-2, atol=3e-2 * ours.float().abs().max().item())
