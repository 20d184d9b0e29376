"""`BlockCodec`: a compressor applied block by block to whole tensors, for wires that carry one frame per tensor
(the asynchronous parameter server).

A tensor of ``d`` elements is cut into blocks of ``block_size`` elements exactly as the engine cuts it (DESIGN.md
section 3); its frame is the engine's message layout for one rank (`plan.WireLayout`, no header, no padding): per
field, the full blocks then the tail block. Its size is the sum of its blocks' `Compressor.nbytes`, and a dense
(``none``) frame is the tensor's raw bytes. Random compressors draw from the seeds of
(frame seed, block): the frame seed is context the sender puts in its message header. Encoding and decoding are
the compressor's batched `encode` / `decode` on the tensor's own device; only the frame bytes move to the host.
"""
from typing import Dict, Tuple

import torch

from . import rng
from .compressors import Compressor
from .plan import BucketPlan, WireLayout

__all__ = ["BlockCodec"]

_KEY = "tensor"


class BlockCodec:
    """`compressor` block by block over whole tensors. `spec` and `block_size` are what both ends agree on."""

    def __init__(self, compressor: Compressor, block_size: int = 4096):
        if block_size < 8 or block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}")
        self.compressor, self.block_size = compressor, block_size
        self.spec = compressor.spec
        self._layouts: Dict[Tuple, Tuple[BucketPlan, WireLayout, torch.Tensor]] = {}

    def _layout(self, numel: int, dtype: torch.dtype, device) -> Tuple[BucketPlan, WireLayout, torch.Tensor]:
        key = (numel, dtype, str(device))
        got = self._layouts.get(key)
        if got is None:
            plan = BucketPlan([_KEY], [numel], [False], dtype, device, 1, 0, self.block_size, 1 << 62)
            lay = plan.layout(self.compressor, "down", align=1)
            blocks = plan.R + plan.T
            static = torch.tensor([rng.static_seed(0, _KEY, b, 0) for b in range(blocks)], dtype=torch.int64,
                                  device=device)
            got = self._layouts[key] = (plan, lay, static)
        return got

    def nbytes(self, numel: int, dtype: torch.dtype) -> int:
        """Bytes of the frame of a tensor of `numel` elements of `dtype`."""
        if numel == 0:
            return 0
        return self._layout(numel, dtype, "cpu")[1].total

    def _seeds(self, static, plan, seed):
        if not self.compressor.uses_seed:
            return None, None
        s = rng.step_seeds(static, seed)
        return s[:plan.R], s[plan.R:]

    def encode(self, tensor: torch.Tensor, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(frame, decoded)``: the frame (uint8, on the tensor's device) and the tensor the receiver will decode
        from it (the tensor's shape and dtype)."""
        flat = tensor.detach().reshape(-1).contiguous()
        if flat.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=flat.device), tensor.detach().clone()
        plan, lay, static = self._layout(flat.numel(), flat.dtype, flat.device)
        comp, B, R = self.compressor, self.block_size, plan.R
        seeds_full, seeds_tail = self._seeds(static, plan, seed)
        frame = torch.zeros(lay.total, dtype=torch.uint8, device=flat.device)
        parts = []
        if R:
            x = flat[:R * B].view(R, B)
            fields = comp.encode(x, None, seeds_full)
            for k, f in enumerate(lay.fields):
                start = lay.full_off[0][k]
                frame[start:start + R * f.full * f.itemsize] = fields[f.name].contiguous().view(torch.uint8).view(-1)
            parts.append(comp.decode(fields, B, flat.dtype, None, seeds_full).reshape(-1))
        if plan.T:
            n, cap = int(plan.tail_lengths[0]), plan.cap
            x = flat.new_zeros(1, cap)
            x[0, :n] = flat[R * B:]
            lengths = plan.tail_lengths_t()
            fields = comp.encode(x, lengths, seeds_tail)
            for k, f in enumerate(lay.fields):
                count = int(f.tail[0])
                t = fields[f.name].to(f.dtype, copy=True)     # tails travel in the full rows' field types
                t[:, count:] = 0                            # the receiver sees zeros beyond the row's count
                fields[f.name] = t
                start = lay.tail_off[0][k]
                frame[start:start + count * f.itemsize] = t[0, :count].contiguous().view(torch.uint8)
            parts.append(comp.decode(fields, cap, flat.dtype, lengths, seeds_tail)[0, :n])
        return frame, torch.cat(parts).view(tensor.shape)

    def decode(self, frame: torch.Tensor, shape, dtype: torch.dtype, seed: int = 0, device=None) -> torch.Tensor:
        """The tensor of `shape` and `dtype` a frame holds, on `device` (default: the frame's)."""
        device = frame.device if device is None else torch.device(device)
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        plan, lay, static = self._layout(numel, dtype, device)
        if frame.numel() != lay.total:
            raise ValueError(f"a {self.spec} frame of a {tuple(shape)} {dtype} tensor is {lay.total} bytes, "
                             f"got {frame.numel()}")
        frame = frame.to(device)
        comp, B, R = self.compressor, self.block_size, plan.R
        seeds_full, seeds_tail = self._seeds(static, plan, seed)
        parts = []
        if R:
            fields = {}
            for k, f in enumerate(lay.fields):
                start = lay.full_off[0][k]
                fields[f.name] = _field(frame, start, R * f.full, f.dtype).view(R, f.full)
            parts.append(comp.decode(fields, B, dtype, None, seeds_full).reshape(-1))
        if plan.T:
            n = int(plan.tail_lengths[0])
            fields = {}
            for k, f in enumerate(lay.fields):
                count, start = int(f.tail[0]), lay.tail_off[0][k]
                t = torch.zeros(1, f.tail_cap, dtype=f.dtype, device=device)
                t[0, :count] = _field(frame, start, count, f.dtype)
                fields[f.name] = t
            parts.append(comp.decode(fields, plan.cap, dtype, plan.tail_lengths_t(), seeds_tail)[0, :n])
        return torch.cat(parts).view(shape)

    def finite(self, frame: torch.Tensor, numel: int, dtype: torch.dtype) -> bool:
        """Whether every floating-point field of the frame is finite. For the built-in compressors the decoded
        tensor is finite exactly when these fields are (sign: the scales; top-k: the values; int8: minima and
        steps; QSGD: the norms), and checking them costs a few elements instead of a pass over the tensor."""
        if numel == 0:
            return True
        plan, lay, _ = self._layout(numel, dtype, frame.device)
        for k, f in enumerate(lay.fields):
            if not f.dtype.is_floating_point:
                continue
            for start, count in ((lay.full_off[0][k], plan.R * f.full), (lay.tail_off[0][k], int(f.tail.sum()))):
                if count and not bool(torch.isfinite(_field(frame, start, count, f.dtype)).all()):
                    return False
        return True


def _field(frame: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` items of `dtype` at byte `start` of a frame: a view where aligned, else an aligned copy."""
    size = torch.empty((), dtype=dtype).element_size()
    piece = frame[start:start + count * size]
    if start % size or piece.data_ptr() % size:
        piece = piece.clone()
    return piece.view(dtype)
