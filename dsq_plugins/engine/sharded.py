"""DoubleSqueeze's two passes where the framework already shards: the collectives of FSDP2 and ZeRO.

Sharded data parallelism lays each unit's flat buffer out rank-major, ``(W, n)``: row ``r`` is the shard rank ``r``
owns (``n`` elements, padded). Its two collectives become the two passes of DoubleSqueeze, row by row and block by
block inside a row (`BlockCodec`, docs/ARCHITECTURE.md section 3):

Uplink, the gradients' reduce-scatter (`CompressedReduceScatter`), worker ``i``, for each row ``r != i``::

    v = g_i[r] + e_i[r];   c = C_w(v);   e_i[r] <- v - c          c goes to rank r        (one all_to_all)
    owner r:   out = (g_r[r] + e_r[r] + sum_{i != r} c_i) / W     (its own row never leaves it: exact, e_r[r] <- 0)

Downlink, the parameters' all-gather, where every rank keeps its copy ``x_hat`` of the unit between steps
(`DeltaAllGather`)::

    owner r:      c = C_s(x[r] - x_hat[r])                         c goes to every rank    (one all_gather)
    every rank:   x_hat[r] += c for every r, and computes with x_hat

The owner's residual is ``x[r] - x_hat[r]``, held implicitly: ``x = x_hat + e``, the conservation law in the form
the asynchronous server keeps per worker. Every rank applies every row's ``c`` by the same call, so all copies stay
bit for bit equal. Where the unsharded parameters are freed after use (ZeRO-3-like) there is no copy to keep a
residual against: `QuantizedAllGather` sends ``Q(x[r])`` (int8 per block, as ZeRO++) and every rank, the owner
included, computes with ``Q(x)``; the owner's exact shard, which the optimizer updates, is untouched.

A unit whose gradients hold a NaN/Inf on some rank is skipped on every rank: each uplink message carries its
sender's flag; no residual changes and the reduced shard is all NaN, so that a gradient scaler skips the step.
Bytes: a message is `HEADER` bytes plus the frame (`BlockCodec.nbytes`); counters (`RoundStats`) compare with
what the uncompressed collective moves, ``(W - 1) * n`` elements per rank for either.
"""
import time
from typing import Optional, Sequence

import torch

from ..compression.compressors import Compressor
from ..monitoring.monitor import RoundStats
from .codec import BlockCodec
from .communicator import Communicator
from .plan import residual_dtype_for

__all__ = ["CompressedReduceScatter", "DeltaAllGather", "IndexedReduceScatter", "QuantizedAllGather", "HEADER",
           "exchange_delta", "frame_seed"]

HEADER = 8          # bytes before each uplink frame: byte 0 is the sender's non-finite flag (8: aligned frames)


def frame_seed(base: int, key: int, step: int, sender: int, receiver: int) -> int:
    """The seed of one frame (random compressors): the same at both ends, different per unit, step and pair."""
    return hash((base, key, step, sender, receiver)) & 0x7FFFFFFF


def _dense_bytes(n: int, dtype: torch.dtype, world: int) -> int:
    return (world - 1) * n * dtype.itemsize


class CompressedReduceScatter:
    """The uplink of one unit: a reduce-scatter of compressed bytes with the worker residual ``e_i`` (W, n).

    Args:
        compressor: `C_w`.
        block_size: elements per block.
        key: the unit's number (seeds).
        worker_ef: keep ``e_i`` (False: compress ``g_i`` alone).
        residual_dtype: dtype of ``e_i`` (None: float32 for 16-bit gradients, else the gradients' reduce dtype). A
            narrower one (bfloat16 under float32 gradients) halves its memory. The compensation ``g + e`` runs in
            float32 for 16-bit gradients (then rounded to their dtype to be compressed: the rounding stays in the
            residual), else in the gradients' dtype.
        seed: base seed.
    """

    def __init__(self, compressor: Compressor, block_size: int, key: int, worker_ef: bool = True,
                 residual_dtype: Optional[torch.dtype] = None, seed: int = 0):
        self.codec = BlockCodec(compressor, block_size)
        self.key, self.worker_ef, self.residual_dtype, self.seed = key, worker_ef, residual_dtype, seed
        self.residual: Optional[torch.Tensor] = None       # (W, n); row `rank` is zero after every reduction
        self._left: Optional[torch.Tensor] = None          # (W, n) scratch: the residual being made

    def set_compressor(self, compressor: Compressor) -> None:
        """Compress with `compressor` from now on; the residual carries over."""
        if compressor.spec != self.codec.spec:
            self.codec = BlockCodec(compressor, self.codec.block_size)

    def flush_into(self, inp: torch.Tensor) -> None:
        """Before a dense reduction: add the residual to the rows about to be reduced, and zero it (nothing lost)."""
        if self.residual is not None:
            inp.view(self.residual.shape).add_(self.residual.to(inp.dtype))
            self.residual.zero_()

    def _buffers(self, W: int, n: int, dtype: torch.dtype, device) -> None:
        cdtype = residual_dtype_for(dtype)
        rdtype = self.residual_dtype or cdtype
        if self.residual is None or self.residual.shape != (W, n) or self.residual.dtype != rdtype:
            self.residual = torch.zeros(W, n, dtype=rdtype, device=device)
        if self._left is None or self._left.shape != (W, n) or self._left.dtype != cdtype:
            self._left = torch.zeros(W, n, dtype=cdtype, device=device)

    def __call__(self, comm: Communicator, inp: torch.Tensor, out: torch.Tensor, average: bool, step: int,
                 stats: RoundStats) -> torch.Tensor:
        """Reduce `inp` (W * n, rank-major) into `out` (n, this rank's row): the mean over ranks if `average`,
        else the sum. Returns the skip flag (0-d bool: some rank had a non-finite gradient in this unit)."""
        W, me, n = comm.size, comm.rank, out.numel()
        if inp.numel() != W * n:
            raise ValueError(f"reduce-scatter input of {inp.numel()} elements for {W} ranks of {n}")
        rows, dtype, device = inp.view(W, n), inp.dtype, inp.device
        self._buffers(W, n, dtype, device)
        F = self.codec.nbytes(n, dtype)
        M = HEADER + F
        others = [r for r in range(W) if r != me]
        flag = ~torch.isfinite(inp).all()
        send = torch.zeros(len(others), M, dtype=torch.uint8, device=device)
        send[:, 0] = flag.to(torch.uint8)
        left, e = self._left, self.residual
        t0 = time.perf_counter()
        for k, r in enumerate(others):
            seed = frame_seed(self.seed, self.key, step, me, r)
            if not self.worker_ef:
                frame, _ = self.codec.encode(rows[r], seed)
            elif e.dtype == dtype == left.dtype:
                frame = self.codec.encode_residual(rows[r], e[r], left[r], seed)
            else:                          # v = g + e in left's dtype, compressed as the gradients' dtype
                compensated = left[r].copy_(rows[r]).add_(e[r])
                frame, decoded = self.codec.encode(compensated.to(dtype), seed)
                left[r].sub_(decoded)
            send[k, HEADER:] = frame
        stats.compress_seconds += time.perf_counter() - t0
        sizes = [0 if r == me else M for r in range(W)]
        recv = comm.all_to_all(send.view(-1), sizes, sizes).view(len(others), M)
        t0 = time.perf_counter()
        skip = flag | recv[:, 0].bool().any()
        out.copy_(rows[me])
        if self.worker_ef:       # a residual in this rank's own row (redistributed from a checkpoint) goes out exact
            out.add_(e[me].to(dtype))
        for k, j in enumerate(others):
            self.codec.decode_add(recv[k, HEADER:], out, seed=frame_seed(self.seed, self.key, step, j, me))
        if average:
            out.div_(W)
        if self.worker_ef:
            left[me].zero_()
            e.copy_(torch.where(skip, e, left.to(e.dtype)))
        out.copy_(torch.where(skip, torch.full_like(out, float("nan")), out))
        stats.compress_seconds += time.perf_counter() - t0
        stats.bytes_up_sent += len(others) * M
        stats.bytes_up_recv += len(others) * M
        stats.payload_bytes += len(others) * M
        stats.dense_bytes += _dense_bytes(n, dtype, W)
        stats.compressed_tensors += 1
        return skip

    def memory(self) -> int:
        """Bytes kept from step to step (the residual; the scratch is as large but could be shared)."""
        return 0 if self.residual is None else self.residual.numel() * self.residual.element_size()


class _AllGatherBuffer:
    """A unit's all-gather output buffer (W * n)."""

    def __init__(self):
        self.buffer: Optional[torch.Tensor] = None

    def allocate(self, numel: int, dtype: torch.dtype, device) -> bool:
        """Make sure the buffer is (numel,) of `dtype` on `device`; whether it was (re)made."""
        b = self.buffer
        if b is None or b.numel() != numel or b.dtype != dtype or b.device != torch.device(device):
            self.buffer = torch.zeros(numel, dtype=dtype, device=device)
            return True
        return False


def _check_floating(t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"a compressed all-gather needs floating-point parameters, got an all-gather of {t.dtype} "
                        "(parameters of mixed dtypes, or a tensor subclass with its own all-gather): pass "
                        "downlink='dense' for this model")


def _dense_gather(comm: Communicator, out: torch.Tensor, inp: torch.Tensor, stats: RoundStats) -> None:
    W, n = comm.size, inp.numel()
    nbytes = n * inp.element_size()
    comm.all_gather(inp.contiguous().view(torch.uint8).view(-1), [nbytes] * W, out=out.view(torch.uint8).view(-1))
    stats.bytes_down_sent += (W - 1) * nbytes
    stats.bytes_down_recv += (W - 1) * nbytes


def exchange_delta(codec: BlockCodec, comm: Communicator, diff: torch.Tensor, rows: Sequence[torch.Tensor],
                   mine: torch.Tensor, seed: int, key: int, step: int, stats: RoundStats) -> None:
    """The delta downlink's exchange (module docstring): this rank's ``C_s(diff)``, ``diff = x - x_hat`` of its row,
    goes to every rank (one all_gather of frames); every rank resets its own row of the copy to `mine` (its x_hat),
    adds rank j's decoded frame to ``rows[j]`` for every j (decoded in `diff`'s dtype, added in the rows'), and
    `mine` takes the new row. Every rank applies every frame by the same ops, so the copies stay equal."""
    W, me = comm.size, comm.rank
    t0 = time.perf_counter()
    frame, _ = codec.encode(diff, frame_seed(seed, key, step, me, -1))
    stats.compress_seconds += time.perf_counter() - t0
    F = frame.numel()
    gathered = comm.all_gather(frame, [F] * W).view(W, F)
    t0 = time.perf_counter()
    rows[me].copy_(mine)
    scratch = None
    for j in range(W):
        s = frame_seed(seed, key, step, j, -1)
        if rows[j].dtype == diff.dtype:
            codec.decode_add(gathered[j], rows[j], seed=s)
            continue
        if scratch is None:
            scratch = torch.empty(rows[j].numel(), dtype=diff.dtype, device=rows[j].device)
        codec.decode_add(gathered[j], scratch.zero_(), seed=s)
        rows[j].add_(scratch.to(rows[j].dtype))
    mine.copy_(rows[me])
    stats.compress_seconds += time.perf_counter() - t0
    stats.bytes_down_sent += (W - 1) * F
    stats.bytes_down_recv += (W - 1) * F


class DeltaAllGather(_AllGatherBuffer):
    """The downlink of one unit where every rank keeps its copy ``x_hat`` of the unit's parameters (the buffer,
    W * n) between steps: the owner sends ``C_s(x - x_hat)`` of its row; ``x - x_hat`` is its residual.

    The first gather (and every gather during warm-up or after `resync`) is dense and exact. A unit gathered
    again before its next reduce-scatter (in backward, after a reshard) sends nothing: its parameters have not
    changed since.
    """

    def __init__(self, compressor: Compressor, block_size: int, key: int, seed: int = 0):
        super().__init__()
        self.codec = BlockCodec(compressor, block_size)
        self.key, self.seed = key, seed
        self.mine: Optional[torch.Tensor] = None     # x_hat of this rank's own row (the buffer's row is overwritten
        self.fresh = True                            # by the framework's copy-in of x before each gather)
        self.sent = False
        self._rebuild = False                        # a loaded `mine`: gather every rank's before the next delta

    def allocate(self, numel: int, dtype: torch.dtype, device) -> bool:
        if super().allocate(numel, dtype, device):
            self.fresh = self.fresh or not self._rebuild      # a new buffer is filled by a dense gather, or rebuilt
            return True
        return False

    def set_compressor(self, compressor: Compressor) -> None:
        """Compress the deltas with `compressor` from now on; the copies carry over."""
        if compressor.spec != self.codec.spec:
            self.codec = BlockCodec(compressor, self.codec.block_size)

    def resync(self) -> None:
        """Send the next gather dense (exact): after the parameters changed outside an optimizer step."""
        self.fresh, self.sent = True, False

    def load_row(self, mine: Optional[torch.Tensor]) -> None:
        """Resume from a saved `mine` (this rank's row of x_hat; None: start fresh). The next gather first
        gathers every rank's row (dense) to rebuild x_hat exactly, then sends its delta."""
        self.mine, self.fresh, self._rebuild, self.sent = mine, mine is None, mine is not None, False

    def reduced(self) -> None:
        """The unit's gradients were reduced: its parameters may change before the next gather."""
        self.sent = False

    def __call__(self, comm: Communicator, out: torch.Tensor, inp: torch.Tensor, step: int, dense: bool,
                 stats: RoundStats) -> None:
        """Gather `inp` (this rank's row, x) into `out` (the buffer): exact if `dense` or fresh, else the
        compressed delta; `out` then holds every rank's x_hat."""
        W, me, n = comm.size, comm.rank, inp.numel()
        if out.data_ptr() != self.buffer.data_ptr():
            raise RuntimeError("the all-gather output is not the buffer this DeltaAllGather allocated")
        _check_floating(inp)
        rows = out.view(W, n)
        if self.fresh or dense:
            _dense_gather(comm, out, inp, stats)
            self.mine = rows[me].clone()
            self.fresh = self._rebuild = False
        elif self.sent:
            rows[me].copy_(self.mine)
        else:
            if self._rebuild and (self.mine.shape != (n,) or self.mine.dtype != out.dtype):
                raise ValueError(f"a loaded replica row of {tuple(self.mine.shape)} {self.mine.dtype} does not "
                                 f"fit this unit's rows of {n} {out.dtype}")
            diff = torch.sub(inp, self.mine)          # before anything overwrites `inp`, this rank's row of `out`
            if self._rebuild:
                _dense_gather(comm, out, self.mine, stats)
                self._rebuild = False
            exchange_delta(self.codec, comm, diff, rows, self.mine, self.seed, self.key, step, stats)
        self.sent = True

    def residual(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The owner's residual ``x - x_hat`` of its row, given its row `x` as gathered."""
        return None if self.mine is None else x - self.mine

    def memory(self) -> int:
        held = [t for t in (self.buffer, self.mine) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


class QuantizedAllGather(_AllGatherBuffer):
    """The downlink of one unit whose unsharded parameters are freed after use: every rank gathers ``Q(x)``
    (`compressor`, int8 per block by default), no residual; the owner computes with ``Q(x)`` of its row too, so
    that every rank computes with the same parameters."""

    def __init__(self, compressor: Compressor, block_size: int, key: int, seed: int = 0):
        super().__init__()
        self.codec = BlockCodec(compressor, block_size)
        self.key, self.seed = key, seed

    def __call__(self, comm: Communicator, out: torch.Tensor, inp: torch.Tensor, step: int, dense: bool,
                 stats: RoundStats) -> None:
        W, me, n = comm.size, comm.rank, inp.numel()
        _check_floating(inp)
        if dense:
            _dense_gather(comm, out, inp, stats)
            return
        rows = out.view(W, n)
        t0 = time.perf_counter()
        frame, _ = self.codec.encode(inp, frame_seed(self.seed, self.key, step, me, -1))
        stats.compress_seconds += time.perf_counter() - t0
        F = frame.numel()
        gathered = comm.all_gather(frame, [F] * W).view(W, F)
        t0 = time.perf_counter()
        for j in range(W):           # the owner decodes its own frame too: every rank holds the same Q(x)
            rows[j].copy_(self.codec.decode(gathered[j], (n,), inp.dtype,
                                            seed=frame_seed(self.seed, self.key, step, j, -1)))
        stats.compress_seconds += time.perf_counter() - t0
        stats.bytes_down_sent += (W - 1) * F
        stats.bytes_down_recv += (W - 1) * F

    def memory(self) -> int:
        return 0


class IndexedReduceScatter:
    """The uplink where the framework's buckets do not come in equal rows (DeepSpeed ZeRO-2 and ZeRO-3): a bucket
    is one flat tensor, and a layout says which of its elements each rank owns (``index[r]``, positions in the
    bucket) and where their worker residual lives (``position[r]``, positions in `residual`, which the caller
    sizes and keeps: float32 or a narrower float, indexed however the framework lays out its partitions; the
    compensation runs in float32 either way). Worker ``i``::

        for each r != i:   v = g_i[index[r]] + e_i[position[r]];   c = C_w(v);   e_i[position[r]] <- v - c
        owner r:           out = (g_r[index[r]] + e_r[position[r]] + sum_{i != r} c_i) / W     (or the sum)

    One all_to_all moves a `HEADER` (byte 0: the sender's non-finite flag) and the frame to each owner; frame sizes
    follow from the owners' element counts, which every rank derives from the same layout. A flag on any rank leaves
    the residual as it was and makes `out` all NaN.

    Args:
        compressor: `C_w`.
        block_size: elements per block (of each message).
        residual: the worker residual (float32, or bfloat16 to halve its memory).
        worker_ef: keep the residual (False: compress ``g_i`` alone).
        seed: base seed of the frames.
    """

    def __init__(self, compressor: Compressor, block_size: int, residual: torch.Tensor, worker_ef: bool = True,
                 seed: int = 0):
        self.codec = BlockCodec(compressor, block_size)
        self.residual, self.worker_ef, self.seed = residual, worker_ef, seed

    def set_compressor(self, compressor: Compressor) -> None:
        """Compress with `compressor` from now on; the residual carries over (nothing is lost)."""
        if compressor.spec != self.codec.spec:
            self.codec = BlockCodec(compressor, self.codec.block_size)

    def __call__(self, comm: Communicator, flat: torch.Tensor, index, position, average: bool, key: int, step: int,
                 stats: RoundStats, norms: Optional[torch.Tensor] = None):
        """Reduce the bucket `flat`; returns ``(out, skip)``: this rank's elements (``index[rank]`` order,
        float32) and whether some rank had a non-finite gradient. `norms`, if given (float64, 2), gets
        ``|v - C_w(v)|^2`` and ``|v|^2`` of this rank's messages added (the quality guard's sample)."""
        W, me, device = comm.size, comm.rank, flat.device
        others = [r for r in range(W) if r != me]
        flag = ~torch.isfinite(flat).all()
        t0 = time.perf_counter()
        frames, left = [], {}
        sample = None if norms is None else torch.zeros(2, dtype=torch.float64, device=device)
        for r in others:
            v = flat[index[r]].float()
            if self.worker_ef:
                v += self.residual[position[r]]
            if sample is not None:
                sample[1] += torch.linalg.vector_norm(v, dtype=torch.float64).square()
            frame, decoded = self.codec.encode(v, frame_seed(self.seed, key, step, me, r))
            if self.worker_ef:
                left[r] = v.sub_(decoded)          # v is now the error, v - C_w(v)
            if sample is not None:
                err = v if self.worker_ef else v - decoded
                sample[0] += torch.linalg.vector_norm(err, dtype=torch.float64).square()
            head = torch.zeros(HEADER, dtype=torch.uint8, device=device)
            head[0] = flag.to(torch.uint8)
            frames.append(torch.cat([head, frame.to(device)]))
        send_sizes = [0] * W
        for r, f in zip(others, frames):
            send_sizes[r] = f.numel()
        one = HEADER + self.codec.nbytes(index[me].numel(), torch.float32)
        recv_sizes = [0 if r == me else one for r in range(W)]
        send = torch.cat(frames) if frames else torch.zeros(0, dtype=torch.uint8, device=device)
        stats.compress_seconds += time.perf_counter() - t0
        recv = comm.all_to_all(send, send_sizes, recv_sizes).view(len(others), one)
        t0 = time.perf_counter()
        skip = bool(flag | recv[:, 0].bool().any()) if others else bool(flag)
        out = flat[index[me]].float()
        if self.worker_ef:
            out += self.residual[position[me]]
        for k, j in enumerate(others):
            self.codec.decode_add(recv[k, HEADER:], out, seed=frame_seed(self.seed, key, step, j, me))
        if average:
            out.div_(W)
        if skip:
            out.fill_(float("nan"))
        elif self.worker_ef:
            for r, e in left.items():
                self.residual[position[r]] = e.to(self.residual.dtype)
            self.residual[position[me]] = 0.0
        stats.compress_seconds += time.perf_counter() - t0
        stats.bytes_up_sent += sum(send_sizes)
        stats.bytes_up_recv += sum(recv_sizes)
        stats.payload_bytes += sum(send_sizes)
        stats.dense_bytes += sum(index[r].numel() for r in others) * flat.element_size()
        stats.compressed_buckets += 1
        stats.skipped += int(skip)
        if sample is not None and not skip:
            norms += sample.to(norms.device)
        return out, skip
