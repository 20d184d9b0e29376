"""The double-pass error-compensated collective: DoubleSqueeze on any `Communicator`.

For a flat bucket `g_i` on each of W ranks, rank r being the server of shard r of every bucket:

    worker i:   v_i = g_i + e_i;   c_i[j] = C_w(v_i[j]) for each shard j;   e_i <- v_i - c_i
                all_to_all: shard j of c_i goes to rank j                    (compressed bytes only)
    server r:   v = mean_i c_i[r] + e[r];   c[r] = C_s(v);   e[r] <- v - c[r]
                all_gather of c[r]                                           (compressed bytes only)
    every rank: the update is concat_r c[r]

Telescoping gives the conservation law ``sum_t c_t = sum_t mean_i g_i,t - mean_i e_i,T - e_T`` (DESIGN.md).
A bucket with a NaN/Inf on any rank is skipped on every rank: each uplink message carries a one-byte flag, so all
ranks learn it in the same all_to_all; no residual changes and the update is all-NaN, so that an AMP
`GradScaler` skips the optimiser step exactly as with plain DDP.
"""
import time
from typing import Hashable, Optional

import torch

from .communicator import Communicator
from .config import DoubleSqueezeConfig
from .memory import ErrorFeedback
from .monitor import RoundStats, TensorBoardMonitor
from .seeding import DOWNLINK, UPLINK, derive_seed
from .sharding import shard_bounds

__all__ = ["DoubleSqueezeCollective"]


class DoubleSqueezeCollective:
    """Owns what persists between steps (residuals, step, counters) and runs the double pass.

    Call `reduce(key, flat)` for every bucket of a step, then `finish_step()` once. `key` names the bucket
    (its residuals are kept under it); buckets must be reduced in the same order on every rank.
    """

    def __init__(self, config: DoubleSqueezeConfig, communicator: Communicator,
                 monitor: Optional[TensorBoardMonitor] = None):
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

    # -- the algorithm -------------------------------------------------------------------------------------
    def compresses(self, numel: int) -> bool:
        """Whether a bucket of `numel` elements is compressed at the current step (else: dense average)."""
        return self.step >= self.config.warmup_steps and numel >= max(self.config.min_numel, self.world_size)

    def reduce(self, key: Hashable, flat: torch.Tensor) -> torch.Tensor:
        """The update for a bucket: the compressed mean over ranks of `flat` (1-D, any float dtype), as a new
        tensor of the same size and dtype."""
        if flat.dim() != 1 or not flat.is_floating_point():
            raise ValueError(f"reduce expects a 1-D floating-point tensor, got shape {tuple(flat.shape)} "
                             f"dtype {flat.dtype}")
        if not self.compresses(flat.numel()):
            return self._dense(flat)
        return self._double_pass(key, flat)

    def _dense(self, flat: torch.Tensor) -> torch.Tensor:
        out = self.comm.all_reduce_sum(flat.clone()).div_(self.world_size)
        w, nbytes = self.world_size, flat.numel() * flat.element_size()
        ring = nbytes * (w - 1) // w
        r = self.round
        r.bytes_up_sent += ring
        r.bytes_up_recv += ring
        r.bytes_down_sent += ring
        r.bytes_down_recv += ring
        r.dense_bytes += nbytes
        r.payload_bytes += nbytes
        r.dense_buckets += 1
        if not bool(torch.isfinite(out.sum())):
            r.skipped += 1
        return out

    def _double_pass(self, key, flat):
        wc, sc, w, me = self._wc, self._sc, self.world_size, self.rank
        r, track = self.round, self.monitor is not None
        dtype, n = flat.dtype, flat.numel()
        bounds = shard_bounds(n, w)
        up = [wc.nbytes(e - s, dtype) for s, e in bounds]
        finite = bool(torch.isfinite(flat.sum()))

        # Worker pass: compensate, compress each shard; message j = [flag byte][payload of shard j].
        t0 = time.perf_counter()
        send = torch.zeros(sum(up) + w, dtype=torch.uint8)
        v = self.worker_memory.compensate(key, flat) if finite else flat
        sent = []
        offset = 0
        for j, (s, e) in enumerate(bounds):
            if finite:
                seed = derive_seed(self.config.seed, self.step, key, j, UPLINK, me if wc.seed_per_rank else -1)
                p = wc.compress(v[s:e], seed=seed)
                send[offset + 1:offset + 1 + up[j]] = p.to_buffer()
                sent.append(wc.decompress(p))
            else:
                send[offset] = 1
            offset += 1 + up[j]
        r.compress_seconds += time.perf_counter() - t0

        mine = bounds[me][1] - bounds[me][0]
        recv = self.comm.all_to_all(send, [1 + b for b in up], [1 + up[me]] * w).view(w, 1 + up[me])
        r.bytes_up_sent += sum(1 + b for j, b in enumerate(up) if j != me)
        r.bytes_up_recv += (w - 1) * (1 + up[me])
        r.dense_bytes += n * flat.element_size()
        r.payload_bytes += sum(up)

        if bool(recv[:, 0].any()):
            r.skipped += 1
            return torch.full_like(flat, float("nan"))

        t0 = time.perf_counter()
        if self.worker_memory.enabled:
            c = torch.cat(sent) if len(sent) > 1 else sent[0]
            self.worker_memory.update(key, v, c)
            if track:
                r.worker_error_sq += _sq(self.worker_memory.get(key))
                r.worker_input_sq += _sq(v)

        # Server pass for shard `me`: average, compensate, compress.
        total = None
        for i in range(w):
            ci = wc.decompress(wc.unpack(recv[i, 1:], (mine,), dtype))
            total = ci.clone() if total is None else total.add_(ci)
        mean = total.div_(w)
        vs = self.server_memory.compensate(key, mean)
        ps = sc.compress(vs, seed=derive_seed(self.config.seed, self.step, key, me, DOWNLINK))
        cs = sc.decompress(ps)
        self.server_memory.update(key, vs, cs)
        if track and self.server_memory.enabled:
            r.server_error_sq += _sq(self.server_memory.get(key))
            r.server_input_sq += _sq(vs)
        r.compress_seconds += time.perf_counter() - t0

        down = [sc.nbytes(e - s, dtype) for s, e in bounds]
        gathered = self.comm.all_gather(ps.to_buffer(), down)
        r.bytes_down_sent += (w - 1) * down[me]
        r.bytes_down_recv += sum(b for j, b in enumerate(down) if j != me)

        t0 = time.perf_counter()
        out = torch.empty_like(flat)
        offset = 0
        for j, (s, e) in enumerate(bounds):
            if j == me:
                out[s:e] = cs
            else:
                out[s:e] = sc.decompress(sc.unpack(gathered[offset:offset + down[j]], (e - s,), dtype))
            offset += down[j]
        r.compress_seconds += time.perf_counter() - t0
        r.compressed_buckets += 1
        return out

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
