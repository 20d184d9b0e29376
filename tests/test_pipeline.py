"""The bucket pipeline every adapter drives (`engine/pipeline.py`), with W thread-ranks in one process: the same
updates and residuals as the Simulator, step after step, with the worker passes on the communication thread (as
Horovod and DeepSpeed run them), across the end of warm-up; and its bucketing and copy-back helpers."""
import torch

import dsq_plugins as dsq
from dsq_plugins.engine.collective import DoubleSqueezeCollective
from dsq_plugins.engine.pipeline import BucketPipeline, grad_or_zeros, outputs_for, plan_buckets, write_back

from .engine_cases import SIZES, grads_of, make_config, simulate

BUCKETS = [["a", "b"], ["c", "d", "e"], ["f"]]


def test_pipeline_equals_simulator_across_warmup():
    """Three buckets per step, issued back to back, then `end_step`: a worker pass that ran after the step advanced
    would compress a warm-up step (or send a compressed one dense) and part from the Simulator."""
    world, steps = 2, 5
    config = make_config("sign", warmup_steps=2)

    def rank_main(comm):
        col = DoubleSqueezeCollective(config, comm, chunk_elements=128)
        pipe = BucketPipeline(col, begin_on_thread=True)
        updates = []
        for t in range(steps):
            g = grads_of(t, comm.rank, torch.float32)
            issued = [(keys, pipe.issue([(k, g[k]) for k in keys])) for keys in BUCKETS]
            closed = pipe.end_step()
            got = {}
            for keys, done in issued:
                got.update(zip(keys, (o.clone() for o in done.wait())))
            assert isinstance(closed.wait(), dsq.RoundStats)
            updates.append(got)
        pipe.stop()
        return updates, col

    ranks = dsq.ThreadWorld(world).run(rank_main)
    expected, sims = simulate(world, config, steps)
    for r, (updates, col) in enumerate(ranks):
        assert col.step == steps
        for t in range(steps):
            for k in SIZES:
                torch.testing.assert_close(updates[t][k], expected[t][k], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {r} step {t} {k}: {m}")
        for k, e in col.worker_residuals().items():
            torch.testing.assert_close(e, sims[k].worker_errors[r], rtol=1e-5, atol=1e-6)
    # warm-up steps travel dense, the others compressed: the counters say so
    totals = ranks[0][1].totals
    assert totals.dense_buckets == 2 * len(BUCKETS) and totals.compressed_buckets == 3 * len(BUCKETS)


def test_dense_bucket_is_averaged_without_waiting_for_the_next():
    """A bucket dense throughout (warm-up, auto's dense mode) has no downlink: its average is written as soon as its
    all-reduce has arrived, not behind the next bucket's reduction (which would put the division on the step's
    critical tail); its future still completes only in order. A compressed bucket waits for its downlink's finish,
    queued behind the next bucket."""
    world = 2
    config = make_config("sign", warmup_steps=1)

    def rank_main(comm):
        col = DoubleSqueezeCollective(config, comm, chunk_elements=128)
        pipe = BucketPipeline(col, begin_on_thread=False)
        seen = []
        for t in range(2):
            g = grads_of(t, comm.rank, torch.float32)
            raw = g["a"].clone()
            done = pipe.issue([("a", g["a"])])
            pipe.drain()                              # its all-reduce (or uplink) has arrived and been served
            seen.append((raw, g["a"].clone(), done.done()))
            pipe.issue([("f", g["f"])])
            pipe.end_step().wait()
            assert done.done()
        pipe.stop()
        return seen

    ranks = dsq.ThreadWorld(world).run(rank_main)
    for t in range(2):
        mean = sum(ranks[r][t][0] for r in range(world)) / world
        for r in range(world):
            raw, after_serve, completed = ranks[r][t]
            assert not completed                      # the future waits for the finish, in order
            if t == 0:                                # warm-up: dense, averaged in place already
                torch.testing.assert_close(after_serve, mean)
            else:                                     # sign: untouched until its downlink is decoded
                assert torch.equal(after_serve, raw)


def test_plan_buckets_by_size_dtype_and_device():
    f32 = [("a", torch.zeros(100)), ("b", torch.zeros(100)), ("c", torch.zeros(300)), ("d", torch.zeros(10))]
    mixed = f32[:2] + [("h", torch.zeros(100, dtype=torch.float16))] + f32[2:]
    limit = 800 / 2 ** 20                                   # 800 bytes: two 100-float tensors
    assert plan_buckets(f32, limit) == [[0, 1], [2], [3]]   # a larger tensor alone; the next opens a bucket
    assert plan_buckets(mixed, limit) == [[0, 1], [2], [3], [4]]   # fp16 in a bucket of its own


def test_zero_fill_outputs_and_write_back():
    p, q = torch.nn.Parameter(torch.ones(6)), torch.nn.Parameter(torch.ones(2, 3))
    q.grad = torch.ones(3, 2).t()                           # a non-contiguous gradient
    assert torch.equal(grad_or_zeros(p), torch.zeros(6)) and p.grad is not None
    grads = [p.grad, q.grad]
    outs = outputs_for(grads)
    assert outs[0].data_ptr() == p.grad.data_ptr() and outs[1].data_ptr() != q.grad.data_ptr()
    outs[0].copy_(torch.arange(6.0))
    outs[1].copy_(torch.arange(6.0))
    write_back(grads, outs, scale=2.0)
    assert torch.equal(p.grad, 2 * torch.arange(6.0))
    assert torch.equal(q.grad, 2 * torch.arange(6.0).view(2, 3))
