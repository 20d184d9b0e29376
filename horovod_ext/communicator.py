"""The core's `Communicator` on Horovod: byte buffers through `hvd.alltoall_async`, `hvd.allgather_async` and
`hvd.allreduce_async_`. Horovod's background thread moves the bytes; `Pending.wait()` synchronises the handle and
checks that every rank sent what this one expected.
"""
from typing import List, Optional

import horovod.torch as hvd
import torch

from dsq_plugins.engine.communicator import Communicator, Pending

__all__ = ["HorovodCommunicator"]


class HorovodCommunicator(Communicator):
    """Byte-level collectives over the Horovod processes of `process_set` (default: all; `hvd.init()` must have
    run). Every byte counted by the core is a byte Horovod moves: uneven sizes go as they are (Horovod's alltoall
    takes per-rank splits and its allgather takes uneven first dimensions). Collectives are matched across ranks by
    name, so they may be issued from any thread in any order."""

    def __init__(self, process_set=None):
        if not hvd.is_initialized():
            raise RuntimeError("Horovod is not initialised: call horovod.torch.init() first")
        self.process_set = hvd.global_process_set if process_set is None else process_set
        if not self.process_set.included():
            raise ValueError(f"rank {hvd.rank()} is not in the process set {self.process_set}")
        self.rank = self.process_set.rank()
        self.size = self.process_set.size()
        self._prefix = "" if self.process_set == hvd.global_process_set else f"ps{self.process_set.process_set_id}."

    @staticmethod
    def _pending(handle, what: str, expected: List[int], all_to_all: bool, out: Optional[torch.Tensor]) -> Pending:
        def wait():
            result = hvd.synchronize(handle)
            got = None
            if all_to_all:
                result, got = result
                got = got.tolist()
            if result.numel() != sum(expected) or (got is not None and got != list(expected)):
                raise RuntimeError(f"{what}: received {got if got is not None else result.numel()} bytes per rank, "
                                   f"expected {list(expected)}: the ranks disagree on the tensors of this group "
                                   f"(shapes, dtypes or order)")
            if out is None:
                return result
            out.copy_(result)
            return out
        return Pending(wait)

    def all_to_all_async(self, send, send_sizes, recv_sizes, out=None, name=None):
        splits = torch.tensor(send_sizes, dtype=torch.int32)
        handle = hvd.alltoall_async(send, splits=splits, name=self._name(name), process_set=self.process_set)
        return self._pending(handle, f"all_to_all {name or ''}".strip(), recv_sizes, True, out)

    def all_gather_async(self, send, sizes, out=None, name=None):
        if send.numel() != sizes[self.rank]:
            raise ValueError(f"all_gather: this rank sends {send.numel()} bytes, sizes[{self.rank}] says "
                             f"{sizes[self.rank]}")
        handle = hvd.allgather_async(send, name=self._name(name), process_set=self.process_set)
        return self._pending(handle, f"all_gather {name or ''}".strip(), [sum(sizes)], False, out)

    def all_reduce_sum_async(self, tensor, name=None):
        handle = hvd.allreduce_async_(tensor, op=hvd.Sum, name=self._name(name), process_set=self.process_set)
        return Pending(lambda: hvd.synchronize(handle))

    def _name(self, name: Optional[str]) -> Optional[str]:
        return None if name is None else self._prefix + name
