"""The double pass over one bucket, vectorised: a handful of batched calls per stage, on the gradients' device.

`BucketState` owns what persists for one bucket layout (its `BucketPlan`): the worker residual of its blocks (in
tensor order, full rows (R, B) and tail rows (T, cap)), the server residual of the blocks this rank owns, the
wire buffers and the small tail tables. An `Exchange` is one bucket's pass through the stages:

    worker_pass      v = g + e_i per block, C_w(v) packed straight into the uplink send buffer, the non-finite
                     flag into every message's header               (the hook's thread; then the uplink is issued)
    serve            skip = any rank's flag; e_i <- v - C_w(v) unless skip; server pass over the owned blocks:
                     v_s = mean_i C_w(v_i) + e, C_s(v_s) into this rank's downlink message, e <- v_s - C_s(v_s)
                     unless skip                                    (then the downlink is issued)
    finish           decode every owner's C_s rows into the outputs (all NaN if skip)

16-bit gradients keep their residuals and compute ``g + e`` and the server's mean in float32
(`plan.compute_dtype`); what a compressor encodes, and so the wire, is in the gradients' dtype, and every message
counts as its decoding in that dtype (the residual takes the rounding too: nothing is lost to it).

Full rows go through in chunks of `plan.chunk_rows` rows (temporaries the size of a chunk, reused); every stage is
O(1) torch calls per chunk plus O(P) views, O(W) only where there is one message per rank. Nothing on the hot
path synchronises the host with the device: the skip is a 0-d device tensor applied with `torch.where`, except on
the CPU with fast paths on, where reading it costs nothing and saves the work.
"""
import threading
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..compression import fastpath, kernels, rng
from ..compression.compressors import Compressor
from ..monitoring.monitor import RoundStats
from .kinds import Pass, Rows, SeedSite, Side, TailSlots
from .plan import BucketPlan, WireLayout

__all__ = ["BucketState", "ErrorNorms", "Exchange", "Scratch"]


class Scratch:
    """Temporaries (chunk-sized), reused by every bucket; one set per thread, so that the hook's thread and the
    communication thread never share one."""

    def __init__(self):
        self.bufs: Dict[tuple, torch.Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (threading.get_ident(), name, dtype, device)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[key] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]

    def nbytes(self) -> int:
        return sum(_nbytes(b) for b in list(self.bufs.values()))


class ErrorNorms:
    """Squared norms of each pass's input and compression error, summed over a round's rows (device scalars, or
    0 until something is added): what the monitor reports as each pass's relative error."""

    __slots__ = ("worker_input_sq", "worker_error_sq", "server_input_sq", "server_error_sq")

    def __init__(self):
        self.worker_input_sq = self.worker_error_sq = self.server_input_sq = self.server_error_sq = 0

    def add_rows(self, side: Side, v: torch.Tensor, err: torch.Tensor) -> None:
        """Add ||v||^2 and ||err||^2 of one side's rows."""
        v_sq = torch.linalg.vector_norm(v, dtype=torch.float64) ** 2
        e_sq = torch.linalg.vector_norm(err, dtype=torch.float64) ** 2
        if side is Side.WORKER:
            self.worker_input_sq, self.worker_error_sq = self.worker_input_sq + v_sq, self.worker_error_sq + e_sq
        else:
            self.server_input_sq, self.server_error_sq = self.server_input_sq + v_sq, self.server_error_sq + e_sq

    def add(self, other: "ErrorNorms") -> None:
        self.worker_input_sq = self.worker_input_sq + other.worker_input_sq
        self.worker_error_sq = self.worker_error_sq + other.worker_error_sq
        self.server_input_sq = self.server_input_sq + other.server_input_sq
        self.server_error_sq = self.server_error_sq + other.server_error_sq

    def into(self, stats: RoundStats) -> None:
        """Write the sums (read to the host) into `stats`."""
        stats.worker_input_sq = float(self.worker_input_sq)
        stats.worker_error_sq = float(self.worker_error_sq)
        stats.server_input_sq = float(self.server_input_sq)
        stats.server_error_sq = float(self.server_error_sq)


class Exchange:
    """One bucket's double pass in flight."""

    def __init__(self, state: Optional["BucketState"], items: List[torch.Tensor], step: int, track: bool):
        self.state, self.items, self.step, self.track = state, items, step, track
        self.up = self.down = self.dense = None        # pending collectives
        self.dense_buf: Optional[torch.Tensor] = None
        self.in_place_dense = False
        self.skip: Optional[torch.Tensor] = None      # 0-d bool, on the device
        self.host_skip: Optional[bool] = None         # the same, where reading it is free (CPU fast path)
        self.stats = RoundStats()
        self.norms = ErrorNorms()                    # the monitor's error norms (only when `track`)
        # the quality guard's sample: (4, compressed tensors) float64, rows worker error, worker input, server
        # error, server input (squared norms), or None when this step is not sampled
        self.guard_sums: Optional[torch.Tensor] = None
        self.flushed: list = []                      # residuals sent along with dense tensors (auto's switches)


def _views(tensors, segments, dst_is_item: bool, batch: torch.Tensor):
    items, flat = [], batch.view(-1)
    for item, start, bstart, length in segments:
        items.append(tensors[item].narrow(0, start, length))
    rows = [flat.narrow(0, bstart, length) for _, _, bstart, length in segments]
    return (items, rows) if dst_is_item else (rows, items)


def _copy(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
    if dst:
        torch._foreach_copy_(dst, src)


def _col(n: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)


class BucketState:
    """What persists for one bucket layout: plan, residuals, wire buffers, static seeds (module docstring)."""

    def __init__(self, plan: BucketPlan, wc: Compressor, sc: Compressor, worker_ef: bool, server_ef: bool,
                 base_seed: int, residual_dtype: Optional[torch.dtype] = None):
        self.plan, self.wc, self.sc = plan, wc, sc
        self.live: set = set()        # the keys whose residuals this state holds now (the collective's bookkeeping)
        p, dev, dt = plan, plan.device, plan.compute_dtype
        B, W, me = p.block_size, p.world_size, p.rank
        self.has_rows = p.R + p.T > 0
        self.keep_worker = worker_ef and not wc.lossless and self.has_rows
        self.keep_server = server_ef and not sc.lossless and self.has_rows
        # residuals stored narrower than the compensation's dtype: each update is computed in `compute_dtype` and
        # rounded once into the store
        rdt = residual_dtype or dt
        self.narrow_residuals = rdt != dt
        zeros = lambda *shape, dtype=dt: torch.zeros(*shape, dtype=dtype, device=dev)     # noqa: E731
        self.e_full = zeros(p.R, B, dtype=rdt) if self.keep_worker else None
        self.e_tail = zeros(p.T, p.cap, dtype=rdt) if self.keep_worker else None
        self.s_full = zeros(p.F_me, B, dtype=rdt) if self.keep_server else None
        self.s_tail = zeros(p.T_me, p.cap, dtype=rdt) if self.keep_server else None
        self.dense_buf = None
        self.compressed_keys = {s.key: s for s in p.compressed}   # the tensors it compresses, keeps residuals of
        if not self.has_rows:
            return
        self.up: WireLayout = p.layout(wc, Pass.UP)
        self.down: WireLayout = p.layout(sc, Pass.DOWN)
        u8 = dict(dtype=torch.uint8, device=dev)
        self.send = torch.zeros(self.up.total, **u8)
        self.recv_size = W * self.up.sizes[me]
        # the uplink's receive buffer, then (once the server pass has read it) the downlink's gathered buffer
        self.exchange_buf = torch.zeros(max(self.recv_size, self.down.total), **u8)
        self.own = torch.zeros(self.down.sizes[me], **u8)
        self.header_pos = torch.as_tensor(self.up.starts, device=dev)
        self.vt = zeros(p.T, p.cap)
        self.up_tail = [torch.zeros(p.T, f.tail_cap, dtype=f.dtype, device=dev) for f in self.up.fields]
        self.recv_tail = [torch.zeros(W, p.T_me, f.tail_cap, dtype=f.dtype, device=dev) for f in self.up.fields]
        self.own_tail = [torch.zeros(p.T_me, f.tail_cap, dtype=f.dtype, device=dev) for f in self.down.fields]
        self.down_tail = [torch.zeros(p.T, f.tail_cap, dtype=f.dtype, device=dev) for f in self.down.fields]
        self._seeds = self._static_seeds(base_seed)

    # -- seeds ---------------------------------------------------------------------------------------------------
    def _static_seeds(self, base: int) -> Dict[Tuple[SeedSite, Rows], List[torch.Tensor]]:
        """Static seeds (see `rng`) of every row this rank compresses or decodes, by site and kind of row, as int64
        tensors: one table per sender for `SeedSite.RECV` of a compressor seeded per rank, else one."""
        p, out = self.plan, {}
        full_blocks = [(s.key, b) for s in p.compressed for b in range(s.full)]
        tail_blocks = [(s.key, s.full) for s in p.compressed if s.tail_row >= 0]

        def table(blocks, direction, rank):
            return torch.tensor([rng.static_seed(base, k, b, direction, rank) for k, b in blocks] or [0],
                                dtype=torch.int64, device=p.device)[:len(blocks)]
        mine_full = [full_blocks[r] for r in p.owned_full[p.rank]]
        mine_tail = [tail_blocks[r] for r in p.owned_tail[p.rank]]
        if self.wc.uses_seed:
            per_rank = self.wc.seed_per_rank
            me = p.rank if per_rank else -1
            out[SeedSite.SEND, Rows.FULL] = [table(full_blocks, Pass.UP, me)]
            out[SeedSite.SEND, Rows.TAIL] = [table(tail_blocks, Pass.UP, me)]
            senders = range(p.world_size) if per_rank else [-1]
            out[SeedSite.RECV, Rows.FULL] = [table(mine_full, Pass.UP, i) for i in senders]
            out[SeedSite.RECV, Rows.TAIL] = [table(mine_tail, Pass.UP, i) for i in senders]
        if self.sc.uses_seed:
            out[SeedSite.OWN, Rows.FULL] = [table(mine_full, Pass.DOWN, -1)]
            out[SeedSite.OWN, Rows.TAIL] = [table(mine_tail, Pass.DOWN, -1)]
            out[SeedSite.GATHER, Rows.FULL] = [table(full_blocks, Pass.DOWN, -1)]
            out[SeedSite.GATHER, Rows.TAIL] = [table(tail_blocks, Pass.DOWN, -1)]
        return out

    def seeds(self, site: SeedSite, rows: Rows, step: int, sender: int = 0) -> Optional[torch.Tensor]:
        """The seeds at `step` of the rows of kind `rows` used at `site` (`sender`: whose uplink, for RECV), or None
        for a compressor without randomness."""
        tables = self._seeds.get((site, rows))
        if tables is None:
            return None
        return rng.step_seeds(tables[sender if len(tables) > 1 else 0], step)

    # -- stage 1: the worker pass ----------------------------------------------------------------------------
    def worker_pass(self, ex: Exchange, scratch: Scratch, flat: Optional[torch.Tensor]) -> torch.Tensor:
        """Compress ``g + e_i`` of every block into the send buffer. Returns a 0-d bool tensor: whether any
        compensated value or dense gradient in the messages is NaN or infinite (a part dense throughout has no
        message header: it is all-reduced, and `skip_flag` checks the reduced sum)."""
        p, wc, up = self.plan, self.wc, self.up if self.has_rows else None
        bad = torch.zeros((), dtype=torch.bool, device=p.device)
        if self.has_rows:
            B = p.block_size
            seeds = self.seeds(SeedSite.SEND, Rows.FULL, ex.step)
            v_buf = scratch.get("v", p.chunk_rows * B, p.compute_dtype, p.device)
            for a, b in p.chunks(p.R):
                v = v_buf[:(b - a) * B].view(b - a, B)
                self._compensated(ex.items, a, b, v)
                x = self._wire(v, scratch)
                fields = wc.encode(x, None, None if seeds is None else seeds[a:b])
                bad |= _nonfinite(wc, fields, x)
                for i, f in enumerate(up.fields):
                    self._rows_view(self.send, up, i, a, b, write=fields[f.name])
            if p.T:
                vt = self._wire(self._compensated_tail(ex.items))
                fields = wc.encode(vt, p.tail_lengths_t(), self.seeds(SeedSite.SEND, Rows.TAIL, ex.step))
                for i, f in enumerate(up.fields):
                    t = self.up_tail[i]
                    t.copy_(fields[f.name]).masked_fill_(up.tail_invalid(i, mine=False), 0)
                    pad, buf = up.tail_index(i, TailSlots.ALL)
                    self.send.view(f.dtype)[buf] = t.view(-1)[pad]
                bad |= _nonfinite(wc, {f.name: self.up_tail[i] for i, f in enumerate(up.fields)}, vt)
            if p.dense_items:                  # small tensors ride uncompressed in the same messages
                segs, views = up.dense_views(self.send)
                _copy(views, [ex.items[i].narrow(0, start, n) for i, start, n in segs])
                bad |= ~torch.isfinite(torch.stack(torch._foreach_norm(views, float("inf"))).sum())
        elif p.dense_items:            # dense throughout: no header to flag; `skip_flag` reads the reduced sum
            ex.dense_buf = self._dense_gather(ex.items, flat)
        return bad

    def _wire(self, v: torch.Tensor, scratch: Optional[Scratch] = None) -> torch.Tensor:
        """`v` in the gradients' dtype, what the compressor encodes: `v` itself, or (16-bit gradients) a rounded
        copy (into scratch if given)."""
        p = self.plan
        if not p.low_precision:
            return v
        if scratch is None:
            return v.to(p.dtype)
        return scratch.get("wire", v.numel(), p.dtype, p.device).view(v.shape).copy_(v)

    def _compensated(self, items, a: int, b: int, v: torch.Tensor) -> None:
        """v (rows a..b) <- g (+ e_i) of those full rows."""
        dst, src = _views(items, self.plan.full_segments(a, b), False, v)
        _copy(dst, src)
        if self.keep_worker:
            v.add_(self.e_full[a:b])

    def _compensated_tail(self, items) -> torch.Tensor:
        vt = self.vt
        dst, src = _views(items, self.plan.tail_segments(), False, vt)
        _copy(dst, src)
        if self.keep_worker:
            vt.add_(self.e_tail)            # zero beyond each row's length, as vt is
        return vt

    @staticmethod
    def _rows_view(buf: torch.Tensor, lay: WireLayout, f: int, a: int, b: int, write=None):
        """Field f of tensor-order full rows [a, b) in a buffer of all W messages: read them, or write `write`.
        Rows move as their widest integer type (`_Field.move`)."""
        fld = lay.fields[f]
        view = buf.view(fld.move)
        idx = lay.row_starts(f)[a:b, None] + _col(fld.move_items, buf.device)
        if write is None:
            return view[idx].view(fld.dtype)
        view[idx] = write.contiguous().view(fld.move)

    def _dense_gather(self, items, flat) -> torch.Tensor:
        p = self.plan
        if flat is not None and flat.numel() == p.numel:
            return flat                                  # all dense (warm-up): reduce the bucket in place
        if self.dense_buf is None:
            self.dense_buf = torch.empty(p.dense_numel, dtype=p.dtype, device=p.device)
        buf, off, dst, src = self.dense_buf, 0, [], []
        for i in p.dense_items:
            dst.append(buf.narrow(0, off, p.numels[i]))
            src.append(items[i])
            off += p.numels[i]
        _copy(dst, src)
        return buf

    # -- stage 2: residual update and the server pass ---------------------------------------------------------
    def skip_flag(self, ex: Exchange, recv: Optional[torch.Tensor]) -> torch.Tensor:
        """0-d bool: whether any rank had a NaN or Inf in this part: a flag in the header of an uplink message of
        `recv` (W messages to this rank), or, in a part that is dense throughout, a NaN or Inf in its all-reduced
        sum, which is turned into the mean here in the same pass (one on the CPU fast path, float32)."""
        if recv is None:
            buf = ex.dense_buf
            if buf.dtype == torch.float32 and buf.is_contiguous() and kernels.available() and fastpath.on_cpu(buf):
                return torch.tensor(kernels.divide_finite(buf.numpy(), self.plan.world_size))
            return ~torch.isfinite(buf.div_(self.plan.world_size).sum())
        M = self.up.sizes[self.plan.rank]
        return (recv[:self.recv_size].view(self.plan.world_size, M)[:, 0] != 0).any()

    def serve(self, ex: Exchange, recv: Optional[torch.Tensor], scratch: Scratch) -> None:
        """Given the uplink bytes (W messages to this rank) and the skip decision `ex.skip` (the bucket's: every
        part of it and every rank), update the worker residual and run the server pass into `self.own` (this
        rank's downlink message)."""
        if fastpath.on_cpu(ex.skip):
            ex.host_skip = bool(ex.skip)
        if not self.has_rows:
            return
        self._worker_residual(ex, scratch)
        self._server_pass(ex, recv[:self.recv_size], scratch)

    def _update_residual(self, ex: Exchange, e: torch.Tensor, v: torch.Tensor, decode, tmp: Optional[torch.Tensor],
                         pad: Optional[torch.Tensor] = None, side: Side = Side.WORKER,
                         tensors: Optional[torch.Tensor] = None) -> None:
        """e <- v - decode(out), unless the exchange is skipped (then e stays as it is). `decode(out)` decodes the
        sent fields into `out` (None: a new tensor). Where the skip is known on the host, e itself takes the
        decoded values and the difference in place; else the difference goes through `tmp` and `torch.where`.
        16-bit gradients, or residuals stored narrower than `v`: the fields decode in the gradients' dtype (into
        `tmp`, of that dtype) and the difference is taken in `v`'s dtype, then stored in e's."""
        if ex.host_skip:
            return
        if self.plan.low_precision or self.narrow_residuals:
            dec = decode(tmp)
            new = torch.sub(v, dec, out=e) if ex.host_skip is False else v - dec
        elif ex.host_skip is None:
            new = decode(tmp)
            torch.sub(v, new, out=new)
        else:
            new = decode(e if e.is_contiguous() else None)
            torch.sub(v, new, out=e)
            new = e
        if pad is not None:
            new.masked_fill_(pad, 0)
        if ex.track:
            ex.norms.add_rows(side, v, new)
        if ex.guard_sums is not None and tensors is not None:
            self._guard_rows(ex, 0 if side is Side.WORKER else 2, new, v, tensors)
        if ex.host_skip is None:
            torch.where(ex.skip, e, new.to(e.dtype), out=e)

    @staticmethod
    def _guard_rows(ex: Exchange, row: int, err: torch.Tensor, v: torch.Tensor, tensors: torch.Tensor) -> None:
        """Add the rows' squared norms of the error and of the input, by tensor, to the guard's sample (nothing
        on a skipped step)."""
        sq = torch.stack([torch.linalg.vector_norm(err, dim=1, dtype=torch.float64),
                          torch.linalg.vector_norm(v, dim=1, dtype=torch.float64)]).square_()
        if ex.host_skip is None:
            sq = torch.where(ex.skip, 0.0, sq)
        ex.guard_sums[row:row + 2].index_add_(1, tensors, sq)

    def _worker_residual(self, ex: Exchange, scratch: Scratch) -> None:
        if not self.keep_worker or ex.host_skip:
            return
        p, wc, up, B = self.plan, self.wc, self.up, self.plan.block_size
        seeds = self.seeds(SeedSite.SEND, Rows.FULL, ex.step)
        v_buf = scratch.get("v", p.chunk_rows * B, p.compute_dtype, p.device)
        d_buf = self._decode_buf(ex, scratch)
        for a, b in p.chunks(p.R):
            v = v_buf[:(b - a) * B].view(b - a, B)
            self._compensated(ex.items, a, b, v)
            fields = {f.name: self._rows_view(self.send, up, i, a, b) for i, f in enumerate(up.fields)}
            s = None if seeds is None else seeds[a:b]
            self._update_residual(ex, self.e_full[a:b], v,
                                  lambda out: wc.decode(fields, B, p.dtype, None, s, out=out),
                                  None if d_buf is None else d_buf[:(b - a) * B].view(b - a, B),
                                  tensors=p.tensor_of_rows(False, False)[a:b])
        if p.T:
            fields = {f.name: self.up_tail[i] for i, f in enumerate(up.fields)}
            lengths, seeds = p.tail_lengths_t(), self.seeds(SeedSite.SEND, Rows.TAIL, ex.step)
            # self.vt still holds g + e_i of the tails, from the worker pass
            self._update_residual(ex, self.e_tail, self.vt,
                                  lambda out: wc.decode(fields, p.cap, p.dtype, lengths, seeds, out=out),
                                  None, pad=p.tail_pad_mask(mine=False), tensors=p.tensor_of_rows(True, False))

    def _decode_buf(self, ex: Exchange, scratch: Scratch) -> Optional[torch.Tensor]:
        """The chunk-sized temporary `_update_residual` decodes into, where it needs one (None: into e)."""
        p = self.plan
        if ex.host_skip is None or p.low_precision or self.narrow_residuals:
            return scratch.get("dec", p.chunk_rows * p.block_size, p.dtype, p.device)
        return None

    def _server_pass(self, ex: Exchange, recv: torch.Tensor, scratch: Scratch) -> None:
        p, wc, sc, up, down = self.plan, self.wc, self.sc, self.up, self.down
        B, W, me = p.block_size, p.world_size, p.rank
        M = up.sizes[me]
        msgs = recv.view(W, M)
        own_seeds = self.seeds(SeedSite.OWN, Rows.FULL, ex.step)
        recv_seeds = [self.seeds(SeedSite.RECV, Rows.FULL, ex.step, i) for i in range(W)]
        total_buf = scratch.get("v", p.chunk_rows * B, p.compute_dtype, p.device)
        tmp_buf = self._decode_buf(ex, scratch)
        for a, b in p.chunks(p.F_me):
            n = (b - a) * B
            total = total_buf[:n].view(b - a, B)
            for i in range(W):                                  # sum in rank order, as the Simulator does
                fields = {}
                for k, f in enumerate(up.fields):
                    start = up.full_off[me][k] // f.itemsize
                    fields[f.name] = msgs[i].view(f.dtype)[start + a * f.full:start + b * f.full].view(b - a, f.full)
                s = recv_seeds[i]
                s = None if s is None else s[a:b]
                if p.low_precision:          # decoded in the gradients' dtype, summed in float32
                    dec = wc.decode(fields, B, p.dtype, None, s, out=tmp_buf[:n].view(b - a, B))
                    total.copy_(dec) if i == 0 else total.add_(dec)
                elif i == 0:
                    wc.decode(fields, B, p.dtype, None, s, out=total)
                else:
                    wc.decode_add(fields, B, p.dtype, total, None, s)
            vs = total.div_(W)
            if self.keep_server:
                vs.add_(self.s_full[a:b])
            fields = sc.encode(self._wire(vs, scratch), None, None if own_seeds is None else own_seeds[a:b])
            for k, f in enumerate(down.fields):
                start = down.full_off[me][k] // f.itemsize
                self.own.view(f.dtype)[start + a * f.full:start + b * f.full].view(b - a, f.full).copy_(fields[f.name])
            if self.keep_server:
                s = None if own_seeds is None else own_seeds[a:b]
                self._update_residual(ex, self.s_full[a:b], vs,
                                      lambda out: sc.decode(fields, B, p.dtype, None, s, out=out),
                                      None if tmp_buf is None else tmp_buf[:n].view(b - a, B), side=Side.SERVER,
                                      tensors=p.tensor_of_rows(False, True)[a:b])
        if p.T_me:
            self._server_tails(ex, msgs)
        n = p.dense_count[me]
        if n:                                           # the dense blocks this rank owns: their mean, in rank order
            itemsize = torch.empty((), dtype=p.dtype).element_size()
            start = up.dense_off[me] // itemsize
            total = self.own.view(p.dtype).narrow(0, down.dense_off[me] // itemsize, n)
            for i in range(W):
                part = msgs[i].view(p.dtype).narrow(0, start, n)
                total.copy_(part) if i == 0 else total.add_(part)
            total.div_(W)

    def _server_tails(self, ex: Exchange, msgs: torch.Tensor) -> None:
        p, wc, sc, up, down = self.plan, self.wc, self.sc, self.up, self.down
        W, me = p.world_size, p.rank
        lengths = p.my_tail_lengths_t()
        for k, f in enumerate(up.fields):
            pad, buf = up.tail_index(k, TailSlots.MINE_UP)
            self.recv_tail[k].view(W, -1)[:, pad] = msgs.view(f.dtype)[:, buf]
        total = None
        for i in range(W):
            fields = {f.name: self.recv_tail[k][i] for k, f in enumerate(up.fields)}
            dec = wc.decode(fields, p.cap, p.dtype, lengths, self.seeds(SeedSite.RECV, Rows.TAIL, ex.step, i))
            total = dec.to(p.compute_dtype, copy=True) if i == 0 else total.add_(dec)
        vs = total.div_(W).masked_fill_(p.tail_pad_mask(mine=True), 0)     # decoders leave padding unspecified
        if self.keep_server:
            vs.add_(self.s_tail)
        seeds = self.seeds(SeedSite.OWN, Rows.TAIL, ex.step)
        fields = sc.encode(self._wire(vs), lengths, seeds)
        for k, f in enumerate(down.fields):
            t = self.own_tail[k]
            t.copy_(fields[f.name]).masked_fill_(down.tail_invalid(k, mine=True), 0)
            pad, buf = down.tail_index(k, TailSlots.MINE_DOWN)
            self.own.view(f.dtype)[buf] = t.view(-1)[pad]
        if self.keep_server:
            own = {f.name: self.own_tail[k] for k, f in enumerate(down.fields)}
            self._update_residual(ex, self.s_tail, vs, lambda out: sc.decode(own, p.cap, p.dtype, lengths, seeds,
                                                                               out=out),
                                  None, pad=p.tail_pad_mask(mine=True), side=Side.SERVER,
                                  tensors=p.tensor_of_rows(True, True))

    # -- stage 3: decode the downlink into the outputs --------------------------------------------------------
    def finish(self, ex: Exchange, gathered: Optional[torch.Tensor], outs: List[torch.Tensor],
               scratch: Scratch, into_items: bool = False) -> None:
        """Decode the downlink (`gathered`, every owner's message) into `outs`; `into_items`: `outs` are the
        exchange's own items (a bucket reduced dense in place then needs no copy)."""
        p, sc, down = self.plan, self.sc, self.down if self.has_rows else None
        if self.has_rows:
            B = p.block_size
            seeds = self.seeds(SeedSite.GATHER, Rows.FULL, ex.step)
            for a, b in p.chunks(p.R):
                fields = {f.name: self._rows_view(gathered, down, i, a, b) for i, f in enumerate(down.fields)}
                segs = p.full_segments(a, b)
                direct = len(segs) == 1 and outs[segs[0][0]].is_contiguous()
                if direct:                     # the chunk lies in one tensor: decode straight into it
                    item, start, _, length = segs[0]
                    target = outs[item].narrow(0, start, length).view(b - a, B)
                else:
                    target = scratch.get("dec", p.chunk_rows * B, p.dtype, p.device)[:(b - a) * B].view(b - a, B)
                dec = sc.decode(fields, B, p.dtype, None, None if seeds is None else seeds[a:b], out=target)
                self._nan_if_skipped(ex, dec)
                if not direct:
                    dst, src = _views(outs, segs, True, dec)
                    _copy(dst, src)
            if p.T:
                for i, f in enumerate(down.fields):
                    pad, buf = down.tail_index(i, TailSlots.ALL)
                    self.down_tail[i].view(-1)[pad] = gathered.view(f.dtype)[buf]
                fields = {f.name: self.down_tail[i] for i, f in enumerate(down.fields)}
                dec = sc.decode(fields, p.cap, p.dtype, p.tail_lengths_t(), self.seeds(SeedSite.GATHER, Rows.TAIL, ex.step))
                self._nan_if_skipped(ex, dec)
                dst, src = _views(outs, p.tail_segments(), True, dec)
                _copy(dst, src)
            if p.dense_items:
                if ex.host_skip is not False:          # each owner's dense section, all NaN if skipped
                    typed, itemsize = gathered.view(p.dtype), torch.empty((), dtype=p.dtype).element_size()
                    for j, n in enumerate(p.dense_count):
                        if n:
                            start = (int(down.starts[j]) + down.dense_off[j]) // itemsize
                            self._nan_if_skipped(ex, typed.narrow(0, start, n))
                segs, views = down.dense_views(gathered)
                _copy([outs[i].narrow(0, start, n) for i, start, n in segs], views)
        elif p.dense_items:
            buf = ex.dense_buf                          # the mean already (`skip_flag`)
            self._nan_if_skipped(ex, buf)
            if not (ex.in_place_dense and into_items):
                off, dst, src = 0, [], []
                for i in p.dense_items:
                    dst.append(outs[i])
                    src.append(buf.narrow(0, off, p.numels[i]))
                    off += p.numels[i]
                _copy(dst, src)

    @staticmethod
    def _nan_if_skipped(ex: Exchange, t: torch.Tensor) -> None:
        if ex.host_skip is None:
            t.masked_fill_(ex.skip, float("nan"))
        elif ex.host_skip:
            t.fill_(float("nan"))

    def memory(self) -> Dict[str, int]:
        """Bytes this bucket keeps from step to step, by role."""
        def total(*ts):
            return sum(_nbytes(t) for t in ts if t is not None)
        out = {"worker_residual": total(self.e_full, self.e_tail), "server_residual": total(self.s_full, self.s_tail),
               "dense": total(self.dense_buf), "tables": sum(_nbytes(t) for t in self.plan._device_cache.values())}
        if self.has_rows:
            out["wire"] = total(self.send, self.exchange_buf, self.own)
            out["tails"] = total(self.vt, *self.up_tail, *self.recv_tail, *self.own_tail, *self.down_tail)
        return out

    # -- residuals by tensor -----------------------------------------------------------------------------------
    def worker_residual(self, key) -> Optional[torch.Tensor]:
        """The worker residual of tensor `key` (flat, its size), or None."""
        if not self.keep_worker:
            return None
        s = self._span(key)
        parts = [self.e_full[s.row0:s.row0 + s.full].reshape(-1)]
        if s.tail_row >= 0:
            parts.append(self.e_tail[s.tail_row, :s.tail])
        return torch.cat(parts)

    def server_residual(self, key) -> Optional[torch.Tensor]:
        """This rank's server residual of tensor `key`: its owned blocks, in block order, concatenated."""
        if not self.keep_server:
            return None
        s, p = self._span(key), self.plan
        rows = p.owned_full[p.rank]
        lo, hi = np.searchsorted(rows, [s.row0, s.row0 + s.full])
        parts = [self.s_full[lo:hi].reshape(-1)]
        if s.tail_row >= 0:
            t = int(np.searchsorted(p.owned_tail[p.rank], s.tail_row))
            if t < p.T_me and p.owned_tail[p.rank][t] == s.tail_row:
                parts.append(self.s_tail[t, :s.tail])
        return torch.cat(parts)

    def load_residuals(self, key, worker: Optional[torch.Tensor], server: Optional[torch.Tensor]) -> None:
        """Put tensor `key`'s residuals (as `worker_residual` / `server_residual` return them) in place."""
        s, p = self._span(key), self.plan
        B = p.block_size
        if worker is not None and self.keep_worker:
            worker = worker.reshape(-1).to(device=p.device, dtype=p.compute_dtype)
            _check_size(key, "worker", worker, s.numel)
            self.e_full[s.row0:s.row0 + s.full].view(-1).copy_(worker[:s.full * B])
            if s.tail_row >= 0:
                self.e_tail[s.tail_row, :s.tail] = worker[s.full * B:]
        if server is not None and self.keep_server:
            server = server.reshape(-1).to(device=p.device, dtype=p.compute_dtype)
            rows = p.owned_full[p.rank]
            lo, hi = np.searchsorted(rows, [s.row0, s.row0 + s.full])
            t = int(np.searchsorted(p.owned_tail[p.rank], s.tail_row)) if s.tail_row >= 0 else p.T_me
            has_tail = t < p.T_me and p.owned_tail[p.rank][t] == s.tail_row
            _check_size(key, "server", server, (hi - lo) * B + (s.tail if has_tail else 0))
            self.s_full[lo:hi].view(-1).copy_(server[:(hi - lo) * B])
            if has_tail:
                self.s_tail[t, :s.tail] = server[(hi - lo) * B:]

    def zero_residuals(self, key) -> None:
        """Zero tensor `key`'s residuals here (they have moved on)."""
        s, p = self._span(key), self.plan
        if self.keep_worker:
            self.e_full[s.row0:s.row0 + s.full].zero_()
            if s.tail_row >= 0:
                self.e_tail[s.tail_row].zero_()
        if self.keep_server:
            lo, hi = np.searchsorted(p.owned_full[p.rank], [s.row0, s.row0 + s.full])
            self.s_full[lo:hi].zero_()
            if s.tail_row >= 0:
                t = int(np.searchsorted(p.owned_tail[p.rank], s.tail_row))
                if t < p.T_me and p.owned_tail[p.rank][t] == s.tail_row:
                    self.s_tail[t].zero_()

    def numel(self, key) -> int:
        """Elements of tensor `key`."""
        return self._span(key).numel

    def _span(self, key):
        return self.compressed_keys[key]


def _nonfinite(compressor: Compressor, fields, v: torch.Tensor) -> torch.Tensor:
    flag = compressor.nonfinite(fields)
    return ~torch.isfinite(v.sum(dtype=torch.float64)) if flag is None else flag


def _check_size(key, which, t, expected):
    if t.numel() != expected:
        raise ValueError(f"{which} residual of {key!r} has {t.numel()} elements, this rank keeps {expected} for it: "
                         f"was the state saved with another model, block size or world size?")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def now() -> float:
    return time.perf_counter()
