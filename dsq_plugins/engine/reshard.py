"""Resuming a `DoubleSqueezeCollective` on another number of ranks, with the residuals' mass kept.

What the conservation law needs of the residuals (docs/ARCHITECTURE.md section 1) is their mass: the mean over
ranks of the worker residuals ``mean_i e_i`` and the server residual ``e``, each block of which lives with the
block's owner. From every rank's saved `state_dict` of a run on ``W`` ranks, `reshard_state_dicts` builds the state
of one rank of ``W'`` that holds the same mass:

* worker residual: every new rank's is the old mean, so the new mean is the old one;
* server residual: summed over the old owners (each holds its blocks, zero elsewhere), then cut into the blocks the
  new rank owns under ``W'`` (`plan.owned_blocks`): over the new ranks it sums to the same ``e``.

The step, the counters and the states of `auto` and the quality guard (the same decisions on every rank) come from
the old rank 0. The next update then delivers what the uninterrupted run would have delivered from the residuals;
only the split of the worker mass among ranks differs, which error feedback does not depend on.
"""
from typing import Dict, Hashable, List, Sequence

import torch

from .plan import expand_owned, owned_blocks

__all__ = ["reshard_state_dicts", "complete_run"]


def complete_run(saved: Sequence[dict]) -> List[dict]:
    """`saved` sorted by rank, after checking that it is every rank's state of one run under one config (a
    `state_dict` with ``rank``, ``world_size`` and ``config``); raises ValueError naming what is missing."""
    if not saved:
        raise ValueError("no DoubleSqueeze state to resume from")
    old = sorted(saved, key=lambda sd: sd.get("rank", -1))
    W0 = old[0].get("world_size")
    if [sd.get("rank") for sd in old] != list(range(len(old))) or W0 != len(old) or \
            any(sd.get("world_size") != W0 for sd in old):
        raise ValueError(f"need the states of every rank of one run: got ranks {[sd.get('rank') for sd in old]} "
                         f"of world sizes {sorted({sd.get('world_size') for sd in old})}")
    if any(sd.get("config") != old[0].get("config") for sd in old):
        raise ValueError("the saved ranks' states were written under different DoubleSqueeze configs")
    return old


def reshard_state_dicts(saved: Sequence[dict], world_size: int, rank: int) -> dict:
    """The state of rank `rank` of `world_size` ranks continuing the run whose every rank saved one of `saved`
    (`DoubleSqueezeCollective.state_dict()`, in any order). With as many ranks as saved it, that rank's own state
    (an exact resume); else the residuals are redistributed with their mass kept (module docstring). Raises
    ValueError if `saved` is not one complete run under one config."""
    old = complete_run(saved)
    W0 = len(old)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside a world of {world_size}")
    if W0 == world_size:
        return old[rank]
    numels: Dict[Hashable, int] = {}
    for sd in old:
        numels.update(sd.get("numels", {}))
        numels.update({k: w.numel() for k, w in sd["worker_residuals"].items()})
    block = old[0]["config"]["block_size"]

    worker_keys = sorted({k for sd in old for k in sd["worker_residuals"]}, key=str)
    worker = {}
    for key in worker_keys:
        parts = [sd["worker_residuals"].get(key) for sd in old]
        like = next(p for p in parts if p is not None)
        wide = torch.promote_types(like.dtype, torch.float32)       # summed in float32 at least (bf16 residuals)
        worker[key] = (sum(p.to(wide) if p is not None else torch.zeros_like(like, dtype=wide) for p in parts)
                       / W0).to(like.dtype)

    server = {}
    for key in sorted({k for sd in old for k in sd["server_residuals"]}, key=str):
        if key not in numels:
            raise ValueError(f"the saved states do not say how many elements tensor {key!r} has (saved by a version "
                             f"without 'numels'): its server residual cannot be redistributed")
        n = numels[key]
        full = None
        for r, sd in enumerate(old):
            compact = sd["server_residuals"].get(key)
            if compact is not None:
                part = expand_owned(key, compact, n, block, W0, r)
                full = part if full is None else full.add_(part)
        mine: List[torch.Tensor] = [full[a:b] for a, b in owned_blocks(key, n, block, world_size, rank)]
        server[key] = torch.cat(mine) if mine else full[:0].clone()
    return dict(old[0], world_size=world_size, rank=rank, worker_residuals=worker, server_residuals=server,
                numels=numels)
