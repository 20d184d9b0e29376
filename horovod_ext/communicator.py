"""The core's `Communicator` on Horovod: byte buffers through `hvd.alltoall` and `hvd.allgather`.

Besides the blocking collectives the core needs, it offers `all_to_all_async` / `all_gather_async`, which
return a `Pending` at once: Horovod's background thread moves the bytes while backward goes on.
"""
from typing import List, Optional

import horovod.torch as hvd
import torch

from dsq_plugins.communicator import Communicator

__all__ = ["HorovodCommunicator", "Pending"]


class Pending:
    """A Horovod collective in flight. `poll()` says whether it has finished; `wait()` returns the received
    bytes (a 1-D uint8 tensor) after checking that every rank sent what this one expected."""

    def __init__(self, handle: int, what: str, expected: List[int], all_to_all: bool):
        self.handle, self.what, self.expected, self._all_to_all = handle, what, expected, all_to_all

    def poll(self) -> bool:
        return hvd.poll(self.handle)

    def wait(self) -> torch.Tensor:
        out = hvd.synchronize(self.handle)
        if self._all_to_all:
            out, got = out
            got = got.tolist()
        else:
            got = None
        if out.numel() != sum(self.expected) or (got is not None and got != self.expected):
            raise RuntimeError(f"{self.what}: received {got if got is not None else out.numel()} bytes per rank, "
                               f"expected {self.expected}: the ranks disagree on the tensors of this group "
                               f"(shapes, dtypes or order)")
        return out


class HorovodCommunicator(Communicator):
    """Byte-level collectives over all Horovod processes (`hvd.init()` must have run). Every byte counted by
    the core is a byte Horovod moves: uneven sizes go as they are (Horovod's alltoall takes per-rank splits
    and its allgather takes uneven first dimensions)."""

    def __init__(self):
        if not hvd.is_initialized():
            raise RuntimeError("Horovod is not initialised: call horovod.torch.init() first")
        self.rank = hvd.rank()
        self.size = hvd.size()

    def all_to_all_async(self, send: torch.Tensor, send_sizes: List[int], recv_sizes: List[int],
                         name: Optional[str] = None) -> Pending:
        splits = torch.tensor(send_sizes, dtype=torch.int32)
        handle = hvd.alltoall_async(send, splits=splits, name=name)
        return Pending(handle, f"all_to_all {name or ''}".strip(), list(recv_sizes), all_to_all=True)

    def all_gather_async(self, send: torch.Tensor, sizes: List[int], name: Optional[str] = None) -> Pending:
        if send.numel() != sizes[self.rank]:
            raise ValueError(f"all_gather: this rank sends {send.numel()} bytes, sizes[{self.rank}] says "
                             f"{sizes[self.rank]}")
        handle = hvd.allgather_async(send, name=name)
        return Pending(handle, f"all_gather {name or ''}".strip(), [sum(sizes)], all_to_all=False)

    def all_to_all(self, send, send_sizes, recv_sizes):
        return self.all_to_all_async(send, send_sizes, recv_sizes).wait()

    def all_gather(self, send, sizes):
        return self.all_gather_async(send, sizes).wait()

    def all_reduce_sum(self, tensor):
        return hvd.allreduce_(tensor, op=hvd.Sum)
