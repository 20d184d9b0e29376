"""The double-pass error-compensated collective: DoubleSqueeze on any `Communicator`.

For each tensor `g_i` (flat) on each of W ranks, rank r being the server of shard r of every tensor:

    worker i:   v_i = g_i + e_i;   c_i[j] = C_w(v_i[j]) for each shard j;   e_i <- v_i - c_i
                all_to_all: shard j of c_i goes to rank j                    (compressed bytes only)
    server r:   v = mean_i c_i[r] + e[r];   c[r] = C_s(v);   e[r] <- v - c[r]
                all_gather of c[r]                                           (compressed bytes only)
    every rank: the update is concat_r c[r]

Telescoping gives the conservation law ``sum_t c_t = sum_t mean_i g_i,t - mean_i e_i,T - e_T`` (DESIGN.md).
Compression is per tensor (a parameter's gradient) and per shard, so the result does not depend on how an
integration groups tensors into buckets; a group of tensors travels in one all_to_all and one all_gather.
Tensors below `min_numel` elements, and all tensors during warm-up, travel uncompressed through the same two
passes (what a ring all-reduce moves) and keep no residual.

A step with a NaN/Inf on any rank is skipped on every rank: each uplink message carries a flag, so all
ranks learn it in the same all_to_all; no residual changes and the update is all-NaN, so that an AMP
`GradScaler` skips the optimiser step exactly as with plain DDP.
"""
import time
from typing import Dict, Hashable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .communicator import Communicator
from .compressors import NoneCompressor
from .config import DoubleSqueezeConfig
from .memory import ErrorFeedback
from .monitor import Monitor, RoundStats
from .seeding import DOWNLINK, UPLINK, derive_seed
from .sharding import shard_bounds

__all__ = ["DoubleSqueezeCollective", "Exchange"]

_DENSE = NoneCompressor()
_HEADER = 4          # bytes in front of each uplink message; the first is the non-finite flag


class _Planned(NamedTuple):
    """One tensor of a `reduce` call: its compressors this step, shard bounds, and payload bytes per shard."""
    key: Hashable
    flat: torch.Tensor
    wc: object
    sc: object
    bounds: List[Tuple[int, int]]
    up: List[int]
    down: List[int]
    dense: bool


class Exchange:
    """One `reduce` in flight, between its stages: the plan, the worker pass's uplink buffer and sizes (bytes
    per rank), the server pass's downlink buffer and sizes, and whether a non-finite gradient skipped it."""

    def __init__(self):
        self.plan: List[_Planned] = []
        self.finite = True
        self.skipped = False
        self.compensated: List[torch.Tensor] = []
        self.sent: List[List[torch.Tensor]] = []
        self.mine: List[torch.Tensor] = []
        self.send = self.gather = None
        self.send_sizes: List[int] = []
        self.recv_sizes: List[int] = []
        self.gather_sizes: List[int] = []


class DoubleSqueezeCollective:
    """Owns what persists between steps (residuals, step, counters) and runs the double pass.

    Call `reduce(items)` for each group of tensors of a step, then `finish_step()` once. Each item is
    ``(key, flat_tensor)``; `key` names the tensor (its residuals are kept under it, and it seeds random
    compressors). Groups must be reduced in the same order, with the same keys and sizes, on every rank.
    """

    def __init__(self, config: DoubleSqueezeConfig, communicator: Communicator,
                 monitor: Optional[Monitor] = None):
        if not isinstance(config, DoubleSqueezeConfig):
            raise TypeError(f"config must be a DoubleSqueezeConfig, got {type(config).__name__}")
        self.config = config
        self.comm = communicator
        self.rank = communicator.rank
        self.world_size = communicator.size
        self.monitor = monitor
        self.worker_memory = ErrorFeedback(config.worker_ef)
        self.server_memory = ErrorFeedback(config.server_ef)
        self.step = 0
        self.skipped_steps = 0
        self.totals = RoundStats()
        self.round = RoundStats()
        self._wc = config.worker
        self._sc = config.server
        self._buffers: Dict[Tuple, torch.Tensor] = {}

    # -- the algorithm -------------------------------------------------------------------------------------
    def compresses(self, numel: int) -> bool:
        """Whether a tensor of `numel` elements is compressed at the current step (else: sent dense)."""
        return self.step >= self.config.warmup_steps and numel >= max(self.config.min_numel, self.world_size)

    def reduce(self, items: Sequence[Tuple[Hashable, torch.Tensor]],
               outs: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """The updates for a group of tensors: for each ``(key, flat)`` (1-D, any float dtype), the compressed
        mean over ranks, as a new tensor of the same size and dtype (or written into `outs`, see `end`). One
        all_to_all and one all_gather.

        It is `begin`, the uplink all_to_all, `serve`, the downlink all_gather and `end`; an integration with
        asynchronous collectives (Horovod) runs those stages itself to overlap them with backward."""
        ex = self.begin(items)
        if not ex.plan:
            return []
        self.serve(ex, self.comm.all_to_all(ex.send, ex.send_sizes, ex.recv_sizes))
        gathered = None if ex.skipped else self.comm.all_gather(ex.gather, ex.gather_sizes)
        return self.end(ex, gathered, outs)

    def begin(self, items: Sequence[Tuple[Hashable, torch.Tensor]]) -> "Exchange":
        """Stage 1, the worker pass: compress ``g + e_i`` per tensor and shard into the uplink buffer
        `ex.send`, of which `ex.send_sizes[j]` bytes go to rank j and `ex.recv_sizes[j]` bytes come from it."""
        for key, flat in items:
            if flat.dim() != 1 or not flat.is_floating_point():
                raise ValueError(f"tensor {key!r}: reduce expects 1-D floating-point tensors, got shape "
                                 f"{tuple(flat.shape)} dtype {flat.dtype}")
        ex = Exchange()
        if not items:
            return ex
        w, me, r = self.world_size, self.rank, self.round
        for key, flat in items:
            dense = not self.compresses(flat.numel())
            wc, sc = (_DENSE, _DENSE) if dense else (self._wc, self._sc)
            bounds = shard_bounds(flat.numel(), w)
            ex.plan.append(_Planned(key, flat, wc, sc, bounds, [wc.nbytes(e - s, flat.dtype) for s, e in bounds],
                                    [sc.nbytes(e - s, flat.dtype) for s, e in bounds], dense))
            r.dense_bytes += flat.numel() * flat.element_size()
            r.payload_bytes += sum(ex.plan[-1].up)
            r.dense_tensors += dense
            r.compressed_tensors += not dense
        # One check (one sync on an accelerator) for all tensors: a sum is finite only if every element is.
        ex.finite = bool(torch.isfinite(torch.stack([flat.sum().double() for _, flat in items])).all())

        # Message to rank j: [flag, 3 zero bytes][payload of shard j of item 0][... of item 1]... The header is 4
        # bytes so that 4-byte-aligned payloads (fp32 values) stay aligned and unpack without a copy.
        t0 = time.perf_counter()
        to = ex.send_sizes = [_HEADER + sum(t.up[j] for t in ex.plan) for j in range(w)]
        ex.recv_sizes = [to[me]] * w
        send = ex.send = self._buffer(("send",) + tuple(t.key for t in ex.plan), sum(to))
        starts = [sum(to[:j]) for j in range(w)]
        send[[i for j in starts for i in range(j, j + _HEADER)]] = 0
        cursor = [s + _HEADER for s in starts]
        for t in ex.plan:
            keeps_residual = ex.finite and not t.dense and self.worker_memory.enabled and not t.wc.lossless
            v = (self.worker_memory.compensate(t.key, t.flat, self._buffer(("v", t.key), t.flat.numel(), t.flat.dtype))
                 if keeps_residual else t.flat)
            parts = []
            for j, (s, e) in enumerate(t.bounds):
                if ex.finite:
                    seed = derive_seed(self.config.seed, self.step, t.key, j, UPLINK, me if t.wc.seed_per_rank else -1)
                    p = t.wc.compress(v[s:e], seed=seed)
                    p.write_into(send[cursor[j]:cursor[j] + t.up[j]])
                    if keeps_residual:
                        parts.append(t.wc.decompress(p))
                cursor[j] += t.up[j]
            ex.compensated.append(v)
            ex.sent.append(parts)
        if not ex.finite:
            send[starts] = 1
        r.compress_seconds += time.perf_counter() - t0
        return ex

    def serve(self, ex: "Exchange", recv: torch.Tensor) -> None:
        """Stage 2, given the uplink bytes received (`sum(ex.recv_sizes)`): update the worker residuals, then
        the server pass for this rank's shard of every tensor into the downlink buffer `ex.gather`
        (`ex.gather_sizes[j]` bytes from rank j). If any rank flagged a non-finite gradient, `ex.skipped` is
        set instead and no residual changes."""
        w, me, r = self.world_size, self.rank, self.round
        track = self.monitor is not None
        if recv.numel() != sum(ex.recv_sizes):
            raise RuntimeError(f"uplink: received {recv.numel()} bytes, expected {sum(ex.recv_sizes)}: the ranks "
                               f"disagree on the tensors of this group (shapes, dtypes or order)")
        recv = recv.view(w, ex.recv_sizes[0])
        r.bytes_up_sent += sum(b for j, b in enumerate(ex.send_sizes) if j != me)
        r.bytes_up_recv += (w - 1) * ex.recv_sizes[0]
        if bool(recv[:, 0].any()):
            r.skipped += 1
            ex.skipped = True
            return

        t0 = time.perf_counter()
        ex.gather = self._buffer(("gather",) + tuple(t.key for t in ex.plan), sum(t.down[me] for t in ex.plan))
        offset, g_off = _HEADER, 0
        for t, v, parts in zip(ex.plan, ex.compensated, ex.sent):
            if parts:
                self.worker_memory.update(t.key, v, parts)
                if track:
                    r.worker_error_sq += _sq(self.worker_memory.get(t.key))
                    r.worker_input_sq += _sq(v)
            n_me = t.bounds[me][1] - t.bounds[me][0]
            received = [t.wc.decompress(t.wc.unpack(recv[i, offset:offset + t.up[me]], (n_me,), t.flat.dtype))
                        for i in range(w)]
            total = self._buffer(("mean", t.key), n_me, t.flat.dtype)
            if w > 1:
                torch.add(received[0], received[1], out=total)      # one pass for the first two
            else:
                total.copy_(received[0])
            for ci in received[2:]:
                total.add_(ci)
            offset += t.up[me]
            mean = total.div_(w)
            server_residual = not t.dense and self.server_memory.enabled and not t.sc.lossless
            vs = self.server_memory.compensate(t.key, mean, mean) if server_residual else mean
            ps = t.sc.compress(vs, seed=derive_seed(self.config.seed, self.step, t.key, me, DOWNLINK))
            ps.write_into(ex.gather[g_off:g_off + t.down[me]])
            g_off += t.down[me]
            cs = t.sc.decompress(ps)
            if server_residual:
                self.server_memory.update(t.key, vs, cs)
                if track:
                    r.server_error_sq += _sq(self.server_memory.get(t.key))
                    r.server_input_sq += _sq(vs)
            ex.mine.append(cs)
        ex.gather_sizes = [sum(t.down[j] for t in ex.plan) for j in range(w)]
        r.compress_seconds += time.perf_counter() - t0

    def end(self, ex: "Exchange", gathered: Optional[torch.Tensor],
            outs: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Stage 3, given the downlink bytes (every rank's `ex.gather`, in rank order): the updates, one per
        tensor, written into `outs` if given (1-D, each the size and dtype of its tensor; it may be the input
        tensor itself), else into new tensors. A skipped exchange (no downlink) gives all-NaN updates."""
        if outs is None:
            outs = [torch.empty_like(t.flat) for t in ex.plan]
        if ex.skipped:
            for out in outs:
                out.fill_(float("nan"))
            return outs
        w, me, r = self.world_size, self.rank, self.round
        sizes = ex.gather_sizes
        if gathered.numel() != sum(sizes):
            raise RuntimeError(f"downlink: received {gathered.numel()} bytes, expected {sum(sizes)}: the ranks "
                               f"disagree on the tensors of this group (shapes, dtypes or order)")
        r.bytes_down_sent += (w - 1) * sizes[me]
        r.bytes_down_recv += sum(b for j, b in enumerate(sizes) if j != me)

        t0 = time.perf_counter()
        block = [sum(sizes[:j]) for j in range(w)]
        for t, out, cs in zip(ex.plan, outs, ex.mine):
            for j, (s, e) in enumerate(t.bounds):
                if j == me:
                    out[s:e] = cs
                else:
                    out[s:e] = t.sc.decompress(t.sc.unpack(gathered[block[j]:block[j] + t.down[j]], (e - s,),
                                                            t.flat.dtype))
                block[j] += t.down[j]
        r.compress_seconds += time.perf_counter() - t0
        return outs

    def _buffer(self, key: Tuple, numel: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """A scratch tensor reused from step to step (a fresh large allocation costs page faults every step).
        Keys name a role and the tensors it serves; an exchange's buffers are free again once it has ended,
        which is always before the next exchange of the same tensors begins."""
        buf = self._buffers.get(key)
        if buf is None or buf.numel() != numel or buf.dtype != dtype:
            buf = self._buffers[key] = torch.empty(numel, dtype=dtype)
        return buf

    # -- steps, counters, monitoring -----------------------------------------------------------------------
    def finish_step(self) -> RoundStats:
        """Close the current step (communication round): advance `step`, fold the round's counters into
        `totals`, log to the monitor. Returns the round's counters."""
        stats, self.round = self.round, RoundStats()
        if stats.skipped:
            self.skipped_steps += 1
        self.totals.add(stats)
        if self.monitor is not None and self.monitor.wants(self.step):
            self.monitor.log_round(self.step, stats, self.worker_memory.norm(), self.server_memory.norm(),
                                   self.skipped_steps)
        self.step += 1
        return stats

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"config": self.config.to_dict(), "world_size": self.world_size, "rank": self.rank}

    def state_dict(self) -> dict:
        """Everything needed for an exact resume of this rank (each rank saves its own)."""
        return dict(self._identity(), step=self.step, skipped_steps=self.skipped_steps,
                    totals=self.totals.as_dict(), worker_memory=self.worker_memory.state_dict(),
                    server_memory=self.server_memory.state_dict())

    def check_compatible(self, sd: dict) -> None:
        """Refuse a state saved under another world size, rank or config, with a message that says which."""
        mine = self._identity()
        for name in ("world_size", "rank"):
            if sd.get(name) != mine[name]:
                raise ValueError(f"cannot load a DoubleSqueeze state saved with {name}={sd.get(name)} into one "
                                 f"with {name}={mine[name]}: residuals are per rank and per shard")
        if sd.get("config") != mine["config"]:
            diff = {k: (sd.get("config", {}).get(k), v) for k, v in mine["config"].items()
                    if sd.get("config", {}).get(k) != v}
            raise ValueError(f"cannot load a DoubleSqueeze state saved with another config; differing keys "
                             f"(saved, current): {diff}")

    def load_state_dict(self, sd: dict) -> None:
        self.check_compatible(sd)
        self.step = sd["step"]
        self.skipped_steps = sd["skipped_steps"]
        totals = RoundStats()
        for k, v in sd["totals"].items():
            if hasattr(totals, k) and not isinstance(getattr(type(totals), k, None), property):
                setattr(totals, k, v)
        self.totals = totals
        self.worker_memory.load_state_dict(sd["worker_memory"])
        self.server_memory.load_state_dict(sd["server_memory"])


def _sq(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()) ** 2)
