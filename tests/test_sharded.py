"""The sharded uplink (`engine.sharded.CompressedReduceScatter`, FSDP2's reduce-scatter) on 16-bit gradients, with
W ranks in one process (`ThreadWorld`), against a plain-torch reference: the compensation ``g + e`` and the residual
in float32, the compressor fed ``g + e`` rounded to the gradients' dtype."""
import pytest
import torch

import dsq_plugins as dsq
from dsq_plugins.compression.registry import get_compressor
from dsq_plugins.engine.sharded import CompressedReduceScatter
from dsq_plugins.monitoring.monitor import RoundStats

from .reference import sign

BLOCK, N, STEPS = 64, 300, 4          # rows of 300 elements: four full blocks and a tail


def grads(step: int, rank: int, world: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return (torch.randn(world * N, generator=g, dtype=torch.float64) * 0.1 + 0.01 * rank).to(dtype)


def blockwise(fn, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(b) for b in v.split(BLOCK)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("world", [2, 3])
def test_16bit_gradients_keep_a_float32_residual(world, dtype):
    """Every owner's reduced row and every rank's residual equal the reference's at every step; the residual is
    float32 and holds what a residual in the gradients' dtype would round away."""
    def rank_main(comm):
        up = CompressedReduceScatter(get_compressor("sign"), BLOCK, key=7)
        outs, residuals = [], []
        for t in range(STEPS):
            out = torch.empty(N, dtype=dtype)
            up(comm, grads(t, comm.rank, world, dtype), out, True, t, RoundStats())
            outs.append(out.clone())
            residuals.append(up.residual.clone())
        return outs, residuals
    ranks = dsq.ThreadWorld(world).run(rank_main)

    e = [torch.zeros(world, N) for _ in range(world)]
    for t in range(STEPS):
        g = [grads(t, i, world, dtype).view(world, N) for i in range(world)]
        sent = {}
        for i in range(world):
            for r in range(world):
                if r != i:
                    v = g[i][r].float() + e[i][r]
                    c = blockwise(sign, v.to(dtype))                 # decoded in the gradients' dtype
                    e[i][r] = v - c.float()
                    sent[i, r] = c
        for r in range(world):
            want = g[r][r].clone()
            for i in range(world):
                if i != r:
                    want += sent[i, r]
            want /= world
            torch.testing.assert_close(ranks[r][0][t], want, rtol=0, atol=0, msg=lambda m: f"owner {r} step {t}: {m}")
        for i in range(world):
            assert ranks[i][1][t].dtype == torch.float32
            torch.testing.assert_close(ranks[i][1][t], e[i], rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"rank {i} step {t}: {m}")
    # what the float32 residual keeps below the gradients' precision: rounded to it, the residual would lose it
    lost = max(float((e[i] - e[i].to(dtype).float()).abs().max()) for i in range(world))
    assert lost > 1e-4
