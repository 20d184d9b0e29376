"""DoubleSqueeze under FSDP2 (`dsq_plugins.fsdp`), for real: `fully_shard` units on 2 gloo ranks under torchrun,
checked step by step against a plain-torch model of the algorithm (tests/reference.py's block compressors, none
of the library's code) on a model whose gradients are known in closed form (tests/fsdp_worker.py)."""
import math

import pytest
import torch

from .conftest import ROOT, launch, load_ranks
from .fsdp_worker import A, LR, SHAPES, coefficients, initial
from .reference import sign

UNITS = {"<root>": ["own"], "a": ["a.w", "a.b"], "b": ["b.w"]}
BLOCK = 16
W = 2


def to_rows(tensors, world=W):
    """FSDP2's rank-major layout of a unit: each tensor padded on dim 0 to a multiple of W, row r = every
    tensor's r-th chunk, flattened and concatenated."""
    rows = [[] for _ in range(world)]
    for t in tensors:
        d0 = t.shape[0]
        padded = torch.zeros((math.ceil(d0 / world) * world, *t.shape[1:]))
        padded[:d0] = t
        for r, chunk in enumerate(padded.chunk(world)):
            rows[r].append(chunk.reshape(-1))
    return torch.stack([torch.cat(r) for r in rows])


def from_rows(rows, shapes, world=W):
    out, offset = [], 0
    for shape in shapes:
        c = math.ceil(shape[0] / world)
        per = c * math.prod(shape[1:])
        full = torch.cat([rows[r, offset:offset + per] for r in range(world)]).view(c * world, *shape[1:])
        out.append(full[:shape[0]])
        offset += per
    return out


def blockwise(fn, row):
    return torch.cat([fn(row[i:i + BLOCK]) for i in range(0, row.numel(), BLOCK)])


def int8(x):
    """Min-max quantization to 256 levels per 512 elements (one chunk per block here), round to nearest."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / 255
    if step == 0:
        return x.clone()
    return lo + torch.round((x - lo) / step).clamp(0, 255) * step


class Reference:
    """The algorithm of dsq_plugins/engine/sharded.py in plain torch, for every rank at once."""

    def __init__(self, downlink):
        self.downlink = downlink
        self.x = {u: to_rows([initial(n) for n in names]) for u, names in UNITS.items()}
        self.x_hat = {u: x.clone() for u, x in self.x.items()}
        self.e = {u: torch.zeros(W, *x.shape) for u, x in self.x.items()}
        # FSDP's padding takes no update: the optimizer sees the sharded parameters without it
        self.real = {u: to_rows([torch.ones(SHAPES[n]) for n in names]) for u, names in UNITS.items()}

    def used(self, u):
        if self.downlink == "delta":
            return self.x_hat[u]
        if self.downlink == "quantized":
            return torch.stack([blockwise(int8, row) for row in self.x[u]])
        return self.x[u]

    def step(self, t):
        """Step t: the gather (from step 1 on, the owners' deltas), the forward and backward on what was
        gathered, the reduce-scatter, SGD on the exact shards."""
        for u, names in UNITS.items():
            if self.downlink == "delta" and t > 0:
                for r in range(W):
                    self.x_hat[u][r] += blockwise(sign, self.x[u][r] - self.x_hat[u][r])
            shapes = [SHAPES[n] for n in names]
            used = from_rows(self.used(u), shapes)
            grads = [to_rows([A * p + coefficients(i, t, n) for p, n in zip(used, names)]) for i in range(W)]
            for r in range(W):
                total = grads[r][r].clone()
                for i in range(W):
                    if i != r:
                        v = grads[i][r] + self.e[u][i, r]
                        c = blockwise(sign, v)
                        self.e[u][i, r] = v - c
                        total += c
                self.x[u][r] -= LR * total / W * self.real[u][r]

    def params(self):
        out = {}
        for u, names in UNITS.items():
            out.update(zip(names, from_rows(self.x[u], [SHAPES[n] for n in names])))
        return out


@pytest.mark.parametrize("downlink,reshard", [("delta", False), ("delta", True), ("quantized", True),
                                              ("dense", False)])
def test_fsdp2_equals_plain_torch_reference(tmp_path, downlink, reshard):
    """Each step's parameters, each rank's worker residuals and (delta) the replicas every rank computes with
    equal the plain-torch reference; the forward used the replicas (delta) or the int8 parameters (quantized)."""
    steps = 5
    launch(W, ROOT / "tests" / "fsdp_worker.py",
           [tmp_path, "--downlink", downlink, "--steps", steps] + (["--reshard"] if reshard else []))
    ranks = load_ranks(tmp_path, W)
    ref = Reference(downlink)
    for t in range(steps):
        ref.step(t)
        for i, rank in enumerate(ranks):
            rec = rank["records"][t]
            assert rec["dsq_step"] == t + 1
            for name, p in ref.params().items():
                torch.testing.assert_close(rec["params"][name], p, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} {name}: {m}")
            for u in UNITS:
                expected = ref.e[u][i].clone()
                expected[i] = 0
                torch.testing.assert_close(rec["worker"][u], expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} worker residual of {u}: {m}")
                if downlink == "delta":
                    torch.testing.assert_close(rec["replicas"][u], ref.x_hat[u].view(-1), rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"step {t} rank {i} replica of {u}: {m}")
    # the conservation law of the downlink: exact parameters = replica + the owner's residual, and the residual
    # is not everything (the replicas moved)
    if downlink == "delta":
        for u in UNITS:
            assert not torch.equal(ref.x_hat[u], to_rows([initial(n) for n in UNITS[u]]))
