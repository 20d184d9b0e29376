"""DoubleSqueeze as a PyTorch DDP communication hook, overlapped with backward.

Example::

    state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="sign"))   # before or after init_process_group
    ddp_model.register_comm_hook(state, dsq.doublesqueeze_hook)
    ...
    torch.save(state.state_dict(), f"dsq_rank{rank}.pt")    # every rank saves its own residuals

The hook replaces DDP's all-reduce of a gradient bucket by the double pass of `DoubleSqueezeCollective` over the
bucket's parameters, block by block: ``C_w(g_i + e_i)`` goes up to each block's owner, the owners average and send
down ``C_s(mean + e)``, and DDP receives the result as the averaged gradient (DESIGN.md sections 1 and 6).

Overlap: the hook runs the worker pass and issues the uplink (on the process group), then returns a future at
once; the state's communication thread serves the buckets in the order they were issued (server pass, downlink on
a second process group), decodes each one's downlink once the next one has been served, and completes each
future, while backward goes on. The state
binds its process group at the first hook call, so it can be built before ``init_process_group`` (Lightning's
``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` and Accelerate do that), as `PowerSGDState` can.

Compression and residuals are per parameter and block, so DDP's bucket layout (which it rebuilds after the first
iteration, and which a resumed process starts afresh) does not change the result. Parameters are numbered in the
order the hook first sees them (DDP's initial bucket order: the same in every process for the same model and DDP
arguments); residuals, seeds and `state_dict` use that number.
"""
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..engine.collective import DoubleSqueezeCollective
from ..engine.communicator import TorchDistributedCommunicator
from ..config import DoubleSqueezeConfig
from ..monitoring.monitor import Monitor
from ..engine.pipeline import CommThread

__all__ = ["DoubleSqueezeState", "doublesqueeze_hook"]

_FORMAT = "dsq-ddp-2"


class DoubleSqueezeState(DoubleSqueezeCollective):
    """State of the DDP hook: the collective on a `torch.distributed` process group, parameter numbers, and the
    communication thread.

    Args:
        config: a `DoubleSqueezeConfig` (default: ``sign`` on both passes with both residuals).
        process_group: the group to communicate in (default: the world), taken at the first hook call.
        monitor: optional `Monitor` (e.g. `TensorBoardMonitor`).
    """

    def __init__(self, config: Optional[DoubleSqueezeConfig] = None, process_group=None,
                 monitor: Optional[Monitor] = None):
        super().__init__(config or DoubleSqueezeConfig(), None, monitor)
        self.process_group = process_group
        self._numbers: Dict[int, int] = {}       # id(param) -> parameter number
        self._params: List[torch.Tensor] = []     # by number; keeps them alive so that ids stay unique
        self._thread: Optional[CommThread] = None
        self._down_comm = None
        self._pending_sd: Optional[dict] = None
        self._unfinished = None                  # (exchange, its serve future, bucket future, buffer): not yet decoded

    # -- the process groups --------------------------------------------------------------------------------
    def bind_process_group(self) -> None:
        """Take the process group (and make the downlink's twin group) if not done yet. Called by the hook;
        every rank of the group reaches it at its first hook call."""
        if self.bound:
            return
        up = TorchDistributedCommunicator(self.process_group)
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        backend = dist.get_backend(self.process_group)
        down_group = dist.new_group(ranks, backend=backend, use_local_synchronization=True) if up.size > 1 else None
        self.bind(up)
        self._down_comm = TorchDistributedCommunicator(down_group) if down_group is not None else up
        self._thread = CommThread()
        if self._pending_sd is not None:
            sd, self._pending_sd = self._pending_sd, None
            super().load_state_dict(sd)

    @property
    def down_comm(self):
        return self._down_comm or self.comm

    def __getstate__(self):
        """Pickles like PowerSGD's state: the config and this rank's state, without the process group, the
        monitor, the thread or the parameter objects (renumbered, in the same order, by the first backward)."""
        sd = self._pending_sd if not self.bound else dict(self.state_dict())
        return {"config": self.config, "process_group": None, "sd": sd, "chunk_elements": self.chunk_elements}

    def __setstate__(self, state):
        self.__init__(state["config"])
        self.chunk_elements = state["chunk_elements"]
        if state["sd"] is not None:
            self.load_state_dict(state["sd"])

    def __del__(self):
        if getattr(self, "_thread", None) is not None:
            self._thread.stop()

    # -- parameters ----------------------------------------------------------------------------------------
    def parameter_numbers(self, params) -> List[int]:
        numbers = []
        for p in params:
            n = self._numbers.get(id(p))
            if n is None:
                n = self._numbers[id(p)] = len(self._params)
                self._params.append(p)
            numbers.append(n)
        return numbers

    def describe_key(self, key) -> str:
        """A parameter's number and shape, for warnings and TensorBoard tags (DDP's hook sees no names)."""
        if isinstance(key, int) and key < len(self._params):
            return f"param{key}{list(self._params[key].shape)}".replace(" ", "")
        return str(key)

    def parameter_residuals(self):
        """[(parameter, worker residual or None, server residual or None), ...], flat, of the parameter's
        size. The server residual holds this rank's owned blocks (zero elsewhere): summed over ranks it is `e`."""
        worker, server = self.worker_residuals(), self.server_residuals()
        result = []
        for n, p in enumerate(self._params):
            s = server.get(n)
            result.append((p, worker.get(n), None if s is None else self.expand_server_residual(n, s, p.numel())))
        return result

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Residuals (by parameter number) + step + counters + config, for this rank."""
        if not self.bound:
            if self._pending_sd is not None:
                return self._pending_sd
            self.bind_process_group()
        self.drain()
        return dict(super().state_dict(), format=_FORMAT)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a DoubleSqueezeState.state_dict() of this version (format {sd.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        if not self.bound:
            if not dist.is_available() or not dist.is_initialized():
                self._pending_sd = sd            # checked and applied when the process group is bound
                return
            self.bind_process_group()
        self.drain()
        super().load_state_dict(sd)

    def drain(self) -> None:
        """Wait until every bucket handed to the communication thread is done."""
        if self._thread is not None:
            self._thread.drain()

    def submit(self, fn, device) -> torch.futures.Future:
        return self._thread.submit(fn, device if device.type == "cuda" else None)

    @staticmethod
    def new_future(device) -> torch.futures.Future:
        """A future for a bucket: CUDA-aware on a GPU (its waiters wait for the stream work behind its value)."""
        return torch.futures.Future(devices=[device]) if device.type == "cuda" else torch.futures.Future()


def doublesqueeze_hook(state: DoubleSqueezeState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients -> their DoubleSqueeze average over the process group.

    Math (per block, see `DoubleSqueezeCollective`): returns ``C_s(mean_i C_w(g_i + e_i) + e)`` of every block and
    updates ``e_i`` and ``e``, so nothing the compressors drop is lost. The step advances after the last bucket of
    each backward pass. The hook itself only compresses and issues the uplink; the state's communication thread
    serves the bucket (server pass, downlink issued) as soon as its uplink has arrived and, once the next bucket
    has been served too, decodes the downlink into the bucket and completes the future: a bucket's downlink
    travels while the next bucket's uplink does.
    """
    state.bind_process_group()
    params = bucket.parameters()
    flat = bucket.buffer()
    items = list(zip(state.parameter_numbers(params), flat.split([p.numel() for p in params])))
    ex = state.begin(items, flat=flat)
    future = state.new_future(flat.device)
    served = state.submit(lambda: state.serve(ex), flat.device)
    previous, state._unfinished = state._unfinished, (ex, served, future, flat)
    if previous is not None:
        state.submit(_finisher(state, *previous), flat.device)
    if bucket.is_last():
        state.step += 1          # this backward's step is ex.step; the next backward's buckets are the next step
        state._unfinished = None
        state.submit(_finisher(state, ex, served, future, flat, close=True), flat.device)
    return future


def _finisher(state: DoubleSqueezeState, ex, served, future, flat, close: bool = False):
    def finish():
        try:
            served.wait()        # re-raises an error of the server pass
            state.end(ex)        # the averages overwrite the bucket, as all-reduce does
            if close:
                state.close_step(ex.step)
        except BaseException as e:
            future.set_exception(e)
            raise
        future.set_result(flat)
    return finish
