"""`ThreadWorld`: W ranks in one process, one thread each, over an in-process `Communicator`.

It runs the real engine with many ranks where there is one device (a single GPU: NCCL refuses two ranks on one GPU)
or no process group at all (tests, the memory benchmark at W = 64). Every collective is a rendezvous of all W
threads: each deposits what it sends, all wait at a barrier, each takes what is addressed to it, all wait again.
Collectives complete when issued; their `Pending` is already done.
"""
import threading
from typing import Callable, List

import torch

from .communicator import Communicator, Pending

__all__ = ["ThreadWorld", "ThreadCommunicator"]


class ThreadWorld:
    """The shared mailbox of W thread-ranks. `run(fn)` calls ``fn(communicator)`` on W threads and returns the
    W results (re-raising the first error)."""

    def __init__(self, world_size: int, timeout: float = 120.0):
        self.size = world_size
        self._barrier = threading.Barrier(world_size, timeout=timeout)
        self._slots: List[object] = [None] * world_size

    def communicator(self, rank: int) -> "ThreadCommunicator":
        return ThreadCommunicator(self, rank)

    def exchange(self, rank: int, value, take: Callable[[list], object]):
        """Deposit `value`, and once every rank has, return ``take(all deposits)``."""
        self._slots[rank] = value
        self._barrier.wait()
        try:
            return take(list(self._slots))
        finally:
            self._barrier.wait()

    def run(self, fn: Callable[["ThreadCommunicator"], object]) -> list:
        results, errors = [None] * self.size, []

        def body(r):
            try:
                results[r] = fn(self.communicator(r))
            except BaseException as e:      # a failing rank breaks the barrier for the others
                errors.append(e)
                self._barrier.abort()

        threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}") for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class ThreadCommunicator(Communicator):
    """Rank `rank` of a `ThreadWorld`; buffers stay on their device."""

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank, self.size = world, rank, world.size

    def all_to_all_async(self, send, send_sizes, recv_sizes, out=None, name=None):
        pieces = list(send.split(send_sizes))
        me = self.rank

        def take(deposits):
            got = [d[me] for d in deposits]
            if [g.numel() for g in got] != list(recv_sizes):
                raise RuntimeError(f"all_to_all: rank {me} expected {list(recv_sizes)} bytes, got "
                                   f"{[g.numel() for g in got]}")
            return torch.cat(got)
        result = self.world.exchange(me, pieces, take)
        if out is None:
            return Pending.done(result)
        out.copy_(result)
        return Pending.done(out)

    def all_gather_async(self, send, sizes, out=None, name=None):
        result = self.world.exchange(self.rank, send, lambda deposits: torch.cat(deposits))
        if result.numel() != sum(sizes):
            raise RuntimeError(f"all_gather: expected {sum(sizes)} bytes, got {result.numel()}")
        if out is None:
            return Pending.done(result)
        out.copy_(result)
        return Pending.done(out)

    def all_reduce_sum_async(self, tensor, name=None):
        def take(deposits):
            total = deposits[0].clone()
            for d in deposits[1:]:
                total += d
            return total
        total = self.world.exchange(self.rank, tensor, take)
        tensor.copy_(total)
        return Pending.done(tensor)
