"""How a flat bucket of `numel` elements is split into one contiguous shard per rank."""
from typing import List, Tuple

__all__ = ["shard_bounds"]


def shard_bounds(numel: int, world_size: int) -> List[Tuple[int, int]]:
    """[(start, end), ...] for each rank: the first `numel % world_size` shards get one element more.
    Shards may be empty when `numel < world_size`."""
    base, extra = divmod(numel, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        end = start + base + (1 if r < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds
