"""Seeds of the compressors' randomness, derived from where and when a block is compressed, so that every rank
agrees on them, a resumed run repeats them, and the Simulator reproduces them (the mixing lives in `rng`)."""
from ..compression import rng
from .kinds import Pass

__all__ = ["derive_seed", "UPLINK", "DOWNLINK"]

UPLINK, DOWNLINK = Pass.UP, Pass.DOWN


def derive_seed(base: int, step: int, key, block: int, direction: Pass, rank: int = -1) -> int:
    """The 32-bit seed of block `block` of tensor `key` at `step` in `direction`; `rank` is -1 for seeds all ranks
    share. The engine computes the same numbers as `rng.step_seeds` of `rng.static_seed` tables."""
    return rng.step_seed(rng.static_seed(base, key, block, direction, rank), step)
