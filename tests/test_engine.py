"""The block-wise engine against the Simulator, with W ranks in one process (`ThreadWorld`).

Several tensors of awkward sizes (full blocks, tails, a tensor shorter than a block, one below `min_numel`) in
buckets of different layouts, 1 to 5 ranks, every compressor and baseline switch: every rank's updates equal the
Simulator's per tensor, the residuals equal the Simulator's, and the conservation law holds. Chunks of a few rows
make the chunked paths run on small tensors.
"""
import pytest
import torch

import dsq_plugins as dsq
from dsq_plugins.engine.collective import DoubleSqueezeCollective

from .engine_cases import SIZES, grads_of, make_config, run_world, simulate

SPECS = ["none", "fp16", "bf16", "sign", "topk:0.1", "randomk:0.25", "qsgd:4", "int8:16", "int4:16", "int2",
         "topk:0.1+int4", "topk:0.2+sign", "randomk:0.25+int2:8", "topk:0.2+qsgd:4", "grouptopk:0.3",
         "grouptopk:0.3+sign", "grouptopk:0.5+int4"]


def check_against_simulator(world, config, steps=5, dtype=torch.float32, tol=None, buckets=None, nan_at=None,
                            nan_key="b", residual_dtype=None):
    buckets = buckets or [["a", "b"], ["c", "d", "e"], ["f"]]
    ranks = run_world(world, config, steps, buckets, dtype, nan_at=nan_at, nan_key=nan_key,
                      residual_dtype=residual_dtype)
    nan_bucket = next(b for b in buckets if nan_key in b)
    expected, sims = simulate(world, config, steps, dtype, nan_at=nan_at, nan_bucket=nan_bucket,
                              residual_dtype=residual_dtype)
    rtol, atol = tol or ((1e-12, 1e-14) if dtype == torch.float64 else (1e-5, 1e-6))
    for r, (updates, col) in enumerate(ranks):
        for t in range(steps):
            for k in SIZES:
                torch.testing.assert_close(updates[t][k], expected[t][k], rtol=rtol, atol=atol, equal_nan=True,
                                           msg=lambda m: f"rank {r} step {t} tensor {k}: {m}")
        worker = col.worker_residuals()
        for k in SIZES:
            if k in worker:
                torch.testing.assert_close(worker[k], sims[k].worker_errors[r], rtol=rtol, atol=atol)
            else:
                assert not config.worker_ef or config.worker.lossless or SIZES[k] < config.min_numel or \
                    not torch.count_nonzero(sims[k].worker_errors[r])
    server = {k: [col.expand_server_residual(k, s, SIZES[k])
                  for _, col in ranks for kk, s in col.server_residuals().items() if kk == k] for k in SIZES}
    for k in SIZES:
        if server[k]:
            torch.testing.assert_close(sum(server[k]), sims[k].server_error, rtol=rtol, atol=atol)
        else:             # no rank keeps one: the Simulator's must be zero too (or absent: nothing compressed)
            assert sims[k].server_error is None or not torch.count_nonzero(sims[k].server_error), k
    return ranks, expected, sims


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_equals_simulator(spec, world):
    check_against_simulator(world, make_config(spec))


@pytest.mark.parametrize("spec", ["sign", "topk:0.1", "randomk:0.25", "qsgd:4", "topk:0.1+int4"])
def test_equals_simulator_five_ranks_fp64(spec):
    check_against_simulator(5, make_config(spec), dtype=torch.float64)


def check_conservation(ranks, world, steps, dtype=torch.float32, atol=1e-5, keys=SIZES):
    """sum_t c_t = sum_t mean_i g_i,t - mean_i e_i,T - e_T, per tensor, in float64 from the engine's own updates
    and residuals (rank 0's updates; every rank's residuals)."""
    for k in keys:
        n = SIZES[k]
        applied = sum(ranks[0][0][t][k].double() for t in range(steps))
        true = sum(sum(grads_of(t, r, dtype)[k].double() for r in range(world)) / world for t in range(steps))
        worker = sum(ranks[r][1].worker_residuals().get(k, torch.zeros(n)).double() for r in range(world)) / world
        server = sum(ranks[r][1].expand_server_residual(k, s, n).double()
                     for r in range(world) for kk, s in ranks[r][1].server_residuals().items() if kk == k)
        torch.testing.assert_close(applied, true - worker - server, rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec", ["sign", "int4:16", "topk:0.1+int4"])
def test_half_precision_gradients_keep_float32_residuals(spec, dtype):
    """16-bit gradients: the updates (in the gradients' dtype) and the residuals equal the Simulator's to float32
    precision, the residuals are float32, and the conservation law holds to float32 precision: residuals in the
    gradients' dtype would lose the rounding of every step, about 1e-3 of the values here."""
    world, steps = 2, 6
    ranks, _, _ = check_against_simulator(world, make_config(spec), steps=steps, dtype=dtype, tol=(1e-6, 1e-7))
    for updates, col in ranks:
        assert all(u.dtype == dtype for u in updates[-1].values())
        residuals = list(col.worker_residuals().values()) + list(col.server_residuals().values())
        assert residuals and all(e.dtype == torch.float32 for e in residuals)
    check_conservation(ranks, world, steps, dtype, atol=2e-6, keys=[k for k, n in SIZES.items() if n >= 16])


@pytest.mark.parametrize("spec", ["sign", "int4:16", "topk:0.1+int4"])
def test_residuals_kept_in_bfloat16(spec):
    """residual_dtype=bfloat16 (HSDP's memory option): the residuals are bfloat16, half the bytes of float32 ones;
    updates and residuals equal the Simulator's with its residuals kept in bfloat16 (each computed in float32 and
    rounded once), across bucket layouts that change from step to step, and differ from the float32 run's."""
    world, steps = 3, 6
    ranks, _, _ = check_against_simulator(world, make_config(spec), steps=steps, residual_dtype=torch.bfloat16)
    wide = run_world(world, make_config(spec), steps, [["a", "b"], ["c", "d", "e"], ["f"]])
    for (_, col), (_, ref) in zip(ranks, wide):
        residuals = list(col.worker_residuals().values()) + list(col.server_residuals().values())
        assert residuals and all(e.dtype == torch.bfloat16 for e in residuals)
        narrow, full = col.memory_report(), ref.memory_report()
        assert 2 * narrow["worker_residual"] == full["worker_residual"], (narrow, full)
        assert 2 * narrow["server_residual"] == full["server_residual"], (narrow, full)
        assert any(not torch.equal(e.float(), ref.worker_residuals()[k]) for k, e in col.worker_residuals().items())
    with pytest.raises(ValueError, match="residual_dtype"):
        DoubleSqueezeCollective(make_config(spec), residual_dtype=torch.int8)


@pytest.mark.parametrize("kw", [dict(worker_ef=False, server_ef=False), dict(server_ef=False),
                                dict(server_compressor="none"), dict(warmup_steps=2)],
                         ids=["no-ef", "worker-only", "dense-down", "warmup"])
def test_baselines_equal_simulator(kw):
    check_against_simulator(3, make_config("sign", **kw))


def test_conservation_law():
    world, steps = 3, 6
    config = make_config("sign")
    ranks, _, _ = check_against_simulator(world, config, steps=steps)
    check_conservation(ranks, world, steps)


@pytest.mark.parametrize("nan_key,warmup", [("b", 0), ("e", 0), ("b", 3), ("c", 3)],
                         ids=["compressed", "dense-in-mixed-bucket", "dense-bucket", "dense-bucket-tail"])
def test_non_finite_gradient_is_skipped_everywhere(nan_key, warmup):
    """A NaN on one rank skips its bucket on every rank: in a compressed message's header, in a mixed bucket's
    dense section, and in a bucket dense throughout (warm-up: all-reduced, its mean and check in one pass on the
    CPU fast path, two on the torch path)."""
    config = make_config("sign", warmup_steps=warmup)
    ranks, expected, sims = check_against_simulator(3, config, steps=4, nan_at=(2, 1), nan_key=nan_key)
    skipped = "ab" if nan_key == "b" else "cde"
    for updates, col in ranks:
        assert col.skipped_steps == 1 and col.totals.skipped == 1
        assert all(torch.isnan(updates[2][k]).all() for k in skipped)
        assert all(torch.isfinite(updates[2][k]).all() for k in SIZES if k not in skipped), \
            "only the bucket with the NaN is skipped"
        assert all(torch.isfinite(u).all() for t in (0, 1, 3) for u in updates[t].values())


@pytest.mark.parametrize("world", [2, 4])
def test_world_size_and_layout_do_not_change_the_update(world):
    """Block semantics: the same per-rank gradients give the Simulator's updates under any bucket layout (one
    bucket of everything, a bucket per tensor) and world size."""
    config = make_config("topk:0.1")
    expected, _ = simulate(world, config, 3)
    for layout in ([["a", "b", "c", "d", "e", "f"]], [["a"], ["b"], ["c"], ["d"], ["e"], ["f"]]):
        for r, (updates, _) in enumerate(run_world(world, config, 3, layout)):
            for t in range(3):
                for k in SIZES:
                    torch.testing.assert_close(updates[t][k], expected[t][k], rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"layout {layout} rank {r} step {t} {k}: {m}")


def test_bytes_are_what_the_collectives_move():
    """Per direction, the messages hold every block's payload (`Compressor.nbytes` of the block) once, plus an
    8-byte header per uplink message and fewer than 8 bytes of alignment padding per message."""
    config = make_config("sign")

    def rank_main(comm):
        col = DoubleSqueezeCollective(config, comm)
        g = grads_of(0, comm.rank, torch.float32)
        col.reduce([(k, g[k]) for k in ("a", "d")])
        return col.finish_step()
    s0, s1 = dsq.ThreadWorld(2).run(rank_main)
    sign = dsq.get_compressor("sign")
    blocks = sum(sign.nbytes(min(64, n - a), torch.float32) for n in (SIZES["a"], SIZES["d"]) for a in range(0, n, 64))
    up = s0.bytes_up_recv + s1.bytes_up_recv            # the message to rank j (from either rank) is M_j bytes
    assert 0 <= up - blocks - 2 * 8 < 2 * 8
    down = s0.bytes_down_sent + s1.bytes_down_sent
    assert 0 <= down - blocks < 2 * 8
    assert s0.bytes_up_sent == s1.bytes_up_recv and s1.bytes_up_sent == s0.bytes_up_recv
    assert s0.bytes_down_sent == s1.bytes_down_recv and s1.bytes_down_sent == s0.bytes_down_recv
    assert s0.dense_bytes == 4 * (SIZES["a"] + SIZES["d"])


def test_bad_input():
    config = make_config("sign")

    def rank_main(comm):
        col = DoubleSqueezeCollective(config, comm)
        with pytest.raises(ValueError, match="1-D"):
            col.reduce([("x", torch.zeros(3, 4))])
        with pytest.raises(ValueError, match="share a dtype"):
            col.reduce([("x", torch.zeros(30)), ("y", torch.zeros(30, dtype=torch.float64))])
        return True
    assert dsq.ThreadWorld(1).run(rank_main) == [True]
