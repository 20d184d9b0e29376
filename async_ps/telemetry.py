"""The server's TensorBoard log: counters, staleness histogram, pushes per second, residual norms and losses."""
import math
from collections import Counter
from typing import Dict, Optional

import torch

from .sessions import Slot, Staleness

__all__ = ["Telemetry"]


class Telemetry:
    """Writes the server's scalars to TensorBoard in `logdir` (prefix ``ps/``, step: the version) at most once a
    second: the counters, protocol errors, live workers, the staleness of the pushes applied since the last write,
    and per worker its pushes per second, loss, residual norm (as it reported it) and downlink residual norm
    ``|x - x_hat_j|`` (computed by the shards after each write: `keep_norms`)."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.monitor = None
        self.norms: Dict[str, float] = {}
        self._last: Optional[float] = None      # monotonic seconds of the last write
        self._pushes: Dict[str, int] = {}       # session -> its worker's pushes at the last write

    def open(self) -> None:
        if self.logdir:
            from dsq_plugins.monitoring.monitor import TensorBoardMonitor
            self.monitor = TensorBoardMonitor(str(self.logdir), prefix="ps/")

    def close(self) -> None:
        if self.monitor:
            self.monitor.close()
            self.monitor = None

    def write(self, now: float, staleness: Staleness, slots: Dict[str, Slot], counters: Counter,
              errors: Counter) -> bool:
        """Write the scalars if a second passed since the last write (`now`: monotonic seconds); True if it did
        (the caller then has the shards compute the downlink norms for the next write)."""
        m = self.monitor
        if m is None or now - (self._last or 0.0) < 1.0:
            return False
        dt = now - (now if self._last is None else self._last)
        self._last = now
        step = staleness.version
        for tag in ("applied", "rejected", "skipped", "dropped", "rejoined", "bytes_up", "bytes_down"):
            m.log_scalar(f"ps/{tag}", counters[tag], step)
        m.log_scalar("ps/worker_skipped", sum(s.worker_skipped for s in slots.values()), step)
        m.log_scalar("ps/protocol_errors", sum(errors.values()), step)
        m.log_scalar("ps/live_workers", len(slots), step)
        taus = staleness.take_recent_taus()
        if taus:
            m.writer.add_histogram("ps/staleness", torch.tensor(taus, dtype=torch.float32), step)
        pushes = {s.session: s.accepted + s.rejected + s.skipped for s in slots.values()}
        for wid, s in slots.items():
            if dt > 0:
                m.log_scalar(f"ps/pushes_per_s/{wid}", (pushes[s.session] - self._pushes.get(s.session, 0)) / dt,
                             step)
            if wid in self.norms:      # computed by the shards after the last write (a consistent cut)
                m.log_scalar(f"ps/downlink_residual_norm/{wid}", self.norms[wid], step)
            m.log_scalar(f"ps/worker_residual_norm/{wid}", s.worker_rnorm, step)
            if s.loss is not None:
                m.log_scalar(f"ps/loss/{wid}", s.loss, step)
        self._pushes = pushes
        m.flush()
        return True

    def keep_norms(self, job) -> None:
        """A NORMS job's callback (in a shard thread): keep ``|x - x_hat_j|`` by worker for the next write."""
        self.norms = {w: math.sqrt(v) for w, v in job.sq.items()}
