"""Property tests of every built-in compressor against plain-torch references written here (docs/ARCHITECTURE.md section 3).

Every compressor: any float dtype and shape in, the same out; the payload packs to exactly `nbytes` bytes, which
is what `Compressor.nbytes` predicts; `Payload.from_bytes` of those bytes decompresses to the same tensor, bit for
bit. Then each compressor's exact semantics, and the bit packing of `bitpack`.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dsq_plugins as dsq
from dsq_plugins.compression import bitpack
from dsq_plugins.compression.compressors import index_dtype
from dsq_plugins.compression.payload import Payload

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BUILTINS = ["none", "fp16", "bf16", "sign", "topk", "grouptopk", "randomk", "qsgd", "int8", "int4", "int2"]
SPECS = ["none", "fp16", "bf16", "sign", "topk:0.01", "topk:0.3", "topk:1", "randomk:0.01", "randomk:0.5",
         "qsgd:16", "qsgd:1", "qsgd:255", "int8", "int8:7", "int4", "int4:5", "int2", "int2:3",
         "grouptopk:0.03", "grouptopk:0.5", "grouptopk:0.03+sign", "grouptopk:0.1+int4",
         "topk:0.01+int4", "topk:0.3+sign", "topk:0.1+int2:4", "topk:0.2+fp16", "randomk:0.3+int8", "topk:0.2+qsgd:4"]

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of `t` (so that -0.0 != 0.0 and comparisons are exact)."""
    return t.contiguous().view(_INT_OF_SIZE[t.element_size()])


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    assert torch.equal(bits(a), bits(b)), (a, b)


def make(shape, dtype, seed, scale=1.0, zeros=0.0, ties=False) -> torch.Tensor:
    """A random tensor: normal values times `scale` (or small integers, many ties), a fraction `zeros` of them
    set to 0.0 or -0.0, built in float64 and cast (so every dtype sees values it can hold)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if ties:
        x = torch.randint(-3, 4, (n,), generator=g).double()
    else:
        x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    if zeros:
        z = torch.rand(n, generator=g) < zeros
        x[z] = 0.0
        x[z & (torch.rand(n, generator=g) < 0.5)] = -0.0
    return x.to(dtype).reshape(shape)


shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)   # () and (1,) are d = 1
tensors = st.builds(make, shapes, st.sampled_from(FLOATS), st.integers(0, 2 ** 31),
                    scale=st.sampled_from([1e-3, 1.0, 10.0]), zeros=st.sampled_from([0.0, 0.3]),
                    ties=st.booleans())


def k_of(ratio: float, d: int) -> int:
    return max(1, math.ceil(ratio * d))


def roundtrip(spec, x, seed=7):
    c = dsq.get_compressor(spec)
    p = c.compress(x, seed=seed)
    return c, p, c.decompress(p)


# --------------------------------------------------------------------------------------------- every compressor


def test_specs_cover_every_builtin():
    assert set(BUILTINS) <= set(dsq.available_compressors())
    assert {s.partition(":")[0] for s in SPECS} == set(BUILTINS)


@pytest.mark.parametrize("spec", SPECS)
@FAST
@given(x=tensors, seed=st.integers(0, 2 ** 62))
def test_contract(spec, x, seed):
    before = x.clone()
    c, p, y = roundtrip(spec, x, seed)
    assert_same(x, before)                                          # the input is left alone
    assert y.dtype == x.dtype and y.shape == x.shape
    assert p.spec == c.spec and dsq.get_compressor(p.spec) == c
    data = p.to_bytes()
    assert len(data) == p.nbytes == c.nbytes(x.numel(), x.dtype)
    again = Payload.from_bytes(data, p.spec, x.shape, x.dtype, seed=p.seed)       # the seed is context
    assert again.nbytes == p.nbytes
    assert_same(c.decompress(again), y)
    assert c.compress(x, seed=seed).to_bytes() == data              # deterministic given the seed


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", FLOATS)
def test_non_contiguous_input(spec, dtype):
    base = make((40, 30), dtype, 3, zeros=0.1)
    for x in (base.t(), base[:, ::3], base[::2]):
        assert not x.is_contiguous()
        _, p, y = roundtrip(spec, x, seed=11)
        _, q, z = roundtrip(spec, x.contiguous(), seed=11)
        assert p.to_bytes() == q.to_bytes()
        assert_same(y, z)


@pytest.mark.parametrize("spec", SPECS)
def test_large_input_contract(spec):
    x = make((300_007,), torch.float32, 5, zeros=0.01)              # more than one block of the numpy paths
    c, p, y = roundtrip(spec, x)
    assert len(p.to_bytes()) == p.nbytes == c.nbytes(x.numel(), x.dtype)
    assert_same(c.decompress(Payload.from_bytes(p.to_bytes(), p.spec, x.shape, x.dtype, seed=p.seed)), y)


@pytest.mark.parametrize("spec", SPECS)
def test_rejects_non_float(spec):
    with pytest.raises(TypeError):
        dsq.get_compressor(spec).compress(torch.arange(10))


def test_payload_of_another_compressor_is_refused():
    p = dsq.get_compressor("topk:0.5").compress(torch.randn(10))
    with pytest.raises(ValueError):
        dsq.get_compressor("topk:0.25").decompress(p)


def test_unpack_checks_size():
    c = dsq.get_compressor("sign")
    with pytest.raises(ValueError):
        c.unpack(torch.zeros(5, dtype=torch.uint8), (100,), torch.float32)


# --------------------------------------------------------------------------------------------------- semantics


@FAST
@given(x=tensors)
def test_none_is_identity(x):
    _, p, y = roundtrip("none", x)
    assert_same(y, x)
    assert p.nbytes == x.numel() * x.element_size()


@pytest.mark.parametrize("name,wire", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
@FAST
@given(x=tensors)
def test_cast(name, wire, x):
    _, p, y = roundtrip(name, x)
    assert p.fields["values"].dtype == wire
    assert p.nbytes == 2 * x.numel()
    assert_same(y, x.to(wire).to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fp16_saturates(dtype):
    x = torch.tensor([1e5, -1e5, 7e4, -65519.0, 1.5], dtype=dtype)
    _, p, y = roundtrip("fp16", x)
    expected = torch.tensor([65504.0, -65504.0, 65504.0, -65504.0, 1.5], dtype=torch.float16)
    assert_same(p.fields["values"], expected)
    assert torch.isfinite(y).all()
    assert_same(y, expected.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_saturates(dtype):
    big = torch.finfo(torch.bfloat16).max
    x = torch.tensor([3.4e38, -3.4e38, 1.0], dtype=dtype)
    _, p, y = roundtrip("bf16", x)
    assert_same(p.fields["values"], torch.tensor([big, -big, 1.0], dtype=torch.bfloat16))
    assert torch.isfinite(y).all()


def sign_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    s = scale.reshape(()).to(x.dtype)
    return torch.where(x < 0, -s, s)            # -0.0 < 0 is False: sign(-0.0) = sign(0) = +1


def check_sign(x):
    _, p, y = roundtrip("sign", x)
    d = x.numel()
    assert p.nbytes == 4 + math.ceil(d / 8)
    scale = p.fields["scale"]
    assert scale.dtype == torch.float32 and scale.numel() == 1
    mean_abs = x.double().abs().mean()
    torch.testing.assert_close(scale.double()[0], mean_abs, rtol=1e-5, atol=0.0)
    assert_same(y, sign_reference(x, scale))


@FAST
@given(x=tensors)
def test_sign(x):
    check_sign(x)


@pytest.mark.parametrize("dtype", FLOATS)
def test_sign_of_zeros_is_plus(dtype):
    x = torch.tensor([0.0, -0.0, 1.0, -2.0, -0.0, 3.0, 0.0, -4.0, 5.0], dtype=dtype)
    _, p, y = roundtrip("sign", x)
    s = 15.0 / 9
    assert p.fields["scale"][0].item() == pytest.approx(s, rel=1e-6)
    signs = torch.tensor([1, 1, 1, -1, 1, 1, 1, -1, 1], dtype=dtype)
    assert_same(y, signs * p.fields["scale"].to(dtype))
    assert (y[[0, 1, 4, 6]] > 0).all()
    # the bits on the wire: 1 for negative only, most significant bit first, zero padding
    assert p.fields["bits"].tolist() == [0b00010001, 0b00000000]


@pytest.mark.parametrize("dtype", FLOATS)
def test_sign_of_zero_tensor(dtype):
    x = torch.tensor([0.0, -0.0, 0.0], dtype=dtype)
    _, p, y = roundtrip("sign", x)
    assert p.fields["scale"].tolist() == [0.0]
    assert (y == 0).all()


@pytest.mark.parametrize("d", [1, 7, 8, 9, 1 << 18, (1 << 18) + 13, 1 << 19, 3 * (1 << 18) + 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_sizes(d, dtype):
    x = make((d,), dtype, d, zeros=0.2)
    check_sign(x)
    p = dsq.get_compressor("sign").compress(x)
    assert p.fields["bits"].numpy().tobytes() == np.packbits((x < 0).numpy()).tobytes()


def check_topk(x, ratio):
    c, p, y = roundtrip(f"topk:{ratio}", x)
    d = x.numel()
    k = k_of(ratio, d)
    assert c.k(d) == k
    idx = p.fields["indices"]
    assert idx.dtype == (torch.uint8 if d <= 256 else torch.int16 if d <= 32768 else torch.int32)
    assert idx.numel() == p.fields["values"].numel() == k
    assert p.nbytes == k * (x.element_size() + idx.element_size())
    idx = idx.long()
    assert idx.min() >= 0 and idx.max() < d and idx.unique().numel() == k
    flat = x.reshape(-1)
    assert_same(p.fields["values"], flat[idx])                         # kept values are unscaled
    # the kept magnitudes are the k largest (as a multiset: ties may be broken either way)
    kept = flat[idx].abs().double().sort(descending=True).values
    top = flat.abs().double().sort(descending=True).values[:k]
    assert torch.equal(kept, top)
    # the rest is zero
    expected = torch.zeros(d, dtype=x.dtype)
    expected[idx] = flat[idx]
    assert_same(y.reshape(-1), expected)


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.3, 1.0])
@FAST
@given(x=tensors)
def test_topk(ratio, x):
    check_topk(x, ratio)


@pytest.mark.parametrize("d,dtype", [(65536, torch.float32), (100_003, torch.float64), (300_007, torch.float32),
                                     (70_001, torch.float16), (70_001, torch.bfloat16)])
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.05])
def test_topk_large(d, dtype, ratio):
    check_topk(make((d,), dtype, d, zeros=0.1), ratio)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.2])
def test_topk_large_with_ties(dtype, ratio):
    check_topk(make((200_000,), dtype, 1, ties=True), ratio)                  # 7 distinct values
    x = torch.zeros(131_072, dtype=dtype)
    x[::1000] = 2.0
    x[1::1000] = -2.0
    x[5::7] = 1.0
    check_topk(x, ratio)                                                       # mostly zeros, ties at the top
    check_topk(torch.full((80_000,), -1.5, dtype=dtype), ratio)               # all equal


def test_topk_large_unrepresentative_sample():
    """Inputs where the sampled threshold lets through fewer than k candidates: the selection must lower the
    threshold or fall back, and stay exact."""
    d = 200_000
    pos = torch.randint(0, d, (32768,), generator=torch.Generator().manual_seed(d))
    g = torch.Generator().manual_seed(0)
    for ratio in (0.02, 0.2):
        x = torch.rand(d, generator=g) + 1.0                    # unsampled entries: medium
        big = pos[torch.rand(pos.numel(), generator=g) < 0.06]
        x[pos] = torch.rand(pos.numel(), generator=g) * 1e-3   # most sampled entries: tiny
        x[big] = 100.0 + torch.rand(big.numel(), generator=g)   # a few sampled entries: large
        check_topk(x, ratio)
        check_topk(-x, ratio)


@pytest.mark.parametrize("d", [32768, 32769, 65536])
def test_topk_index_width_at_the_edge(d):
    x = torch.randn(d, generator=torch.Generator().manual_seed(d)) * 1e-3
    x[-1] = 100.0
    x[0] = -50.0
    _, p, y = roundtrip("topk:0.0001", x)
    assert p.fields["indices"].dtype == index_dtype(d) == (torch.int16 if d <= 32768 else torch.int32)
    assert y[-1] == 100.0 and y[0] == -50.0


def test_randomk_exact_k_scaled():
    for d, ratio in [(1, 0.5), (9, 0.3), (1000, 0.01), (12345, 0.1), (100, 1.0)]:
        x = torch.rand(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64) + 0.5   # no zeros
        for dtype in FLOATS:
            xd = x.to(dtype)
            c, p, y = roundtrip(f"randomk:{ratio}", xd, seed=d)
            k = k_of(ratio, d)
            assert p.nbytes == k * xd.element_size()          # values only: the indices come from the seed
            assert p.seed == d
            nz = y.nonzero().squeeze(1)
            assert nz.numel() == k
            assert_same(y[nz], xd[nz] * (d / k))
            assert_same(p.fields["values"].sort().values, (xd[nz] * (d / k)).sort().values)


@FAST
@given(x=tensors, seed=st.integers(0, 2 ** 62))
def test_randomk_properties(x, seed):
    c, p, y = roundtrip("randomk:0.3", x, seed=seed)
    d = x.numel()
    k = k_of(0.3, d)
    assert p.fields["values"].numel() == k
    nz = y.reshape(-1).nonzero().squeeze(1)
    assert nz.numel() <= k                                  # fewer where x itself has zeros at kept positions
    assert (x.reshape(-1)[nz] != 0).all()
    assert_same(y.reshape(-1)[nz], x.reshape(-1)[nz] * (d / k))


def test_randomk_seeded():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    c = dsq.get_compressor("randomk:0.01")
    a, b, other = c.compress(x, seed=5), c.compress(x, seed=5), c.compress(x, seed=6)
    assert a.to_bytes() == b.to_bytes()
    assert_same(c.decompress(a), c.decompress(b))
    assert not torch.equal(c.decompress(a) != 0, c.decompress(other) != 0)
    # no seed: one is drawn; it is context (like the shape), kept by the payload, not sent
    p = c.compress(x)
    assert p.seed is not None and p.nbytes == 10 * 4
    y = c.decompress(Payload.from_bytes(p.to_bytes(), p.spec, x.shape, x.dtype, seed=p.seed))
    assert_same(y, c.decompress(p))
    assert (y != 0).sum() == 10
    with pytest.raises(ValueError, match="seed"):
        c.decompress(Payload.from_bytes(p.to_bytes(), p.spec, x.shape, x.dtype))


def test_randomk_unbiased():
    d, ratio, n = 40, 0.1, 4000
    x = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = dsq.get_compressor(f"randomk:{ratio}")
    total = torch.zeros(d, dtype=torch.float64)
    for s in range(n):
        total += c.decompress(c.compress(x, seed=s))
    mean = total / n
    # per coordinate the estimate has variance x_i^2 (d/k - 1) = 9 x_i^2: standard error 3|x_i|/sqrt(n) ~ 0.05|x_i|
    assert torch.all((mean - x).abs() <= 0.25 * x.abs() + 1e-12), (mean, x)
    assert (mean - x).abs().max() < 0.15 * x.abs().max()


def qsgd_levels(c, p, d):
    return bitpack.unpack_uint(p.fields["levels"], d, c.bits)


@pytest.mark.parametrize("levels", [1, 4, 16, 255])
@FAST
@given(x=tensors, seed=st.integers(0, 2 ** 62))
def test_qsgd(levels, x, seed):
    c, p, y = roundtrip(f"qsgd:{levels}", x, seed=seed)
    d = x.numel()
    b = max(1, math.ceil(math.log2(levels + 1)))
    assert p.nbytes == 4 + math.ceil(d / 8) + math.ceil(d * b / 8)
    v = x.reshape(-1).double()
    norm = p.fields["norm"].double()[0]
    torch.testing.assert_close(norm, v.norm(), rtol=1e-5, atol=0.0)
    lv = qsgd_levels(c, p, d)
    assert int(lv.max()) <= levels
    if norm > 0:
        # stochastic rounding of |v| / norm * S goes to one of the two neighbouring levels
        a = v.abs() / norm * levels
        lvd = lv.double()
        assert torch.all(lvd >= torch.floor(a - 1e-4)) and torch.all(lvd <= torch.ceil(a + 1e-4))
    # decoding: sign(v) * level * norm / S, in float32 then cast
    sign = torch.where(x.reshape(-1).float() < 0, -1.0, 1.0)
    expected = (lv.float() * (p.fields["norm"] / levels)) * sign
    torch.testing.assert_close(y.reshape(-1), expected.to(x.dtype), rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_qsgd_zero_tensor(dtype):
    for x in (torch.zeros(37, dtype=dtype), torch.full((3, 5), -0.0, dtype=dtype)):
        c, p, y = roundtrip("qsgd:16", x, seed=3)
        assert p.fields["norm"].tolist() == [0.0]
        assert (y == 0).all() and y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("levels", [1, 3, 16])
def test_qsgd_unbiased(levels):
    d, n = 30, 3000
    x = torch.randn(d, generator=torch.Generator().manual_seed(levels), dtype=torch.float64)
    c = dsq.get_compressor(f"qsgd:{levels}")
    total = torch.zeros(d, dtype=torch.float64)
    for s in range(n):
        total += c.decompress(c.compress(x, seed=s))
    mean = total / n
    # per coordinate the variance is at most (norm / S)^2 / 4: standard error <= norm / (2 S sqrt(n))
    tol = 6 * x.norm() / (2 * levels * math.sqrt(n))
    assert (mean - x).abs().max() <= tol, ((mean - x).abs().max(), tol)


def test_qsgd_seed_per_rank_and_independent_noise():
    c = dsq.get_compressor("qsgd:4")
    assert c.uses_seed and c.seed_per_rank
    x = torch.randn(2000, generator=torch.Generator().manual_seed(0))
    assert c.compress(x, seed=1).to_bytes() != c.compress(x, seed=2).to_bytes()


def int_reference(v: torch.Tensor, bits: int, size: int):
    """Plain torch: min-max quantization of the float64 vector `v` in chunks of `size` -> (mins, steps, levels,
    dequantized values), chunk by chunk."""
    mins, steps, levels, out = [], [], [], []
    for i in range(0, v.numel(), size):
        part = v[i:i + size]
        lo, hi = part.min(), part.max()
        step = (hi - lo) / (2 ** bits - 1)
        q = torch.zeros_like(part) if step == 0 else ((part - lo) / step).round().clamp(0, 2 ** bits - 1)
        mins.append(lo), steps.append(step), levels.append(q), out.append(q * step + lo)
    return torch.stack(mins), torch.stack(steps), torch.cat(levels), torch.cat(out)


def check_int(x, chunk, bits=8):
    name = f"int{bits}"
    spec = name if chunk is None else f"{name}:{chunk}"
    c, p, y = roundtrip(spec, x)
    size = 512 if chunk is None else chunk
    d = x.numel()
    chunks = math.ceil(d / size)
    assert p.nbytes == 8 * chunks + math.ceil(d * bits / 8)
    v = x.reshape(-1).double()
    w = y.reshape(-1).double()
    mins, steps, _, ref = int_reference(v, bits, size)
    torch.testing.assert_close(p.fields["mins"].double(), mins, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(p.fields["steps"].double(), steps, rtol=1e-5, atol=1e-30)
    err = (w - v).abs()
    eps = torch.finfo(x.dtype).eps
    for i in range(chunks):
        lo, hi, step = mins[i], mins[i] + steps[i] * (2 ** bits - 1), steps[i]
        scale = max(abs(lo.item()), abs(hi.item()))
        # half a step, plus float32 arithmetic, plus the final rounding to the tensor's dtype
        tol = step / 2 + 8 * torch.finfo(torch.float32).eps * scale + eps * w[i * size:(i + 1) * size].abs()
        assert torch.all(err[i * size:(i + 1) * size] <= tol), (i, err[i * size:(i + 1) * size].max(), step)
    if bits < 8 and x.dtype in (torch.float32, torch.float64):     # away from rounding ties: the same values
        near_tie = ((v - mins.repeat_interleave(size)[:d]) / steps.clamp(min=1e-300).repeat_interleave(size)[:d]
                    ).frac().sub(0.5).abs() < 1e-3
        torch.testing.assert_close(w[~near_tie], ref[~near_tie], rtol=1e-5, atol=1e-6 * float(v.abs().max()))


@pytest.mark.parametrize("chunk", [None, 1, 7, 100, 1000])
@FAST
@given(x=tensors)
def test_int8(chunk, x):
    check_int(x, chunk)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("chunk", [None, 1, 7, 100])
@FAST
@given(x=tensors)
def test_int4_int2(bits, chunk, x):
    check_int(x, chunk, bits)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", FLOATS)
def test_int_sizes_not_dividing(bits, dtype):
    for d, chunk in [(1, 512), (511, 512), (513, 512), (1000, 7), (100_003, None), (5, 5)]:
        check_int(make((d,), dtype, d, scale=3.0), chunk, bits)
    const = torch.full((700,), 2.5, dtype=dtype)                     # step 0: exact
    _, _, y = roundtrip(f"int{bits}", const)
    assert_same(y, const)


def sign_of_kept(values: torch.Tensor) -> torch.Tensor:
    return torch.where(values < 0, -1.0, 1.0).double() * values.double().abs().mean()


@pytest.mark.parametrize("quant,bits", [("int4", 4), ("int2", 2), ("sign", 1)])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.5])
@FAST
@given(d=st.integers(1, 5000), seed=st.integers(0, 2 ** 31))
def test_topk_then_quantiser(quant, bits, ratio, d, seed):
    """topk:R+Q against plain torch: the k entries of largest magnitude, at their places, hold Q of the kept
    values (one block of k values in index order: one sign scale, int chunks of 512), zeros elsewhere; on the wire
    the indices in
    the smallest type and Q's fields of k values."""
    k = k_of(ratio, d)
    x = make((d,), torch.float64, seed)                               # distinct magnitudes: one top-k set
    c, p, y = roundtrip(f"topk:{ratio}+{quant}", x)
    idx = torch.topk(x.abs(), k).indices.sort().values
    kept = x[idx]
    if quant == "sign":
        ref = sign_of_kept(kept)
        q_bytes = 4 + math.ceil(k / 8)
    else:
        ref = int_reference(kept, bits, 512)[3]
        q_bytes = 8 * math.ceil(k / 512) + math.ceil(k * bits / 8)
    assert p.nbytes == k * torch.empty((), dtype=index_dtype(d)).element_size() + q_bytes
    assert p.fields["indices"].dtype == index_dtype(d)
    expected = torch.zeros(d, dtype=torch.float64)
    expected[idx] = ref
    mask = torch.zeros(d, dtype=torch.bool)
    mask[idx] = True
    assert torch.all(y[~mask] == 0)
    if quant == "sign":
        torch.testing.assert_close(y[mask], expected[mask], rtol=1e-6, atol=0.0)
    else:       # float32 arithmetic may send a value that lies within rounding of a tie to the other level
        step = float(int_reference(kept, bits, 512)[1].max())
        fp32 = 1e-6 * float(kept.abs().max())                   # mins and steps travel as float32
        off = (y[mask] - expected[mask]).abs()
        assert float(off.max()) <= step * 1.0001 + fp32
        assert int((off > 1e-3 * step + fp32).sum()) <= max(1, k // 100)


@pytest.mark.parametrize("ratio", [0.01, 0.03, 0.3, 1.0])
@FAST
@given(d=st.integers(1, 5000), seed=st.integers(0, 2 ** 31))
def test_grouptopk(ratio, d, seed):
    """grouptopk:R against plain torch: groups of 32 (the last one short), the max(1, ceil(R g)) of largest sum of
    squares kept whole and unscaled, the rest zero; values (a block shorter than the kept groups: its elements)
    and group indices in the smallest type on the wire."""
    x = make((d,), torch.float64, seed)
    c, p, y = roundtrip(f"grouptopk:{ratio}", x)
    g = math.ceil(d / 32)
    kg = k_of(ratio, g)
    energy = torch.stack([x[32 * i:32 * (i + 1)].square().sum() for i in range(g)])
    kept = torch.topk(energy, kg).indices.sort().values
    expected = torch.zeros(d, dtype=torch.float64)
    for i in kept.tolist():
        expected[32 * i:32 * (i + 1)] = x[32 * i:32 * (i + 1)]
    assert_same(y, expected)
    assert torch.equal(p.fields["indices"].long(), kept)
    assert p.fields["indices"].dtype == index_dtype(g)
    assert p.nbytes == 8 * min(32 * kg, d) + kg * index_dtype(g).itemsize
    assert float((x - y).square().sum()) <= (1 - kg / g) * float(x.square().sum()) + 1e-12     # a contraction


@pytest.mark.parametrize("dtype", FLOATS)
def test_randomk_then_quantiser(dtype):
    """randomk:R+int8: the entries randomk alone keeps (from the same seed), scaled by n/k, then int8 of those
    values; no indices on the wire (they come from the seed)."""
    x = make((3000,), dtype, 1)
    alone = dsq.get_compressor("randomk:0.1")
    plain = alone.decompress(alone.compress(x, seed=9)).double()
    c, p, y = roundtrip("randomk:0.1+int8", x, seed=9)
    k = k_of(0.1, 3000)
    assert set(p.fields) == {"v_mins", "v_steps", "v_q"} and p.nbytes == 8 + k
    kept = plain != 0
    assert int(kept.sum()) == k and torch.all(y[~kept] == 0)
    # the kept values in randomk's order are what int8 quantised: compare as sets, within half a step
    lo, hi = plain[kept].min(), plain[kept].max()
    step = float((hi - lo) / 255)
    err = (y.double()[kept] - plain[kept]).abs()
    assert float(err.max()) <= step / 2 + 1e-2 * float(plain[kept].abs().max()) * torch.finfo(dtype).eps * 256


def test_composed_variance_and_nonfinite():
    assert dsq.get_compressor("topk:0.01+int4").variance(4096) is None          # biased throughout
    assert dsq.get_compressor("randomk:0.25+int8").variance(4096) == pytest.approx(3.0)
    c = dsq.get_compressor("topk:0.1+int4")
    x = torch.randn(2, 64)
    x[1, 5] = float("nan")
    assert bool(c.nonfinite(c.encode(x)))
    assert not bool(c.nonfinite(c.encode(torch.randn(2, 64))))


# ---------------------------------------------------------------------------------------------------- bitpack


@FAST
@given(nbits=st.integers(1, 8), data=st.data())
def test_pack_uint_roundtrip(nbits, data):
    values = data.draw(st.lists(st.integers(0, 2 ** nbits - 1), min_size=0, max_size=100))
    t = torch.tensor(values, dtype=torch.uint8)
    packed = bitpack.pack_uint(t, nbits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == bitpack.packed_nbytes(len(values), nbits) == math.ceil(len(values) * nbits / 8)
    assert torch.equal(bitpack.unpack_uint(packed, len(values), nbits), t)


@pytest.mark.parametrize("nbits", range(1, 9))
def test_pack_uint_layout_and_large(nbits):
    # big-endian: the first value's most significant bit is the first byte's most significant bit
    if nbits < 8:
        assert bitpack.pack_uint(torch.tensor([1 << (nbits - 1)], dtype=torch.uint8), nbits).tolist() == [128]
    n = 100_001
    t = torch.randint(0, 2 ** nbits, (n,), generator=torch.Generator().manual_seed(nbits)).to(torch.uint8)
    packed = bitpack.pack_uint(t, nbits)
    assert packed.numel() == math.ceil(n * nbits / 8)
    assert torch.equal(bitpack.unpack_uint(packed, n, nbits), t)


@pytest.mark.parametrize("nbits", [0, 9])
def test_pack_uint_rejects_bits(nbits):
    with pytest.raises(ValueError):
        bitpack.pack_uint(torch.zeros(3, dtype=torch.uint8), nbits)


@FAST
@given(mask=st.lists(st.booleans(), min_size=0, max_size=200))
def test_pack_bits_roundtrip(mask):
    m = torch.tensor(mask, dtype=torch.bool)
    packed = bitpack.pack_bits(m)
    assert packed.numel() == math.ceil(len(mask) / 8)
    assert torch.equal(bitpack.unpack_bits(packed, len(mask)), m.to(torch.uint8))
    for dtype in FLOATS:
        out = bitpack.unpack_signs(packed, len(mask), dtype)
        assert out.dtype == dtype
        assert_same(out, torch.where(m, -1.0, 1.0).to(dtype))


def test_pack_bits_order_and_large():
    assert bitpack.pack_bits(torch.tensor([True] + [False] * 8)).tolist() == [128, 0]
    m = torch.rand(1_000_003, generator=torch.Generator().manual_seed(0)) < 0.3
    packed = bitpack.pack_bits(m)
    assert packed.numpy().tobytes() == np.packbits(m.numpy()).tobytes()
    assert torch.equal(bitpack.unpack_bits(packed, m.numel()).bool(), m)


def test_pack_negative_rows():
    x = make((5, 64), torch.float32, 3, zeros=0.3)
    rows = bitpack.pack_negative(x)
    assert rows.shape == (5, 8)
    assert rows.numpy().tobytes() == np.packbits((x < 0).numpy(), axis=1).tobytes()     # -0.0 is not negative


def test_randomk_picks_a_uniform_subset():
    """Over many seeds each index of a block is kept k/d of the time, and a block's k indices are distinct."""
    d, ratio, trials = 50, 0.1, 4000
    c = dsq.get_compressor(f"randomk:{ratio}")
    x = torch.ones(d)
    counts = torch.zeros(d)
    for seed in range(trials):
        kept = c.decompress(c.compress(x, seed=seed)) != 0
        assert int(kept.sum()) == 5
        counts += kept
    expected = trials * 5 / d               # 400 per index; binomial sd ~ 19
    assert float((counts - expected).abs().max()) < 6 * (expected * (1 - 5 / d)) ** 0.5


@pytest.mark.parametrize("spec", ["topk:0.3", "topk:0.3+sign"])
def test_topk_ties_keep_the_lowest_indices_in_any_batch(spec):
    """Equal magnitudes at the k-th place: the lowest indices are kept, and a block compressed alone, as a full row
    of a batch, or as a short row padded in a wider batch gives the same fields."""
    c = dsq.get_compressor(spec)
    x = torch.tensor([0.5, -1.0, 0.5, -0.5, 2.0, 0.5, -0.5, 1.0, 0.0, 0.5])       # k = 3: 2.0, then two of the 1.0s
    y = c.decompress(c.compress(x))
    assert torch.equal(y != 0, torch.tensor([False, True, False, False, True, False, False, True, False, False]))
    x = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.5, 0.5, -0.5, 0.5, 0.5, 0.5])       # all tied: the first three
    alone = c.encode(x.reshape(1, -1))
    assert torch.equal(alone["indices"][0].long(), torch.arange(3))
    wide = torch.zeros(2, 24)
    wide[0, :10] = x
    wide[1] = torch.randn(24)
    padded = c.encode(wide, torch.tensor([10, 24]))
    assert torch.equal(padded["indices"][0, :3], alone["indices"][0].to(padded["indices"].dtype))


@pytest.mark.parametrize("spec", ["int8", "int4:128", "int4", "int2", "int8:64", "int2:8"])
def test_int_quantisers_numba_kernels_equal_the_torch_path_bit_for_bit(spec):
    """The CPU fast path of the min-max quantisers (numba: the levels and their packing in one pass, unpacking and
    dequantising in one) against the pure-torch code every device runs: the same fields and the same decoded
    values, ties included (values exactly half a step apart round to even), and a chunk with a NaN or an infinity
    still reported non-finite."""
    from dsq_plugins.compression import fastpath
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1024, generator=g) * torch.logspace(-3, 2, 6)[:, None]
    x[1, :128] = torch.arange(128) * 0.5                  # ties at every other element
    x[2, :512] = 3.0                                      # a constant chunk: step 0
    c = dsq.get_compressor(spec)
    was = fastpath.enabled()
    try:
        fastpath.set_enabled(False)
        ref = c.encode(x)
        ref_dec = c.decode(ref, 1024, torch.float32)
        fastpath.set_enabled(True)
        got = c.encode(x)
        got_dec = c.decode(got, 1024, torch.float32, out=torch.empty(6, 1024))
        bad = x.clone()
        bad[3, 7], bad[4, 9] = float("nan"), float("inf")
        assert bool(c.nonfinite(c.encode(bad)))
    finally:
        fastpath.set_enabled(was)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert torch.equal(got_dec, ref_dec)
    assert (got_dec - x).abs().max() <= (got["steps"].max() / 2) * (1 + 1e-6)


@pytest.mark.parametrize("world", [2, 3, 7])
def test_divide_finite_kernel_equals_torch_division_bit_for_bit(world):
    """The CPU fast path of a dense bucket's mean (numba: divide by W and check for NaN and infinity in one pass)
    against torch's ``div_``: the same float32 values, and a NaN or an infinity anywhere reported."""
    from dsq_plugins.compression import kernels
    if not kernels.available():
        pytest.skip("numba is not installed")
    g = torch.Generator().manual_seed(world)
    x = torch.randn(10_001, generator=g) * torch.logspace(-30, 30, 10_001)
    got = x.clone()
    assert kernels.divide_finite(got.numpy(), world) is False
    assert torch.equal(got, x.clone().div_(world))
    for i, bad in ((0, float("nan")), (10_000, float("inf")), (4_321, float("-inf"))):
        y = x.clone()
        y[i] = bad
        assert kernels.divide_finite(y.numpy(), world) is True
