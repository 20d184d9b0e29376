"""DoubleSqueeze as a PyTorch DDP communication hook.

Example::

    state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="sign"))
    ddp_model.register_comm_hook(state, dsq.doublesqueeze_hook)
    ...
    torch.save(state.state_dict(), f"dsq_rank{rank}.pt")    # every rank saves its own residuals

The hook replaces DDP's all-reduce of each gradient bucket by the double pass of `DoubleSqueezeCollective`:
the bucket's gradient ``g_i`` goes up as ``C_w(g_i + e_i)``, the shard owners average and send down
``C_s(mean + e)``, and the result is handed to DDP as the averaged gradient. Residuals are kept per bucket, and
moved through parameter space whenever DDP changes its bucket layout (its rebuild after the first iteration,
or a resume in a new process), so no residual is ever lost or misapplied.

Parameters are named by the order in which the hook first sees them (DDP's initial bucket order, which is the
same in every process for the same model and DDP arguments); `state_dict` stores residuals by that name.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .collective import DoubleSqueezeCollective
from .communicator import TorchDistributedCommunicator
from .config import DoubleSqueezeConfig
from .monitor import TensorBoardMonitor
from .sharding import shard_bounds

__all__ = ["DoubleSqueezeState", "doublesqueeze_hook"]


class DoubleSqueezeState(DoubleSqueezeCollective):
    """State of the DDP hook: the collective on a `torch.distributed` process group, plus the bucket layouts.

    Args:
        config: a `DoubleSqueezeConfig` (default: ``sign`` on both passes with both residuals).
        process_group: the group to communicate in (default: the world).
        monitor: optional `TensorBoardMonitor`.
    """

    def __init__(self, config: Optional[DoubleSqueezeConfig] = None, process_group=None,
                 monitor: Optional[TensorBoardMonitor] = None):
        super().__init__(config or DoubleSqueezeConfig(), TorchDistributedCommunicator(process_group), monitor)
        self.process_group = process_group
        self._param_ids: Dict[int, int] = {}        # id(param) -> stable parameter number
        self._params: List[torch.Tensor] = []        # keeps the parameters alive, so ids stay unique
        self._layouts: Dict[int, Tuple[Tuple[int, int], ...]] = {}   # bucket index -> ((param no., numel), ...)
        # Residuals waiting in parameter space for the bucket that will hold them: param no. -> flat tensor.
        # The server part holds only this rank's shards (zero elsewhere) until `_assemble` sums it over ranks.
        self._pending_worker: Dict[int, torch.Tensor] = {}
        self._pending_server: Dict[int, torch.Tensor] = {}
        self._pending_assembled = True

    def __getstate__(self):
        raise TypeError("DoubleSqueezeState holds a process group; save `state.state_dict()` instead")

    # -- bucket layouts ------------------------------------------------------------------------------------
    def layout_of(self, params) -> Tuple[Tuple[int, int], ...]:
        layout = []
        for p in params:
            pid = self._param_ids.get(id(p))
            if pid is None:
                pid = self._param_ids[id(p)] = len(self._params)
                self._params.append(p)
            layout.append((pid, p.numel()))
        return tuple(layout)

    def use_layout(self, index: int, layout, dtype: torch.dtype) -> None:
        """Make bucket `index` have `layout`; on a change, move every residual through parameter space."""
        old = self._layouts.get(index)
        if old == layout:
            return
        if old is not None:
            self._to_parameter_space()
        if self._pending_worker or self._pending_server:
            self._from_parameter_space(index, layout, dtype)
        self._layouts[index] = layout

    def _parameter_space(self):
        """(worker, server, assembled): every residual by parameter number, the pending ones included.
        Collective-free and non-mutating; the server part holds only this rank's shards unless assembled."""
        worker = dict(self._pending_worker)
        server = {k: v.clone() for k, v in self._pending_server.items()}
        assembled = self._pending_assembled
        for index, layout in self._layouts.items():
            w, s = self.worker_memory.get(index), self.server_memory.get(index)
            start, end = shard_bounds(sum(n for _, n in layout), self.world_size)[self.rank]
            offset = 0
            for pid, n in layout:
                if w is not None:
                    worker[pid] = w[offset:offset + n].clone()
                if s is not None:
                    piece = server.setdefault(pid, torch.zeros(n, dtype=s.dtype))
                    lo, hi = max(start, offset), min(end, offset + n)
                    if lo < hi:
                        piece[lo - offset:hi - offset] = s[lo - start:hi - start]
                    assembled = False
                offset += n
        return worker, server, assembled

    def _to_parameter_space(self) -> None:
        """Move all bucket-keyed residuals to parameter space and forget the bucket layouts."""
        self._pending_worker, self._pending_server, self._pending_assembled = self._parameter_space()
        for index in self._layouts:
            self.worker_memory.pop(index)
            self.server_memory.pop(index)
        self._layouts.clear()

    def _assemble(self) -> None:
        """Sum the owned-only server pieces over ranks: every rank then has the whole server residual."""
        if not self._pending_assembled:
            keys = sorted(self._pending_server)
            flat = torch.cat([self._pending_server[k].float() for k in keys])
            self.comm.all_reduce_sum(flat)
            for k, piece in zip(keys, flat.split([self._pending_server[k].numel() for k in keys])):
                self._pending_server[k] = piece.to(self._pending_server[k].dtype)
            self._pending_assembled = True

    def _from_parameter_space(self, index: int, layout, dtype: torch.dtype) -> None:
        numel = sum(n for _, n in layout)
        for pid, n in layout:
            for kind, pending in (("worker", self._pending_worker), ("server", self._pending_server)):
                if pid in pending and pending[pid].numel() != n:
                    raise ValueError(f"the {kind} residual of parameter #{pid} has {pending[pid].numel()} "
                                     f"elements but the parameter has {n}: the checkpoint is for another model")
        if any(pid in self._pending_worker for pid, _ in layout):
            self.worker_memory.set(index, torch.cat([
                self._pending_worker.pop(pid, torch.zeros(n, dtype=dtype)).to(dtype) for pid, n in layout]))
        if any(pid in self._pending_server for pid, _ in layout):
            self._assemble()
            start, end = shard_bounds(numel, self.world_size)[self.rank]
            full = torch.cat([self._pending_server.pop(pid, torch.zeros(n, dtype=dtype)).to(dtype)
                              for pid, n in layout])
            self.server_memory.set(index, full[start:end].clone())

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Residuals in parameter space + step + counters + config, for this rank."""
        worker, server, assembled = self._parameter_space()
        sd = super().state_dict()
        sd["worker_memory"] = {"enabled": self.worker_memory.enabled, "residuals": worker}
        sd["server_memory"] = {"enabled": self.server_memory.enabled, "residuals": server, "assembled": assembled}
        sd["format"] = "dsq-ddp-1"
        return sd

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != "dsq-ddp-1":
            raise ValueError("not a DoubleSqueezeState.state_dict() (missing format 'dsq-ddp-1')")
        self.check_compatible(sd)
        super().load_state_dict(dict(sd, worker_memory={"enabled": sd["worker_memory"]["enabled"], "residuals": {}},
                                     server_memory={"enabled": sd["server_memory"]["enabled"], "residuals": {}}))
        self._layouts.clear()
        self._pending_worker = {k: v.clone() for k, v in sd["worker_memory"]["residuals"].items()}
        self._pending_server = {k: v.clone() for k, v in sd["server_memory"]["residuals"].items()}
        self._pending_assembled = sd["server_memory"]["assembled"]


def doublesqueeze_hook(state: DoubleSqueezeState, bucket: dist.GradBucket) -> torch.futures.Future:
    """DDP communication hook: the bucket's gradient -> DoubleSqueeze average of it over the process group.

    Math (per bucket, see `DoubleSqueezeCollective`): returns ``concat_r C_s(mean_i C_w(g_i + e_i)[r] + e[r])``,
    updating ``e_i`` and ``e[r]`` so that nothing the compressors drop is lost. The step advances after the
    last bucket of each backward pass. The returned future is already completed (the passes run in the hook).
    """
    flat = bucket.buffer()
    state.use_layout(bucket.index(), state.layout_of(bucket.parameters()), flat.dtype)
    out = state.reduce(bucket.index(), flat)
    if bucket.is_last():
        state.finish_step()
    fut = torch.futures.Future()
    fut.set_result(out)
    return fut
