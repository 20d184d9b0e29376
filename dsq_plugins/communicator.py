"""The three collectives the double pass needs, on byte buffers. The core speaks only to this interface; the
Horovod and DeepSpeed integrations provide their own implementations."""
from typing import List

import torch
import torch.distributed as dist

__all__ = ["Communicator", "TorchDistributedCommunicator"]


class Communicator:
    """Byte-level collectives over `size` ranks. Buffers are 1-D uint8 tensors; every size is in bytes."""

    rank: int
    size: int

    def all_to_all(self, send: torch.Tensor, send_sizes: List[int], recv_sizes: List[int]) -> torch.Tensor:
        """Send `send[off_j : off_j + send_sizes[j]]` to rank j; return the concatenation, in rank order, of
        what each rank sent here (`recv_sizes[j]` bytes from rank j)."""
        raise NotImplementedError

    def all_gather(self, send: torch.Tensor, sizes: List[int]) -> torch.Tensor:
        """Every rank contributes `send` (`sizes[rank]` bytes); return all contributions in rank order."""
        raise NotImplementedError

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a dense tensor across ranks, in place; returns it."""
        raise NotImplementedError


class TorchDistributedCommunicator(Communicator):
    """`torch.distributed` collectives on a process group (any backend: gloo, nccl)."""

    def __init__(self, process_group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group "
                               "before creating a DoubleSqueezeState")
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)

    def all_to_all(self, send, send_sizes, recv_sizes):
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device)
        if self.size == 1:
            out.copy_(send)
        else:
            dist.all_to_all_single(out, send, recv_sizes, send_sizes, group=self.group)
        return out

    def all_gather(self, send, sizes):
        if self.size == 1:
            return send.clone()
        if len(set(sizes)) == 1:
            out = torch.empty(sum(sizes), dtype=torch.uint8, device=send.device)
            dist.all_gather(list(out.split(sizes)), send, group=self.group)
            return out
        # Gloo's all_gather needs equal sizes; an all-to-all of this rank's bytes to every rank moves the same
        # bytes (each rank sends its own `sizes[rank]` bytes to each of the others).
        return self.all_to_all(send.repeat(self.size), [send.numel()] * self.size, sizes)

    def all_reduce_sum(self, tensor):
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor
