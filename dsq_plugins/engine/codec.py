"""`BlockCodec`: a compressor applied block by block to whole tensors, for wires that carry one frame per tensor
(the asynchronous parameter server).

A tensor of ``d`` elements is cut into blocks of ``block_size`` elements exactly as the engine cuts it (docs/ARCHITECTURE.md
section 3); its frame is the engine's message layout for one rank (`plan.WireLayout`, no header, no padding): per
field, the full blocks then the tail block. Its size is the sum of its blocks' `Compressor.nbytes`, and a dense
(``none``) frame is the tensor's raw bytes. Random compressors draw from the seeds of
(frame seed, block): the frame seed is context the sender puts in its message header. Encoding and decoding are
the compressor's batched `encode` / `decode` on the tensor's own device; only the frame bytes move to the host.
"""
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..compression import fastpath, kernels, rng
from ..compression.compressors import Compressor
from .kinds import Pass
from .plan import BucketPlan, WireLayout

__all__ = ["BlockCodec"]

_KEY = "tensor"
_NUMPY_FLOATS = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32),
                 torch.float64: np.dtype(np.float64)}


class BlockCodec:
    """`compressor` block by block over whole tensors. `spec` and `block_size` are what both ends agree on."""

    def __init__(self, compressor: Compressor, block_size: int = 4096):
        if block_size < 8 or block_size % 8:
            raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}")
        self.compressor, self.block_size = compressor, block_size
        self.spec = compressor.spec
        self._layouts: Dict[Tuple, Tuple[BucketPlan, WireLayout, torch.Tensor]] = {}
        self._float_regions: Dict[int, list] = {}       # id(layout) -> (byte start, items, dtype) per float field

    def _layout(self, numel: int, dtype: torch.dtype, device) -> Tuple[BucketPlan, WireLayout, torch.Tensor]:
        key = (numel, dtype, str(device))
        got = self._layouts.get(key)
        if got is None:
            plan = BucketPlan([_KEY], [numel], [False], dtype, device, 1, 0, self.block_size, 1 << 62)
            lay = plan.layout(self.compressor, Pass.DOWN, align=1)
            blocks = plan.R + plan.T
            static = torch.tensor([rng.static_seed(0, _KEY, b, Pass.UP) for b in range(blocks)], dtype=torch.int64,
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
        from it (the tensor's shape and dtype; for a lossless compressor it may share `tensor`'s memory)."""
        flat = tensor.detach().reshape(-1).contiguous()
        if flat.numel() == 0:
            return torch.empty(0, dtype=torch.uint8, device=flat.device), tensor.detach().clone()
        plan, lay, static = self._layout(flat.numel(), flat.dtype, flat.device)
        frame, full, tail = self._encode_fields(flat, plan, lay, static, seed)
        comp, B = self.compressor, self.block_size
        seeds_full, seeds_tail = self._seeds(static, plan, seed)
        parts = []
        if full is not None:
            parts.append(comp.decode(full, B, flat.dtype, None, seeds_full).reshape(-1))
        if tail is not None:
            n = int(plan.tail_lengths[0])
            parts.append(comp.decode(tail, plan.cap, flat.dtype, plan.tail_lengths_t(), seeds_tail)[0, :n])
        return frame, _joined(parts).view(tensor.shape)

    def _encode_fields(self, flat: torch.Tensor, plan, lay, static, seed: int, frame=None, full_blocks=True):
        """Compress `flat` into a frame: ``(frame, full_fields, tail_fields)`` (None where there is no such part).
        ``full_blocks=False``: `flat` is only the tail block's values, and the full blocks' bytes of the given
        `frame` are the caller's."""
        comp, B, R = self.compressor, self.block_size, plan.R
        seeds_full, seeds_tail = self._seeds(static, plan, seed)
        if frame is None:
            frame = torch.zeros(lay.total, dtype=torch.uint8, device=flat.device)
        full = tail = None
        if R and full_blocks:
            full = comp.encode(flat[:R * B].view(R, B), None, seeds_full)
            for k, f in enumerate(lay.fields):
                start = lay.full_off[0][k]
                frame[start:start + R * f.full * f.itemsize] = full[f.name].contiguous().view(torch.uint8).view(-1)
        if plan.T:
            n, cap = int(plan.tail_lengths[0]), plan.cap
            x = flat.new_zeros(1, cap)
            x[0, :n] = flat[R * B:] if full_blocks else flat
            tail = comp.encode(x, plan.tail_lengths_t(), seeds_tail)
            for k, f in enumerate(lay.fields):
                count = int(f.tail[0])
                t = tail[f.name].to(f.dtype, copy=True)     # tails travel in the full rows' field types
                t[:, count:] = 0                            # the receiver sees zeros beyond the row's count
                tail[f.name] = t
                start = lay.tail_off[0][k]
                frame[start:start + count * f.itemsize] = t[0, :count].contiguous().view(torch.uint8)
        return frame, full, tail

    def _frame_fields(self, frame: torch.Tensor, numel: int, dtype: torch.dtype, device):
        """``(plan, full_fields, tail_fields)`` of a frame: views (or aligned copies) of its full blocks' fields
        and zero-padded copies of its tail block's (None where there is no such part)."""
        plan, lay, _ = self._layout(numel, dtype, device)
        if frame.numel() != lay.total:
            raise ValueError(f"a {self.spec} frame of a {numel}-element {dtype} tensor is {lay.total} bytes, "
                             f"got {frame.numel()}")
        full = tail = None
        if plan.R:
            full = {f.name: _field(frame, lay.full_off[0][k], plan.R * f.full, f.dtype).view(plan.R, f.full)
                    for k, f in enumerate(lay.fields)}
        if plan.T:
            tail = {}
            for k, f in enumerate(lay.fields):
                count, start = int(f.tail[0]), lay.tail_off[0][k]
                t = torch.zeros(1, f.tail_cap, dtype=f.dtype, device=device)
                t[0, :count] = _field(frame, start, count, f.dtype)
                tail[f.name] = t
        return plan, full, tail

    def decode(self, frame: torch.Tensor, shape, dtype: torch.dtype, seed: int = 0, device=None) -> torch.Tensor:
        """The tensor of `shape` and `dtype` a frame holds, on `device` (default: the frame's)."""
        device = frame.device if device is None else torch.device(device)
        numel = 1
        for s in shape:
            numel *= s
        if numel == 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        plan, full, tail = self._frame_fields(frame.to(device), numel, dtype, device)
        comp, B, R = self.compressor, self.block_size, plan.R
        seeds_full, seeds_tail = self._seeds(self._layout(numel, dtype, device)[2], plan, seed)
        parts = []
        if full is not None:
            parts.append(comp.decode(full, B, dtype, None, seeds_full).reshape(-1))
        if tail is not None:
            n = int(plan.tail_lengths[0])
            parts.append(comp.decode(tail, plan.cap, dtype, plan.tail_lengths_t(), seeds_tail)[0, :n])
        return _joined(parts).view(shape)

    def decode_add(self, frame: torch.Tensor, acc: torch.Tensor, alpha: float = 1.0, seed: int = 0,
                   scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``acc += alpha * decode(frame)`` in place, without a tensor-sized temporary where the compressor adds
        in one pass (`Compressor.decode_add`; ``alpha != 1`` decodes into `scratch`, a reused buffer of at least
        ``acc.numel()`` elements, when given). `acc` is a contiguous tensor; the frame moves to its device."""
        flat = acc.view(-1)
        numel, dtype, device = flat.numel(), flat.dtype, flat.device
        if numel == 0:
            return acc
        frame = frame.to(device)
        if self._sign_fast(flat):
            lay = self._layout(numel, dtype, device)[1]
            if frame.numel() != lay.total:
                raise ValueError(f"a {self.spec} frame of a {numel}-element {dtype} tensor is {lay.total} bytes, "
                                 f"got {frame.numel()}")
            kernels.sign_apply(flat.numpy(), *_sign_fields(frame, lay), alpha, self.block_size)
            return acc
        plan, full, tail = self._frame_fields(frame, numel, dtype, device)
        comp, B, R = self.compressor, self.block_size, plan.R
        seeds_full, seeds_tail = self._seeds(self._layout(numel, dtype, device)[2], plan, seed)
        if full is not None:
            rows = flat[:R * B].view(R, B)
            if alpha == 1.0:
                comp.decode_add(full, B, dtype, rows, None, seeds_full)
            else:
                out = None if scratch is None else scratch.view(-1)[:R * B].view(R, B)
                rows.add_(comp.decode(full, B, dtype, None, seeds_full, out=out), alpha=alpha)
        if tail is not None:
            n = int(plan.tail_lengths[0])
            decoded = comp.decode(tail, plan.cap, dtype, plan.tail_lengths_t(), seeds_tail)[0, :n]
            flat[R * B:].add_(decoded, alpha=alpha)
        return acc

    def _sign_fast(self, *tensors: torch.Tensor) -> bool:
        """Whether the numba sign kernels take these tensors (sign, float32, contiguous, CPU, fast paths on)."""
        return (self.compressor.name == "sign" and kernels.available() and fastpath.on_cpu(*tensors)
                and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors))

    def encode_delta(self, x: torch.Tensor, x_hat: torch.Tensor, seed: int = 0,
                     scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The frame of ``C(x - x_hat)``, with ``x_hat += decode(frame)`` done in place (the downlink of a
        worker's copy: its residual ``x - x_hat`` is what stays behind). `x` and `x_hat` are contiguous tensors of
        one shape, dtype and device; `scratch` (at least ``x.numel()`` elements) holds the difference, so that no
        tensor-sized temporary is allocated."""
        flat, held = x.view(-1), x_hat.view(-1)
        _same(flat, held=held)
        numel, dtype, device = flat.numel(), flat.dtype, flat.device
        if numel == 0:
            return torch.empty(0, dtype=torch.uint8, device=device)
        plan, lay, static = self._layout(numel, dtype, device)
        comp, B, R = self.compressor, self.block_size, plan.R
        if self._sign_fast(flat, held):
            frame = torch.zeros(lay.total, dtype=torch.uint8)
            kernels.sign_delta(flat.numpy(), held.numpy(), *_sign_fields(frame, lay), B)
            return frame
        diff = torch.sub(flat, held, out=None if scratch is None else scratch.view(-1)[:numel])
        frame, fields_full, fields_tail = self._encode_fields(diff, plan, lay, static, seed)
        seeds_full, seeds_tail = self._seeds(static, plan, seed)
        if fields_full is not None:
            comp.decode_add(fields_full, B, dtype, held[:R * B].view(R, B), None, seeds_full)
        if fields_tail is not None:
            n = int(plan.tail_lengths[0])
            held[R * B:].add_(comp.decode(fields_tail, plan.cap, dtype, plan.tail_lengths_t(), seeds_tail)[0, :n])
        return frame

    def encode_residual(self, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor, seed: int = 0
                        ) -> torch.Tensor:
        """The frame of ``C(x + residual)``, with ``out = x + residual - decode(frame)`` (error feedback on the
        sender: compensate, compress, and the residual that stays behind). The three are contiguous tensors of one
        shape, dtype and device; `out` may be `residual` itself. Sign on float32 CPU tensors takes one kernel."""
        flat, e, left = x.view(-1), residual.view(-1), out.view(-1)
        _same(flat, residual=e, out=left)
        numel, dtype, device = flat.numel(), flat.dtype, flat.device
        if numel == 0:
            return torch.empty(0, dtype=torch.uint8, device=device)
        if self._sign_fast(flat, e, left):
            lay = self._layout(numel, dtype, device)[1]
            frame = torch.zeros(lay.total, dtype=torch.uint8)
            kernels.sign_residual(flat.numpy(), e.numpy(), left.numpy(), *_sign_fields(frame, lay), self.block_size)
            return frame
        compensated = torch.add(flat, e, out=left)
        frame, decoded = self.encode(compensated, seed)
        left.sub_(decoded.view(-1))           # a lossless compressor's decoded is `left` itself: nothing is left
        return frame

    def apply_delta(self, frame: torch.Tensor, x: torch.Tensor, alpha: float, seed: int, down: "BlockCodec",
                    x_hat: torch.Tensor, down_seed: int = 0, scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`decode_add` of `frame` into `x`, then ``down.encode_delta(x, x_hat)``: a push answered by its pull. Both
        ``sign`` on float32 CPU tensors take one fused kernel, block by block; anything else the two calls."""
        flat, held = x.view(-1), x_hat.view(-1)
        _same(flat, x_hat=held)
        numel, dtype = flat.numel(), flat.dtype
        if not (self.compressor.name == down.compressor.name and self.block_size == down.block_size
                and self._sign_fast(flat, held) and frame.device.type == "cpu"):
            self.decode_add(frame, x, alpha, seed, scratch)
            return down.encode_delta(x, x_hat, down_seed, scratch)
        lay = self._layout(numel, dtype, flat.device)[1]
        if frame.numel() != lay.total:
            raise ValueError(f"a {self.spec} frame of a {numel}-element {dtype} tensor is {lay.total} bytes, "
                             f"got {frame.numel()}")
        out = torch.zeros(lay.total, dtype=torch.uint8)
        kernels.sign_apply_delta(flat.numpy(), *_sign_fields(frame, lay), alpha, held.numpy(),
                                 *_sign_fields(out, lay), self.block_size)
        return out

    def finite(self, frame: torch.Tensor, numel: int, dtype: torch.dtype) -> bool:
        """Whether every floating-point field of the frame is finite. For the built-in compressors the decoded
        tensor is finite exactly when these fields are (sign: the scales; top-k: the values; int8: minima and
        steps; QSGD: the norms), and checking them costs a few elements instead of a pass over the tensor."""
        if numel == 0:
            return True
        plan, lay, _ = self._layout(numel, dtype, frame.device)
        regions = self._float_regions.get(id(lay))
        if regions is None:
            regions = self._float_regions[id(lay)] = [
                (start, count, f.dtype) for k, f in enumerate(lay.fields) if f.dtype.is_floating_point
                for start, count in ((lay.full_off[0][k], plan.R * f.full), (lay.tail_off[0][k], int(f.tail.sum())))
                if count]
        if fastpath.on_cpu(frame) and all(d in _NUMPY_FLOATS for _, _, d in regions):
            data = frame.numpy()           # numpy: a few microseconds where torch's three ops per field cost tens
            return all(np.isfinite(_np_field(data, start, count, d)).all() for start, count, d in regions)
        return all(bool(torch.isfinite(_field(frame, start, count, d)).all()) for start, count, d in regions)


def _same(x: torch.Tensor, **others: torch.Tensor) -> None:
    """Refuse tensors that do not match `x` in elements, dtype and device (a kernel would read past one)."""
    for name, t in others.items():
        if t.numel() != x.numel() or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} is {t.numel()} elements of {t.dtype} on {t.device}, but the tensor is "
                             f"{x.numel()} of {x.dtype} on {x.device}")


def _joined(parts):
    """The decoded pieces of a tensor (full blocks, tail block) as one flat tensor; a single piece is not copied."""
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _field(frame: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` items of `dtype` at byte `start` of a frame: a view where aligned, else an aligned copy."""
    size = torch.empty((), dtype=dtype).element_size()
    piece = frame[start:start + count * size]
    if start % size or piece.data_ptr() % size:
        piece = piece.clone()
    return piece.view(dtype)


def _np_field(data: np.ndarray, start: int, count: int, dtype: torch.dtype) -> np.ndarray:
    """`_field` of a CPU frame's numpy view."""
    size = _NUMPY_FLOATS[dtype].itemsize
    piece = data[start:start + count * size]
    if start % size or piece.ctypes.data % size:
        piece = piece.copy()
    return piece.view(_NUMPY_FLOATS[dtype])


def _sign_fields(frame: torch.Tensor, lay) -> Tuple[np.ndarray, np.ndarray]:
    """The scale (float32, one per block, tail included) and bits regions of a one-message sign frame (its tail's
    fields follow the full blocks' within each field: the layout is aligned to 1), as numpy views (the scales an
    aligned copy where the frame's bytes are not aligned: only frames the caller allocated are written)."""
    regions = getattr(lay, "sign_regions", None)          # computed once per layout
    if regions is None:
        k_s = next(k for k, f in enumerate(lay.fields) if f.name == "scale")
        k_b = next(k for k, f in enumerate(lay.fields) if f.name == "bits")
        start_s, start_b = lay.full_off[0][k_s], lay.full_off[0][k_b]
        end_s = lay.tail_off[0][k_s] + int(lay.fields[k_s].tail.sum()) * 4
        end_b = lay.tail_off[0][k_b] + int(lay.fields[k_b].tail.sum())
        regions = lay.sign_regions = (start_s, (end_s - start_s) // 4, start_b, end_b)
    start_s, count_s, start_b, end_b = regions
    data = frame.numpy()
    scales = data[start_s:start_s + 4 * count_s]
    scales = scales.view(np.float32) if start_s % 4 == 0 and scales.ctypes.data % 4 == 0 else \
        scales.copy().view(np.float32)
    return scales, data[start_b:end_b]
