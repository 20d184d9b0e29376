"""The three collectives the double pass needs, on byte buffers. The core speaks only to this interface; the
Horovod integration provides its own implementation.

Every collective is asynchronous: it returns a `Pending` at once, whose `wait()` gives the received buffer. The
blocking forms are ``op(...).wait()``. Buffers live on the caller's device (CPU for gloo, CUDA for NCCL); `out`,
where given, is where the received bytes go (a buffer reused from step to step).
"""
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

__all__ = ["Communicator", "Pending", "TorchDistributedCommunicator", "ProcessGroupUnavailable"]

# torch 2.13 renamed all_gather_into_tensor (older releases, e.g. the GPU machine's 2.11, have only that name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class ProcessGroupUnavailable(RuntimeError):
    pass


class Pending:
    """A collective in flight: `wait()` returns its result (and re-raises its error)."""

    def __init__(self, wait: Callable[[], torch.Tensor]):
        self._wait, self._done, self._value = wait, False, None

    def wait(self) -> torch.Tensor:
        if not self._done:
            self._value, self._done = self._wait(), True
        return self._value

    @staticmethod
    def done(value: torch.Tensor) -> "Pending":
        p = Pending(lambda: value)
        p.wait()
        return p


class Communicator:
    """Byte-level collectives over `size` ranks. Buffers are 1-D uint8 tensors; every size is in bytes."""

    rank: int
    size: int

    def all_to_all_async(self, send: torch.Tensor, send_sizes: List[int], recv_sizes: List[int],
                         out: Optional[torch.Tensor] = None, name: Optional[str] = None) -> Pending:
        """Send `send[off_j : off_j + send_sizes[j]]` to rank j; the result is the concatenation, in rank order,
        of what each rank sent here (`recv_sizes[j]` bytes from rank j)."""
        raise NotImplementedError

    def all_gather_async(self, send: torch.Tensor, sizes: List[int], out: Optional[torch.Tensor] = None,
                         name: Optional[str] = None) -> Pending:
        """Every rank contributes `send` (`sizes[rank]` bytes); the result is all contributions in rank order."""
        raise NotImplementedError

    def all_reduce_sum_async(self, tensor: torch.Tensor, name: Optional[str] = None) -> Pending:
        """Sum a dense tensor across ranks, in place; the result is the tensor."""
        raise NotImplementedError

    # blocking forms
    def all_to_all(self, send, send_sizes, recv_sizes, out=None):
        return self.all_to_all_async(send, send_sizes, recv_sizes, out).wait()

    def all_gather(self, send, sizes, out=None):
        return self.all_gather_async(send, sizes, out).wait()

    def all_reduce_sum(self, tensor):
        return self.all_reduce_sum_async(tensor).wait()


class TorchDistributedCommunicator(Communicator):
    """`torch.distributed` collectives on a process group (any backend: gloo, nccl)."""

    def __init__(self, process_group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise ProcessGroupUnavailable(
                "torch.distributed is not initialised: call torch.distributed.init_process_group before the first "
                "communication (a DoubleSqueezeState may be built earlier; it binds its group at the first hook call)")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)

    def _work(self, work, value: torch.Tensor) -> Pending:
        def wait():
            work.wait()
            return value
        return Pending(wait)

    def all_to_all_async(self, send, send_sizes, recv_sizes, out=None, name=None):
        if out is None:
            out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
        if self.size == 1:
            out.copy_(send)
            return Pending.done(out)
        work = dist.all_to_all_single(out, send, recv_sizes, send_sizes, group=self.group, async_op=True)
        return self._work(work, out)

    def all_gather_async(self, send, sizes, out=None, name=None):
        if out is None:
            out = torch.empty(sum(sizes), dtype=torch.uint8, device=send.device)
        if self.size == 1:
            out.copy_(send)
            return Pending.done(out)
        if len(set(sizes)) == 1:
            work = _all_gather_single(out, send, group=self.group, async_op=True)
            return self._work(work, out)
        # Gloo's all_gather needs equal sizes; an all-to-all of this rank's bytes to every rank moves the same
        # bytes (each rank sends its own `sizes[rank]` bytes to each of the others).
        return self.all_to_all_async(send.repeat(self.size), [send.numel()] * self.size, sizes, out)

    def all_reduce_sum_async(self, tensor, name=None):
        if self.size == 1:
            return Pending.done(tensor)
        return self._work(dist.all_reduce(tensor, group=self.group, async_op=True), tensor)
