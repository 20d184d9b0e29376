"""`BlockCodec` (whole tensors, block by block: the async parameter server's frames) against per-block references."""
import math

import pytest
import torch

import dsq_plugins as dsq
from dsq_plugins.compression import fastpath
from dsq_plugins.engine.codec import BlockCodec
from dsq_plugins.engine.seeding import derive_seed

B = 64


def payload_bytes(spec, n, block=B):
    """The wire bytes of one block of n elements of fp32, written out from docs/ARCHITECTURE.md section 3 (the index type
    of top-k follows the configured block size)."""
    name, _, arg = spec.partition(":")
    if name == "sign":
        return 4 + math.ceil(n / 8)
    if name == "topk":
        k = max(1, math.ceil(float(arg) * n))
        return k * (4 + (1 if block <= 256 else 2))
    if name == "int8":
        return 8 * math.ceil(n / int(arg or 512)) + n
    if name == "none":
        return 4 * n
    raise AssertionError(spec)


@pytest.mark.parametrize("spec", ["none", "sign", "topk:0.1", "int8:16"])
@pytest.mark.parametrize("numel", [1, 37, B, 3 * B, 3 * B + 5])
def test_frame_is_the_blocks_and_decodes_as_each_block(spec, numel):
    codec = BlockCodec(dsq.get_compressor(spec), B)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    frame, decoded = codec.encode(x)
    blocks = [(a, min(numel, a + B)) for a in range(0, numel, B)]
    assert frame.numel() == codec.nbytes(numel, x.dtype) == sum(payload_bytes(spec, b - a) for a, b in blocks)
    comp = dsq.get_compressor(spec)
    reference = torch.cat([comp.decompress(comp.compress(x[a:b])) for a, b in blocks])
    torch.testing.assert_close(decoded, reference, rtol=1e-6, atol=1e-7)
    back = codec.decode(torch.frombuffer(bytearray(frame.numpy().tobytes()), dtype=torch.uint8), x.shape, x.dtype)
    assert torch.equal(back, decoded)
    assert codec.finite(frame, numel, x.dtype)


def test_random_compressor_draws_from_the_frame_seed():
    codec = BlockCodec(dsq.get_compressor("randomk:0.25"), B)
    x = torch.randn(5 * B + 3)
    f1, d1 = codec.encode(x, seed=1)
    f2, d2 = codec.encode(x, seed=2)
    assert not torch.equal(d1 != 0, d2 != 0)
    assert torch.equal(codec.decode(f1, x.shape, x.dtype, seed=1), d1)
    assert f1.numel() == 4 * sum(max(1, math.ceil(0.25 * n)) for n in [B] * 5 + [3])


def test_non_finite_fields_are_seen():
    codec = BlockCodec(dsq.get_compressor("sign"), B)
    x = torch.randn(2 * B)
    x[70] = float("inf")
    frame, _ = codec.encode(x)
    assert not codec.finite(frame, x.numel(), x.dtype)


def test_wrong_frame_size_is_refused():
    codec = BlockCodec(dsq.get_compressor("sign"), B)
    with pytest.raises(ValueError, match="bytes"):
        codec.decode(torch.zeros(3, dtype=torch.uint8), (100,), torch.float32)


@pytest.mark.parametrize("fast", [True, False])
def test_mismatched_tensors_are_refused(fast):
    """A copy, residual or output tensor of another size or dtype is an error, never a read past its end."""
    codec = BlockCodec(dsq.get_compressor("sign"), B)
    x, short, half = torch.randn(2 * B), torch.randn(2 * B - 1), torch.randn(2 * B, dtype=torch.float64)
    frame, _ = codec.encode(x)
    was = fastpath.enabled()
    fastpath.set_enabled(fast)
    try:
        for bad in (short, half):
            with pytest.raises(ValueError, match="x_hat is|held is"):
                codec.encode_delta(x.clone(), bad.clone())
            with pytest.raises(ValueError, match="x_hat is"):
                codec.apply_delta(frame, x.clone(), 1.0, 0, codec, bad.clone())
            with pytest.raises(ValueError, match="residual is"):
                codec.encode_residual(x, bad.clone(), torch.empty_like(x))
            with pytest.raises(ValueError, match="out is"):
                codec.encode_residual(x, x.clone(), bad.clone())
    finally:
        fastpath.set_enabled(was)


def blockwise(spec, x, seed):
    """The reference a frame decodes to: each block of B elements through `Compressor.compress` / `decompress` (the
    API test_compressors.py checks against plain torch) with its own seed, the seed the frame's `seed` derives
    for it (the block's index under the codec's key, pass 0, shared by all ranks)."""
    comp = dsq.get_compressor(spec)
    return torch.cat([comp.decompress(comp.compress(x[a:a + B], seed=derive_seed(0, seed, "tensor", i, 0)))
                      for i, a in enumerate(range(0, x.numel(), B))])


@pytest.mark.parametrize("spec", ["none", "sign", "topk:0.1", "int8:16", "grouptopk:0.25+sign", "randomk:0.2"])
@pytest.mark.parametrize("numel", [37, B, 3 * B + 5])
@pytest.mark.parametrize("fast", [True, False])
def test_fused_server_passes_match_the_blockwise_reference(spec, numel, fast):
    """`decode_add` is ``acc + alpha * C(g)`` and `encode_delta` is ``C(x - x_hat)`` with ``x_hat`` moved by it,
    `apply_delta` both, `encode_residual` ``C(x + e)`` with ``e' = x + e - C(x + e)``, where C is the block-wise
    reference (`blockwise`), not the codec itself: with the numba kernels (sign, fast paths on) and without. The
    fused frames are also byte for byte `encode`'s where no kernel reorders a sum."""
    codec = BlockCodec(dsq.get_compressor(spec), B)
    gen = torch.Generator().manual_seed(numel)
    x, x_hat, g = (torch.randn(numel, generator=gen) for _ in range(3))
    # The numba sign kernel sums a block's |d| in another order: its scale may differ in the last bit.
    tol = 1e-6 if spec == "sign" and fast else 0
    close = dict(rtol=max(tol, 1e-6), atol=max(tol, 1e-6))
    was = fastpath.enabled()
    fastpath.set_enabled(fast)
    try:
        frame, decoded = codec.encode(g, 11)
        torch.testing.assert_close(decoded, blockwise(spec, g, 11), **close)
        acc = x.clone()
        codec.decode_add(frame, acc, -0.375, 11, scratch=torch.empty(numel))
        torch.testing.assert_close(acc, x - 0.375 * blockwise(spec, g, 11), rtol=0, atol=1e-6)
        held = x_hat.clone()
        got = codec.encode_delta(x, held, 5, scratch=torch.empty(numel))
        delta = blockwise(spec, x - x_hat, 5)
        assert got.numel() == codec.nbytes(numel, torch.float32)
        torch.testing.assert_close(held, x_hat + delta, **close)
        torch.testing.assert_close(codec.decode(got, (numel,), torch.float32, 5), delta, **close)
        if not tol:
            assert torch.equal(got, codec.encode(x - x_hat, 5)[0])
        # apply_delta (fused for sign) is decode_add then encode_delta.
        acc, held = x.clone(), x_hat.clone()
        got = codec.apply_delta(frame, acc, -0.375, 11, codec, held, 5, scratch=torch.empty(numel))
        torch.testing.assert_close(acc, x - 0.375 * blockwise(spec, g, 11), rtol=0, atol=1e-6)
        delta = blockwise(spec, acc - x_hat, 5)
        torch.testing.assert_close(held, x_hat + delta, **close)
        torch.testing.assert_close(codec.decode(got, (numel,), torch.float32, 5), delta, **close)
        # encode_residual: into another tensor, and in place.
        sent = blockwise(spec, x + x_hat, 5)
        for in_place in (False, True):
            e = x_hat.clone()
            out = e if in_place else torch.full_like(x, float("nan"))
            got = codec.encode_residual(x, e, out, 5)
            assert got.numel() == codec.nbytes(numel, torch.float32)
            torch.testing.assert_close(codec.decode(got, (numel,), torch.float32, 5), sent, **close)
            torch.testing.assert_close(out, (x + x_hat) - sent, **close)
            # conservation on the sender: what was sent plus what stays behind is exactly what there was to send
            torch.testing.assert_close(codec.decode(got, (numel,), torch.float32, 5) + out, x + x_hat,
                                       rtol=0, atol=1e-6)
    finally:
        fastpath.set_enabled(was)
