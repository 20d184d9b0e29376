"""The reference Simulator against plain torch, and the algorithm's laws on it."""

import pytest
import torch

import dsq_plugins as dsq

SPECS = ["none", "fp16", "bf16", "sign", "topk:0.1", "randomk:0.25", "qsgd:8", "int8:16"]


def cfg(**kw):
    kw.setdefault("min_numel", 1)
    return dsq.DoubleSqueezeConfig(**kw)


def test_matches_plain_torch_sign():
    """Sign with both residuals, written out in plain torch with one server and one shard."""
    torch.manual_seed(0)
    n, d, steps = 3, 37, 25
    sim = dsq.Simulator(n, cfg(compressor="sign"))
    e_w = [torch.zeros(d) for _ in range(n)]
    e_s = torch.zeros(d)

    def sign(v):
        return v.abs().mean() * torch.where(v >= 0, 1.0, -1.0)

    for _ in range(steps):
        grads = [torch.randn(d) for _ in range(n)]
        cs = []
        for i in range(n):
            v = grads[i] + e_w[i]
            c = sign(v)
            e_w[i] = v - c
            cs.append(c)
        v = sum(cs) / n + e_s
        c = sign(v)
        e_s = v - c
        torch.testing.assert_close(sim.step(grads), c, rtol=1e-6, atol=1e-6)
    for i in range(n):
        torch.testing.assert_close(sim.worker_errors[i], e_w[i], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sim.server_error, e_s, rtol=1e-6, atol=1e-6)


def test_matches_plain_torch_topk_dense_downlink_in_blocks():
    """top-k up, dense down (MEM-SGD), blocks of 24 (a full block and a tail of 16): the downlink is exactly the
    mean of the uplink, and top-k keeps k of each block."""
    torch.manual_seed(1)
    n, d = 2, 40
    sim = dsq.Simulator(n, cfg(compressor="topk:0.1", server_compressor="none", block_size=24))
    e_w = [torch.zeros(d) for _ in range(n)]

    def topk(v):        # block of 24: k = 3; block of 16: k = 2
        out = torch.zeros_like(v)
        for s, k in ((slice(0, 24), 3), (slice(24, 40), 2)):
            idx = v[s].abs().argsort(descending=True)[:k]
            out[s][idx] = v[s][idx]
        return out

    for _ in range(10):
        grads = [torch.randn(d) for _ in range(n)]
        cs = []
        for i in range(n):
            v = grads[i] + e_w[i]
            cs.append(topk(v))
            e_w[i] = v - cs[-1]
        torch.testing.assert_close(sim.step(grads), sum(cs) / n)
    assert torch.count_nonzero(sim.server_error) == 0


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("block_size", [8, 4096])
def test_conservation_law(spec, block_size):
    torch.manual_seed(2)
    n, d, steps = 4, 101, 30
    sim = dsq.Simulator(n, cfg(compressor=spec, block_size=block_size))
    applied = torch.zeros(d, dtype=torch.float64)
    true = torch.zeros(d, dtype=torch.float64)
    for _ in range(steps):
        grads = [torch.randn(d) * 0.1 + 0.05 for _ in range(n)]
        applied += sim.step(grads).double()
        true += (sum(grads) / n).double()
    held = sum(e.double() for e in sim.worker_errors) / n + sim.server_error.double()
    scale = 1 + max(float(x.abs().max()) for x in (applied, true, held))
    torch.testing.assert_close(applied, true - held, rtol=0, atol=1e-5 * scale)


def gap_growth(config, steps):
    """||sum_t c_t - sum_t mean g_t|| after `steps` rounds of gradients with a persistent mean."""
    gen = torch.Generator().manual_seed(3)
    sim = dsq.Simulator(4, config)
    mu = torch.linspace(-1, 1, 64)
    gap = torch.zeros(64, dtype=torch.float64)
    gaps = []
    for t in range(steps):
        grads = [mu + torch.randn(64, generator=gen) for _ in range(4)]
        gap += (sim.step(grads) - sum(grads) / 4).double()
        gaps.append(float(gap.norm()))
    return gaps


def test_gap_between_applied_and_true_stays_bounded_with_error_feedback():
    with_ef = gap_growth(cfg(compressor="sign"), 2000)
    without = gap_growth(cfg(compressor="sign", worker_ef=False, server_ef=False), 2000)
    early, late = max(with_ef[100:200]), max(with_ef[1800:])
    assert late < 2 * early + 1, f"with error feedback the gap grew from {early:.2f} to {late:.2f}"
    assert without[-1] > 5 * without[199], "without error feedback the gap should keep growing (linearly)"
    assert without[-1] > 20 * with_ef[-1]


def test_baseline_switches():
    torch.manual_seed(4)
    grads = lambda: [torch.randn(50) for _ in range(2)]  # noqa: E731
    no_ef = dsq.Simulator(2, cfg(compressor="sign", worker_ef=False, server_ef=False))
    worker_only = dsq.Simulator(2, cfg(compressor="sign", server_ef=False))
    for _ in range(5):
        no_ef.step(grads())
        worker_only.step(grads())
    assert all(torch.count_nonzero(e) == 0 for e in no_ef.worker_errors + [no_ef.server_error])
    assert all(torch.count_nonzero(e) > 0 for e in worker_only.worker_errors)
    assert torch.count_nonzero(worker_only.server_error) == 0


def test_sign_scale_is_per_block():
    """sign with blocks of 16: one scale per block, the mean |v| of that block."""
    sim = dsq.Simulator(1, cfg(compressor="sign", block_size=16, server_compressor="none"))
    g = torch.cat([torch.full((16,), 2.0), torch.full((16,), -0.5), torch.tensor([1.0, -3.0])])
    c = sim.step([g])
    torch.testing.assert_close(c, torch.cat([torch.full((16,), 2.0), torch.full((16,), -0.5),
                                             torch.tensor([2.0, -2.0])]))


def test_warmup_and_min_numel_are_dense():
    torch.manual_seed(5)
    sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="sign", warmup_steps=2, min_numel=10))
    for t in range(4):
        grads = [torch.randn(20) for _ in range(2)]
        c = sim.step(grads)
        if t < 2:
            torch.testing.assert_close(c, (grads[0] + grads[1]) / 2)
        else:
            assert c.abs().unique().numel() <= 2
    small = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="sign", min_numel=10))
    grads = [torch.randn(9) for _ in range(2)]
    torch.testing.assert_close(small.step(grads), (grads[0] + grads[1]) / 2)


def test_nonfinite_gradient_is_skipped():
    torch.manual_seed(6)
    sim = dsq.Simulator(3, cfg(compressor="sign"))
    sim.step([torch.randn(30) for _ in range(3)])
    before = [e.clone() for e in sim.worker_errors] + [sim.server_error.clone()]
    for bad in (float("nan"), float("inf")):
        grads = [torch.randn(30) for _ in range(3)]
        grads[1][7] = bad
        assert torch.isnan(sim.step(grads)).all()
    after = sim.worker_errors + [sim.server_error]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert sim.skipped_steps == 2 and sim.steps == 3


def test_shapes_and_dtypes():
    sim = dsq.Simulator(2, cfg(compressor="sign"))
    out = sim.step([torch.randn(3, 4, dtype=torch.float64) for _ in range(2)])
    assert out.shape == (3, 4) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="expected 2 gradients"):
        sim.step([torch.randn(3, 4, dtype=torch.float64)])
    with pytest.raises(ValueError, match="one shape and dtype"):
        sim.step([torch.randn(3, 4, dtype=torch.float64), torch.randn(12, dtype=torch.float64)])
