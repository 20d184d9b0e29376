"""The engine's test cases, shared by tests/test_engine.py (CPU) and tests/test_gpu.py (CUDA; runs without pytest):
tensors of awkward sizes for blocks of 64, per-rank gradients, a run of W thread-ranks, and the Simulator's
answer for the same gradients."""
import torch

import dsq_plugins as dsq
from dsq_plugins.engine.collective import DoubleSqueezeCollective

SIZES = {"a": 1000, "b": 64 * 7, "c": 37, "d": 64 * 3 + 5, "e": 8, "f": 640}      # block size 64: tails, a full-only


def make_config(spec, **kw):
    kw.setdefault("min_numel", 16)
    kw.setdefault("block_size", 64)
    return dsq.DoubleSqueezeConfig(compressor=spec, **kw)


def grads_of(step, rank, dtype):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {k: (torch.randn(n, generator=g, dtype=torch.float64) * 0.1 + 0.01 * rank).to(dtype)
            for k, n in SIZES.items()}


def run_world(world, config, steps, buckets, dtype=torch.float32, chunk_elements=128, nan_at=None, device="cpu",
              nan_key="b", residual_dtype=None):
    """Every rank reduces `buckets` (lists of keys) each step, on `device`; returns per rank: updates by step and
    key (on the CPU), and the collective."""
    def rank_main(comm):
        col = DoubleSqueezeCollective(config, comm, chunk_elements=chunk_elements, residual_dtype=residual_dtype)
        updates = []
        for t in range(steps):
            g = grads_of(t, comm.rank, dtype)
            if nan_at == (t, comm.rank):
                g[nan_key][3] = float("nan")
            g = {k: v.to(device) for k, v in g.items()}
            got = {}
            layout = buckets if t % 2 == 0 else [sum(buckets, [])]        # the layout changes between steps
            for keys in layout:
                outs = col.reduce([(k, g[k]) for k in keys])
                got.update(zip(keys, (o.cpu() for o in outs)))
            col.finish_step()
            updates.append(got)
        return updates, col
    return dsq.ThreadWorld(world).run(rank_main)


def simulate(world, config, steps, dtype=torch.float32, nan_at=None, nan_bucket=("a", "b"), residual_dtype=None):
    """Per tensor; a non-finite gradient skips its whole bucket (`nan_bucket`): the Simulator sees it in each."""
    sims = {k: dsq.Simulator(world, config, key=k, residual_dtype=residual_dtype) for k in SIZES}
    updates = []
    for t in range(steps):
        per_rank = [grads_of(t, r, dtype) for r in range(world)]
        if nan_at is not None and nan_at[0] == t:
            for k in nan_bucket:
                per_rank[nan_at[1]][k][3] = float("nan")
        updates.append({k: sims[k].step([per_rank[r][k] for r in range(world)]) for k in SIZES})
    return updates, sims
