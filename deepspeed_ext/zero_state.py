"""What DoubleSqueeze's ZeRO-2 and ZeRO-3 states share (`zero2.py`, `zero3.py`): the worker residual and the uplink
that keeps it (`IndexedReduceScatter`), the layouts of DeepSpeed's buckets, the step and its counters, and the
checkpoint's header."""
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.engine.communicator import TorchDistributedCommunicator
from dsq_plugins.engine.sharded import IndexedReduceScatter
from dsq_plugins.monitoring.monitor import Monitor, RoundStats

from .loss_scale import LossScaleUnits

__all__ = ["BucketLayout", "ShardedZeroState", "common_refusals"]


def common_refusals(config: DoubleSqueezeConfig) -> List[str]:
    """What of `config` neither ZeRO-2 nor ZeRO-3 honours (each a reason)."""
    bad = []
    if config.policy:
        bad.append("a per-parameter policy (ZeRO compresses DeepSpeed's buckets, which mix parameters)")
    if config.auto:
        bad.append("compressor 'auto' (name a compressor)")
    return bad


class BucketLayout(NamedTuple):
    """Where a bucket's elements go. Per rank r: `index[r]` (positions in the bucket's flat tensor) and
    `position[r]` (positions in the residual) of the elements r owns; `own`: this rank's pieces, as the stage
    needs them to write its result back."""
    index: List[torch.Tensor]
    position: List[torch.Tensor]
    own: list

    @classmethod
    def of(cls, index: List[List[torch.Tensor]], position: List[List[torch.Tensor]], own: list,
           device) -> "BucketLayout":
        """From per-rank lists of `arange` pieces."""
        def joined(parts):
            return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)
        return cls([joined(i) for i in index], [joined(p) for p in position], own)


class ShardedZeroState:
    """The shared part of a ZeRO stage's state (`engine.doublesqueeze`).

    Attributes:
        config: the `DoubleSqueezeConfig`.
        step: optimizer steps taken since installation (warm-up counts them).
        skipped_steps: steps in which some bucket held a non-finite gradient on some rank.
        residual: the worker residual, laid out as the subclass says (`residual_numel`): float32, or bfloat16
            (``"residual_dtype": "bf16"``: half the memory; the compensation ``g + e`` still runs in float32).
        loss_scale: under fp16, the loss scale the residual is in units of (`loss_scale.py`); else None. The
            residual is then also copied at each step's first reduction, and restored from the copy when DeepSpeed
            skips the step for an overflow (4 more bytes per element, fp16 only).
    """

    FORMAT = ""

    def __init__(self, optimizer, config: DoubleSqueezeConfig, monitor: Optional[Monitor], residual_numel: int,
                 device, loss_scale: Optional[LossScaleUnits] = None, residual_dtype: torch.dtype = torch.float32):
        self.optimizer, self.config, self.monitor = optimizer, config, monitor
        self.comm = TorchDistributedCommunicator(optimizer.dp_process_group)
        self.world_size, self.rank = self.comm.size, self.comm.rank
        self.step = 0
        self.skipped_steps = 0
        self._rounds = 0                       # bucket reductions since the step began (the frames' keys)
        self._totals, self._round = RoundStats(), RoundStats()
        self.residual = torch.zeros(residual_numel, dtype=residual_dtype, device=device)
        self.uplink = IndexedReduceScatter(config.worker, config.block_size, self.residual, config.worker_ef,
                                           config.seed)
        self._layouts: Dict[tuple, BucketLayout] = {}
        self.loss_scale = loss_scale
        self._at_step_start = None if loss_scale is None else torch.empty_like(self.residual)

    def warming_up(self) -> bool:
        return self.step < self.config.warmup_steps

    def reduce(self, flat: torch.Tensor, layout: BucketLayout, average: bool) -> torch.Tensor:
        """The uplink of one bucket: this rank's elements (``layout.index[rank]`` order, float32)."""
        if self._rounds == 0 and self.loss_scale is not None:
            self.loss_scale.follow(self.optimizer, self.residual.mul_)
            self._at_step_start.copy_(self.residual)
        out, _ = self.uplink(self.comm, flat, layout.index, layout.position, average, self._rounds, self.step,
                             self._round)
        self._rounds += 1
        return out

    def run_step(self, step, *args, **kwargs):
        """`step` (the optimizer's own), then the step's counters, its metrics and the step count."""
        warm = self.warming_up()
        result = step(*args, **kwargs)
        stats, self._round = self._round, RoundStats()
        overflow = self.loss_scale is not None and bool(getattr(self.optimizer, "overflow", False))
        if overflow and self._rounds > 0:
            self.residual.copy_(self._at_step_start)        # DeepSpeed dropped the step: nothing of it stays
        stats.skipped = int(stats.skipped > 0 or overflow)
        self.skipped_steps += stats.skipped
        if warm:
            stats.dense_buckets += 1
        self._totals.add(stats)
        if self.monitor is not None and self.monitor.wants(self.step):
            self.monitor.log_round(self.step, stats, *self.residual_norms(), self.skipped_steps)
        self.step += 1
        self._rounds = 0
        return result

    @property
    def totals(self) -> RoundStats:
        """The counters summed over completed steps."""
        return self._totals

    def residual_norms(self) -> Tuple[float, float]:
        """(||e_i||, the owner's residual's norm) of this rank, L2."""
        return float(self.residual.norm()), 0.0

    def reset_residuals(self) -> None:
        self.residual.zero_()

    def state_dict(self) -> dict:
        return {"format": self.FORMAT, "world_size": self.world_size, "rank": self.rank, "step": self.step,
                "skipped_steps": self.skipped_steps, "config": self.config.to_dict(),
                "residual": self.residual.clone(), "totals": self._totals.as_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from `state_dict` of the same rank, world size and config: the residual, step and counters."""
        if sd.get("format") != self.FORMAT:
            raise ValueError(f"not this DoubleSqueeze state (format {sd.get('format')!r}, expected {self.FORMAT!r})")
        if sd["world_size"] != self.world_size or sd["rank"] != self.rank:
            raise ValueError(f"state of rank {sd['rank']} of {sd['world_size']} loaded on rank {self.rank} of "
                             f"{self.world_size}")
        differ = [k for k, v in self.config.to_dict().items() if sd["config"].get(k) != v]
        if differ:
            raise ValueError(f"checkpoint was written with another DoubleSqueeze config (differs in {differ})")
        if sd["residual"].shape != self.residual.shape:
            raise ValueError(f"residual of {tuple(sd['residual'].shape)} for this model's {tuple(self.residual.shape)}")
        self.residual.copy_(sd["residual"])
        self.step, self.skipped_steps = sd["step"], sd["skipped_steps"]
        self._totals = RoundStats.from_dict(sd["totals"])
