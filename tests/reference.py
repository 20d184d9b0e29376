"""Compressors written here in plain torch, for the Simulator (`Simulator(..., compressors=reference(spec))`), so
that the integration tests check the engine's compressors as well as its plumbing: the semantics
test_compressors.py states, one block at a time, with none of the library's code."""
import math

import torch


class Reference:
    """One block in, its compressed-then-decompressed value out (`compress` does both; `decompress` passes it on)."""

    seed_per_rank = False

    def __init__(self, fn, lossless=False):
        self.fn, self.lossless = fn, lossless

    def compress(self, x: torch.Tensor, seed=None) -> torch.Tensor:
        return self.fn(x)

    def decompress(self, y: torch.Tensor) -> torch.Tensor:
        return y


def sign(x: torch.Tensor) -> torch.Tensor:
    """The block's mean absolute value (float32), with each element's sign; sign(0) = sign(-0.0) = +1."""
    scale = (x.float().abs().sum() / x.numel()).to(x.dtype)
    return torch.where(x < 0, -scale, scale)


def topk(ratio: float):
    """The ceil(ratio * n) largest magnitudes kept as they are (ties: the lowest indices), the rest zero."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        k = max(1, math.ceil(ratio * x.numel()))
        mags = x.abs().tolist()
        keep = sorted(range(x.numel()), key=lambda i: (-mags[i], i))[:k]
        out = torch.zeros_like(x)
        out[keep] = x[keep]
        return out
    return fn


def reference(spec: str):
    """(worker, server) references for `spec` (the same on both passes)."""
    name, _, arg = spec.partition(":")
    fns = {"sign": lambda: sign, "topk": lambda: topk(float(arg))}
    if name not in fns or "+" in spec:
        raise KeyError(f"no plain-torch reference for {spec!r}")
    ref = Reference(fns[name]())
    return ref, ref
