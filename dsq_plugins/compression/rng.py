"""Counter-based random numbers in torch ops, the same on every device and in every process.

Random compressors (``randomk``, ``qsgd``) draw their numbers from a 32-bit seed per block and the element's
column in the block, through a hash (murmur3's 32-bit finaliser), never from a generator's state: so a block
compressed on rank 3 on a GPU and the same block compressed by the `Simulator` on the CPU draw the same numbers,
and a batch of blocks draws them in one pass. Everything is int64 arithmetic on values below 2**32, masked back to
32 bits after each product (the wrap-around of a signed 64-bit product keeps its low 32 bits right).

Seeds (docs/ARCHITECTURE.md section 3): a block's seed is ``step_seed(static, step)``, where ``static`` hashes (config seed,
tensor key, block, pass[, rank]) once per bucket layout (`static_seed`) and the step is mixed in with tensor ops.
"""
import zlib

import torch

__all__ = ["MASK32", "mix32", "mix32_", "static_seed", "step_seed", "step_seeds", "fold_seed", "uniform", "keys"]

MASK32 = 0xFFFFFFFF
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
_GOLDEN = 0x9E3779B1


def mix32(x: int) -> int:
    """murmur3's finaliser on a Python int below 2**32."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 13
    x = (x * _M2) & MASK32
    return x ^ (x >> 16)


def mix32_(x: torch.Tensor) -> torch.Tensor:
    """`mix32` of an int64 tensor of values below 2**32, elementwise, in place; returns it."""
    x.bitwise_xor_(x >> 16).mul_(_M1).bitwise_and_(MASK32)
    x.bitwise_xor_(x >> 13).mul_(_M2).bitwise_and_(MASK32)
    return x.bitwise_xor_(x >> 16)


def fold_seed(seed: int) -> int:
    """Any non-negative integer seed -> the 32-bit seed the hash takes."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"a seed is a non-negative integer, got {seed}")
    while seed > MASK32:
        seed = (seed & MASK32) ^ mix32(seed >> 32)
    return seed


def static_seed(base: int, key, block: int, direction: int, rank: int = -1) -> int:
    """The part of a block's seed that does not change from step to step: (config seed, tensor key, block index,
    pass, rank; -1 for seeds all ranks share)."""
    z = fold_seed(base)
    for part in (zlib.crc32(str(key).encode()), block, direction, rank + 1):
        z = mix32(z ^ mix32((part + _GOLDEN) & MASK32))
    return z


def step_seed(static: int, step: int) -> int:
    """The seed of a block at `step` (Python ints; `step_seeds` is the same on tensors)."""
    return mix32(static ^ _step_part(step))


def step_seeds(static: torch.Tensor, step: int) -> torch.Tensor:
    """`step_seed` of an int64 tensor of static seeds: a new tensor."""
    return mix32_(torch.bitwise_xor(static, _step_part(step)))


def _step_part(step: int) -> int:
    return mix32((fold_seed(step) * _GOLDEN + 0x7F4A7C15) & MASK32)


def _hashes(seeds: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols) int64 hashes of (seed of the row, column), each below 2**32."""
    col = torch.arange(cols, dtype=torch.int64, device=seeds.device).mul_(_GOLDEN).bitwise_and_(MASK32)
    mix32_(col)
    return mix32_(torch.bitwise_xor(seeds.reshape(-1, 1), col))


def uniform(seeds: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols) float32 uniform on [0, 1) with 24 random bits each, one row per seed."""
    return (_hashes(seeds, cols) >> 8).to(torch.float32).mul_(2.0 ** -24)


def keys(seeds: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, cols) int64 random sort keys, distinct within a row: the hash times `cols` plus the column. The
    `k` smallest keys of a row pick a uniformly random k-subset of its columns."""
    col = torch.arange(cols, dtype=torch.int64, device=seeds.device)
    return _hashes(seeds, cols).mul_(cols).add_(col)
