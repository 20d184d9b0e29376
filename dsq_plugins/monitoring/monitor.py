"""Counters of one communication round and a TensorBoard writer for them."""
import os
from dataclasses import dataclass, fields

__all__ = ["Monitor", "RoundStats", "TensorBoardMonitor", "round_scalars"]


@dataclass
class RoundStats:
    """What one rank did in one communication round (or, summed, in many). Bytes are payload bytes that leave
    or reach this rank over the network (a rank's message to itself is not counted); dense paths count what a
    ring all-reduce moves, (W - 1) / W of the buffer in each pass."""

    bytes_up_sent: int = 0
    bytes_up_recv: int = 0
    bytes_down_sent: int = 0
    bytes_down_recv: int = 0
    dense_bytes: int = 0          # size of the gradients handled, uncompressed, in their own dtype
    payload_bytes: int = 0        # size of this rank's uplink payloads for them (all shards)
    compress_seconds: float = 0.0
    worker_error_sq: float = 0.0  # ||v_i - C(v_i)||^2 summed over tensors (only while a monitor is attached)
    worker_input_sq: float = 0.0  # ||v_i||^2
    server_error_sq: float = 0.0
    server_input_sq: float = 0.0
    skipped: int = 0              # reductions skipped for a non-finite gradient on some rank
    compressed_tensors: int = 0   # tensors sent compressed, and sent dense (small, or warm-up)
    dense_tensors: int = 0
    compressed_buckets: int = 0   # reductions with compressed tensors, and reductions all dense (warm-up, auto)
    dense_buckets: int = 0

    def add(self, other: "RoundStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def bytes_sent(self) -> int:
        return self.bytes_up_sent + self.bytes_down_sent

    @property
    def bytes_recv(self) -> int:
        return self.bytes_up_recv + self.bytes_down_recv

    @classmethod
    def from_dict(cls, d: dict) -> "RoundStats":
        """The counters of `as_dict` (its derived totals are recomputed, not read)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(bytes_sent=self.bytes_sent, bytes_recv=self.bytes_recv)
        return d


def round_scalars(stats: RoundStats, worker_residual_norm: float, server_residual_norm: float,
                  skipped_total: int) -> dict:
    """The metrics of one round, by tag (without prefix): bytes, compression ratio, residual norms, relative
    compression error of each pass, skipped steps, milliseconds spent compressing."""
    s = stats
    return {
        "bytes_up": s.bytes_up_sent,
        "bytes_down": s.bytes_down_recv,
        "bytes_sent": s.bytes_sent,
        "bytes_recv": s.bytes_recv,
        "compression_ratio": s.dense_bytes / s.payload_bytes if s.payload_bytes else 1.0,
        "worker_residual_norm": worker_residual_norm,
        "server_residual_norm": server_residual_norm,
        "worker_rel_error": (s.worker_error_sq / s.worker_input_sq) ** 0.5 if s.worker_input_sq else 0.0,
        "server_rel_error": (s.server_error_sq / s.server_input_sq) ** 0.5 if s.server_input_sq else 0.0,
        "skipped_steps": skipped_total,
        "compress_ms": 1000.0 * s.compress_seconds,
    }


class Monitor:
    """Where the collective's per-step metrics go; subclasses say how a scalar is written (`log_scalar`).
    `every` logs one step in `every`; tags live under `prefix`."""

    def __init__(self, every: int = 1, prefix: str = "dsq/"):
        self.every = max(1, int(every))
        self.prefix = prefix

    def wants(self, step: int) -> bool:
        return step % self.every == 0

    def log_round(self, step: int, stats: RoundStats, worker_residual_norm: float, server_residual_norm: float,
                  skipped_total: int) -> None:
        for tag, value in round_scalars(stats, worker_residual_norm, server_residual_norm, skipped_total).items():
            self.log_scalar(self.prefix + tag, value, step)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardMonitor(Monitor):
    """Writes the collective's per-step metrics (and anything else, such as the loss) as TensorBoard scalars.

    Attach it with ``DoubleSqueezeState(cfg, monitor=TensorBoardMonitor(logdir))`` or ``state.monitor = ...``.
    `every` logs one step in `every`. Tags live under ``prefix`` (default ``"dsq/"``).
    """

    def __init__(self, logdir: str, every: int = 1, prefix: str = "dsq/"):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(every, prefix)
        os.makedirs(logdir, exist_ok=True)
        self.logdir = logdir
        self.writer = SummaryWriter(logdir)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
