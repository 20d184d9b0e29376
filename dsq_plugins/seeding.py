"""Seeds for the compressors' randomness, derived from where and when a tensor is compressed, so that every
rank agrees on them, a resumed run repeats them, and the Simulator can reproduce them."""
import zlib

__all__ = ["derive_seed", "UPLINK", "DOWNLINK"]

UPLINK, DOWNLINK = 0, 1
_MASK = (1 << 64) - 1


def _mix(z: int) -> int:
    # splitmix64 finaliser
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def derive_seed(base: int, step: int, key, shard: int, direction: int, rank: int = -1) -> int:
    """A 62-bit seed for compressing shard `shard` of bucket `key` at `step` in `direction`; `rank` is -1 for
    seeds all ranks share."""
    h = zlib.crc32(str(key).encode())
    z = base
    for part in (step, h, shard, direction, rank + 1):
        z = _mix(z ^ (part & _MASK))
    return z >> 2
