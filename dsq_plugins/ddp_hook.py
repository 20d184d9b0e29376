"""DoubleSqueeze as a PyTorch DDP communication hook.

Example::

    state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="sign"))
    ddp_model.register_comm_hook(state, dsq.doublesqueeze_hook)
    ...
    torch.save(state.state_dict(), f"dsq_rank{rank}.pt")    # every rank saves its own residuals

The hook replaces DDP's all-reduce of a gradient bucket by the double pass of `DoubleSqueezeCollective` over
the bucket's parameters: each gradient ``g_i`` goes up as ``C_w(g_i + e_i)`` (per shard), the shard owners
average and send down ``C_s(mean + e)``, and DDP receives the result as the averaged gradient.

Compression and residuals are per parameter, so DDP's bucket layout (which it rebuilds after the first
iteration, and which a resumed process starts afresh) does not change the result. Parameters are numbered in
the order the hook first sees them (DDP's initial bucket order: the same in every process for the same model
and DDP arguments); residuals, seeds and `state_dict` use that number.
"""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .collective import DoubleSqueezeCollective
from .communicator import TorchDistributedCommunicator
from .config import DoubleSqueezeConfig
from .monitor import Monitor
from .sharding import shard_bounds

__all__ = ["DoubleSqueezeState", "doublesqueeze_hook"]

_FORMAT = "dsq-ddp-1"


class DoubleSqueezeState(DoubleSqueezeCollective):
    """State of the DDP hook: the collective on a `torch.distributed` process group, and parameter numbers.

    Args:
        config: a `DoubleSqueezeConfig` (default: ``sign`` on both passes with both residuals).
        process_group: the group to communicate in (default: the world).
        monitor: optional `Monitor` (e.g. `TensorBoardMonitor`).
    """

    def __init__(self, config: Optional[DoubleSqueezeConfig] = None, process_group=None,
                 monitor: Optional[Monitor] = None):
        super().__init__(config or DoubleSqueezeConfig(), TorchDistributedCommunicator(process_group), monitor)
        self.process_group = process_group
        self._numbers: Dict[int, int] = {}       # id(param) -> parameter number
        self._params: List[torch.Tensor] = []     # by number; keeps them alive so that ids stay unique

    def __getstate__(self):
        """Pickles like PowerSGD's state: without the process group (the default group on unpickling), the
        monitor, or the parameter objects (renumbered, in the same order, by the first backward pass)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("comm", "process_group", "monitor")}
        state.update(_numbers={}, _params=[])
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.process_group = None
        self.monitor = None
        self.comm = TorchDistributedCommunicator(None)
        if (self.comm.rank, self.comm.size) != (state["rank"], state["world_size"]):
            raise ValueError(f"cannot unpickle a DoubleSqueezeState of rank {state['rank']} of "
                             f"{state['world_size']} into rank {self.comm.rank} of {self.comm.size}: residuals "
                             f"are per rank and per shard")

    def parameter_numbers(self, params) -> List[int]:
        numbers = []
        for p in params:
            n = self._numbers.get(id(p))
            if n is None:
                n = self._numbers[id(p)] = len(self._params)
                self._params.append(p)
            numbers.append(n)
        return numbers

    def parameter_residuals(self):
        """[(parameter, worker residual or None, server residual or None), ...], flat, of the parameter's
        size. The server residual holds this rank's shard (zero elsewhere): summed over ranks it is `e`."""
        result = []
        for n, p in enumerate(self._params):
            shard = self.server_memory.get(n)
            server = None
            if shard is not None:
                server = torch.zeros(p.numel(), dtype=shard.dtype)
                start, end = shard_bounds(p.numel(), self.world_size)[self.rank]
                server[start:end] = shard
            result.append((p, self.worker_memory.get(n), server))
        return result

    def state_dict(self) -> dict:
        """Residuals (by parameter number) + step + counters + config, for this rank."""
        return dict(super().state_dict(), format=_FORMAT)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a DoubleSqueezeState.state_dict() (missing format {_FORMAT!r})")
        super().load_state_dict(sd)


def doublesqueeze_hook(state: DoubleSqueezeState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients -> their DoubleSqueeze average over the process group.

    Math (per parameter, see `DoubleSqueezeCollective`): returns ``concat_r C_s(mean_i C_w(g_i + e_i)[r] + e[r])``
    and updates ``e_i`` and ``e[r]``, so nothing the compressors drop is lost. The step advances after the last
    bucket of each backward pass. The returned future is already completed (both passes run in the hook).
    """
    params = bucket.parameters()
    flat = bucket.buffer()
    items = list(zip(state.parameter_numbers(params), flat.split([p.numel() for p in params])))
    state.reduce(items, outs=[g for _, g in items])       # the averages overwrite the bucket, as all-reduce does
    if bucket.is_last():
        state.finish_step()
    fut = torch.futures.Future()
    fut.set_result(flat)
    return fut
