"""`Simulator`: DoubleSqueeze with n workers and one parameter server, in one process, written straight from the
four lines of docs/ARCHITECTURE.md section 1, block by block. It is the reference the distributed code is checked against."""
from typing import List, Optional, Sequence, Tuple

import torch

from ..config import DoubleSqueezeConfig
from .seeding import DOWNLINK, UPLINK, derive_seed

__all__ = ["Simulator"]


class Simulator:
    """Single-process reference of the synchronous algorithm, for one tensor.

    The tensor (flattened, ``d`` elements) is cut into blocks of ``config.block_size`` elements (the last may be
    shorter); each block is compressed on its own by `Compressor.compress`, with the seed of (config seed, step,
    `key`, block, pass[, worker]): exactly what every distributed integration computes, whatever its buckets and
    world size. 16-bit gradients keep float32 residuals: ``v = g + e`` and the mean are float32, `v` is compressed
    as the gradients' dtype and each message counts as its decoding in that dtype.

    Args:
        num_workers: n.
        config: the `DoubleSqueezeConfig` (compressors, error-feedback switches, warm-up, min_numel, block size,
            seed).
        key: the tensor's name in the integration (it seeds random compressors).
        compressors: (worker, server) to use instead of the config's: any objects with ``compress(block, seed=)``,
            ``decompress(payload)``, ``lossless`` and ``seed_per_rank`` (tests pass references written in plain
            torch, so that the engine's compressors are checked too, not only its plumbing).
        residual_dtype: the dtype the residuals are kept in between rounds (default: the compensation's, float32
            for 16-bit gradients, else the gradients'); each new residual is computed in the compensation's dtype
            and then rounded to it.

    Attributes:
        worker_errors: the n worker residuals e_i; server_error: the server residual e (flat).
        steps, skipped_steps: rounds taken, and rounds skipped for a non-finite gradient.
    """

    def __init__(self, num_workers: int, config: Optional[DoubleSqueezeConfig] = None, key=0,
                 compressors: Optional[Tuple[object, object]] = None, residual_dtype: Optional[torch.dtype] = None):
        if num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.n = num_workers
        self.config = config or DoubleSqueezeConfig()
        if self.config.auto:
            raise ValueError("the Simulator needs a fixed compressor: under compressor='auto' the choice depends on "
                             "the job's own timings; simulate each candidate instead")
        self.key = key
        self.compressors = compressors or (self.config.worker, self.config.server)
        self.residual_dtype = residual_dtype
        self.worker_errors: List[torch.Tensor] = []
        self.server_error: Optional[torch.Tensor] = None
        self.steps = 0
        self.skipped_steps = 0

    def step(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """One round: per-worker gradients (same shape and dtype) -> the update c_t (that shape and dtype)."""
        if len(grads) != self.n:
            raise ValueError(f"expected {self.n} gradients, got {len(grads)}")
        shape, dtype = grads[0].shape, grads[0].dtype
        for g in grads:
            if g.shape != shape or g.dtype != dtype:
                raise ValueError(f"all gradients must have one shape and dtype: got {tuple(g.shape)} {g.dtype} "
                                 f"and {tuple(shape)} {dtype}")
        cfg, t = self.config, self.steps
        self.steps += 1
        flat = [g.detach().reshape(-1) for g in grads]
        d = flat[0].numel()
        acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        kept = self.residual_dtype or acc
        if not self.worker_errors:
            self.worker_errors = [torch.zeros(d, dtype=kept) for _ in range(self.n)]
            self.server_error = torch.zeros(d, dtype=kept)
        if any(not torch.isfinite(g).all() for g in flat):
            self.skipped_steps += 1
            return torch.full(shape, float("nan"), dtype=dtype)
        if t < cfg.warmup_steps or d < cfg.min_numel:
            return (sum(flat[1:], flat[0].clone()) / self.n).view(shape)

        (wc, sc), B = self.compressors, cfg.block_size
        blocks = [(a, min(d, a + B)) for a in range(0, d, B)]

        def compress(comp, x, direction, worker):
            out, x = torch.empty_like(x), x.to(dtype)
            for b, (lo, hi) in enumerate(blocks):
                rank = worker if (direction == UPLINK and comp.seed_per_rank) else -1
                seed = derive_seed(cfg.seed, t, self.key, b, direction, rank)
                out[lo:hi] = comp.decompress(comp.compress(x[lo:hi], seed=seed))
            return out

        cs = []
        for i in range(self.n):
            g = flat[i].to(acc)
            v = g + self.worker_errors[i].to(acc) if cfg.worker_ef else g
            c = compress(wc, v, UPLINK, i)
            if cfg.worker_ef and not wc.lossless:
                self.worker_errors[i] = (v - c).to(kept)
            cs.append(c)
        mean = cs[0].clone()
        for c in cs[1:]:
            mean += c
        mean /= self.n
        v = mean + self.server_error.to(acc) if cfg.server_ef else mean
        c = compress(sc, v, DOWNLINK, -1)
        if cfg.server_ef and not sc.lossless:
            self.server_error = (v - c).to(kept)
        return c.to(dtype).view(shape)
