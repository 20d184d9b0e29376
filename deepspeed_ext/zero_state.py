"""What DoubleSqueeze's ZeRO-2 and ZeRO-3 states share (`zero2.py`, `zero3.py`): the worker residual and the uplink
that keeps it (`IndexedReduceScatter`), the layouts of DeepSpeed's buckets, the step and its counters, the quality
guard, and the checkpoint's header.

The quality guard (`dsq_plugins.engine.guard`, ``"guard"`` in the section) watches the uplink as one tensor: DeepSpeed's
buckets mix parameters, so it cannot move one parameter. On sampled steps the uplink adds up, over every message this
rank sends, ``|v - C_w(v)|^2`` and ``|v|^2``; the ranks' sums decide together, at the start of a step, and if the
uplink keeps less than ``guard`` times its compressor's nominal share of the energy, every bucket moves to the
`fallback` compressor (then to lossless, ``none``), with a `QualityWarning` and ``guard/switches`` on the monitor.
The residual carries over, so nothing is lost in the switch. The parameter downlink keeps its compressor.

``"compressor": "auto"`` (`dsq_plugins.engine.auto`) chooses at the start of each step, the same on every rank, between
dense and the `candidates`, for the whole uplink as one bucket (``GUARD_KEY``), from the job's own step times. A dense
step is a warm-up step: DeepSpeed's own collectives, exact, with the worker residual added to the gradients the first
time (each bucket's elements, for every owner; then zeroed) and, under ZeRO-2, the copy made exact by DeepSpeed's
all-gather: nothing is lost in the switch either way. ``uplink_mode`` says what the step that ran last used."""
import time
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch

from dsq_plugins.compression.registry import get_compressor
from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.engine.auto import DENSE, AutoTuner, time_all_reduce
from dsq_plugins.engine.communicator import TorchDistributedCommunicator
from dsq_plugins.engine.guard import QualityGuard
from dsq_plugins.engine.reshard import complete_run
from dsq_plugins.engine.sharded import IndexedReduceScatter
from dsq_plugins.monitoring.monitor import Monitor, RoundStats

from .loss_scale import LossScaleUnits

__all__ = ["BucketLayout", "ShardedZeroState", "common_refusals", "GUARD_KEY"]

GUARD_KEY = "uplink"        # the one "tensor" the guard judges under ZeRO: the whole gradient uplink


def common_refusals(config: DoubleSqueezeConfig) -> List[str]:
    """What of `config` neither ZeRO-2 nor ZeRO-3 honours (each a reason)."""
    bad = []
    if config.policy:
        bad.append("a per-parameter policy (ZeRO compresses DeepSpeed's buckets, which mix parameters)")
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
        auto: the `AutoTuner` under ``"compressor": "auto"``, else None.
        uplink_mode: the uplink's compressor at the last step that reduced (auto's or the guard's choice), or
            ``"dense"`` (warm-up, auto's dense mode).
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
        self.auto: Optional[AutoTuner] = AutoTuner(config.candidate_specs) if config.auto else None
        self._spec: Optional[str] = config.candidate_specs[0]     # this step's uplink compressor (None: dense)
        self._decided = -1                                         # the step `_spec` was decided for
        self._residual_live = False        # whether the residual may hold mass (a dense step then flushes it)
        self.uplink_mode = DENSE
        self.uplink = IndexedReduceScatter(get_compressor(self._spec), config.block_size, self.residual,
                                           config.worker_ef, config.seed)
        self._layouts: Dict[tuple, BucketLayout] = {}
        self.loss_scale = loss_scale
        self._at_step_start = None if loss_scale is None else torch.empty_like(self.residual)
        self.guard = QualityGuard(config.guard, config.fallback, config.block_size) if config.guard > 0 else None
        self._sample: Optional[torch.Tensor] = None      # this step's (error, input) squared norms, when sampled

    def warming_up(self) -> bool:
        return self.step < self.config.warmup_steps

    # -- this step's mode ------------------------------------------------------------------------------------------
    def compressing(self) -> bool:
        """Whether this step's collectives are compressed (not warm-up, not auto's dense mode). The first call of a
        step decides, at the same point on every rank (auto's schedule takes small all-reduces)."""
        if self._decided != self.step:
            self._decided = self.step
            self._spec = self._decide()
        return self._spec is not None

    def _decide(self) -> Optional[str]:
        if self.warming_up():
            return None
        if self.auto is None:
            return self.config.compressor
        W = self.world_size
        self.auto.ring = 2 * (W - 1) / W
        self.auto.on_step_start(self.step, self.auto.clock(), self._mean_over_ranks,
                                self._time_all_reduce if W > 1 else None)
        spec = self.auto.choice(GUARD_KEY)
        if spec is not None:
            self._use(spec)
        return spec

    def _use(self, spec: str) -> None:
        """Compress the uplink with `spec`, or with where the guard has moved it (the residual carries over)."""
        actual = self.guard.spec_for(GUARD_KEY, spec) if self.guard is not None else spec
        self.uplink.set_compressor(get_compressor(actual or "none"))

    def _mean_over_ranks(self, values: List[float]) -> List[float]:
        return [v / self.world_size for v in self._sum_over_ranks(values)]

    def _time_all_reduce(self, nbytes: int) -> float:
        return time_all_reduce(self.comm, nbytes, self.residual.device)

    def _start_reduction(self) -> None:
        """Before each bucket reduction, compressed or dense: at the step's first, the loss scale's units and the
        copy an overflow restores, and the guard's schedule."""
        if self._rounds == 0:
            if self.loss_scale is not None:
                self.loss_scale.follow(self.optimizer, self.residual.mul_)
                self._at_step_start.copy_(self.residual)
            self._guard_step_start()

    # -- the uplink --------------------------------------------------------------------------------------------------
    def reduce(self, flat: torch.Tensor, layout: BucketLayout, average: bool) -> torch.Tensor:
        """The uplink of one bucket: this rank's elements (``layout.index[rank]`` order, float32)."""
        self._start_reduction()
        before = self._round.bytes_sent, self._round.compress_seconds
        out, _ = self.uplink(self.comm, flat, layout.index, layout.position, average, self._rounds, self.step,
                             self._round, self._sample)
        self._rounds += 1
        self._residual_live = True
        self.uplink_mode = self.uplink.codec.spec
        if self.auto is not None:
            self.auto.record(self.auto.measuring, GUARD_KEY, self._round.compress_seconds - before[1],
                             self._round.bytes_sent - before[0], self._ring_bytes(flat.numel(), flat.element_size()))
        return out

    def needs_flush(self) -> bool:
        """Whether a dense reduction must carry the residual along (`flush_into`): mass may be left in it."""
        return self._residual_live

    def dense_reduction(self, numel: int, itemsize: int) -> None:
        """A bucket of `numel` elements of `itemsize` bytes that DeepSpeed reduces itself (warm-up, auto's dense
        mode): the step's start, its counters (a reduce-scatter's bytes) and auto's record. Then, where
        `needs_flush`, `flush_into` the bucket."""
        self._start_reduction()
        self._rounds += 1
        self.uplink_mode = DENSE
        W = self.world_size
        nbytes = (W - 1) * numel * itemsize // W               # a reduce-scatter's bytes per rank
        self._round.bytes_up_sent += nbytes
        self._round.bytes_up_recv += nbytes
        self._round.dense_bytes += nbytes
        self._round.payload_bytes += nbytes
        if self.auto is not None and not self.warming_up():
            self.auto.record(self.auto.measuring, GUARD_KEY, 0.0, nbytes, self._ring_bytes(numel, itemsize))

    def flush_into(self, flat: torch.Tensor, layout: BucketLayout) -> None:
        """Add the worker residual of the bucket's elements, every owner's, to `flat` (the bucket DeepSpeed is about
        to reduce densely), and zero it there: the stock reduction delivers it, nothing is lost."""
        t0 = time.perf_counter()
        for index, position in zip(layout.index, layout.position):
            if index.numel():
                flat[index] += self.residual[position].to(flat.dtype)
                self.residual[position] = 0
        self._round.compress_seconds += time.perf_counter() - t0

    def _ring_bytes(self, numel: int, itemsize: int) -> int:
        """What a ring all-reduce of a bucket sends per rank (auto's dense reference)."""
        W = self.world_size
        return 2 * (W - 1) * numel * itemsize // W

    # -- the quality guard (module docstring) ---------------------------------------------------------------------
    def _guard_step_start(self) -> None:
        """At a step's first reduction, the same step on every rank: decide if a window is complete, and sample
        this step or not."""
        self._sample = None
        if self.guard is None or not self.compressing():
            return
        if self.guard.due(self.step):
            switches = self.guard.decide(self.step, self._sum_over_ranks)
            if switches:
                self.guard.warn(switches, lambda key: "the gradient uplink (every bucket)")
                self._apply_guard()
                if self.monitor is not None:
                    self.monitor.log_scalar(self.monitor.prefix + "guard/switches", len(self.guard.switches),
                                            self.step)
        if self.guard.samples(self.step):
            self._sample = torch.zeros(2, dtype=torch.float64, device=self.residual.device)

    def _apply_guard(self) -> None:
        self._use(self._base_spec())

    def _base_spec(self) -> str:
        """The compressor the uplink would use without the guard: auto's choice or the config's."""
        return self._spec if self._spec is not None else self.config.candidate_specs[0]

    @property
    def uplink_compressor(self) -> str:
        """The compressor the uplink uses now (the guard may have moved it)."""
        return self.uplink.codec.spec

    def _sum_over_ranks(self, values: List[float]) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.residual.device)
        return self.comm.all_reduce_sum(t).tolist()

    def _end_sample(self, skipped: bool) -> None:
        if self._sample is not None and not skipped:
            s = self._sample.cpu()
            self.guard.add([GUARD_KEY], self._base_spec(),
                           torch.tensor([[s[0]], [s[1]], [0.0], [0.0]], dtype=torch.float64))
            self.guard.end_sample()
        self._sample = None

    def run_step(self, step, *args, **kwargs):
        """`step` (the optimizer's own), then the step's counters, its metrics and the step count."""
        dense = self._decided == self.step and self._spec is None
        result = step(*args, **kwargs)
        stats, self._round = self._round, RoundStats()
        overflow = self.loss_scale is not None and bool(getattr(self.optimizer, "overflow", False))
        if overflow and self._rounds > 0:
            self.residual.copy_(self._at_step_start)        # DeepSpeed dropped the step: nothing of it stays
        stats.skipped = int(stats.skipped > 0 or overflow)
        self._end_sample(bool(stats.skipped))
        self.skipped_steps += stats.skipped
        if dense:
            stats.dense_buckets += 1
            if not overflow:
                self._residual_live = False             # every bucket of the step carried its residual along
        self._totals.add(stats)
        if self.monitor is not None and self.monitor.wants(self.step):
            self.monitor.log_round(self.step, stats, *self.residual_norms(), self.skipped_steps)
            if self.auto is not None:
                for tag, value in self.auto.scalars().items():
                    self.monitor.log_scalar(self.monitor.prefix + tag, value, self.step)
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
        self._residual_live = False

    def residual_spans(self) -> List[Tuple[int, int]]:
        """Where the residual's elements are: ``(start, numel)`` per span, the spans holding the parameters'
        elements one after another in an order that does not depend on the number of ranks; anything else in the
        residual is padding (always zero)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {"format": self.FORMAT, "world_size": self.world_size, "rank": self.rank, "step": self.step,
                "skipped_steps": self.skipped_steps, "config": self.config.to_dict(),
                "residual": self.residual.clone(), "spans": self.residual_spans(), "totals": self._totals.as_dict(),
                "guard": None if self.guard is None else self.guard.state_dict(),
                "auto": None if self.auto is None else self.auto.state_dict()}

    def _check_origin(self, sd: dict) -> None:
        if sd.get("format") != self.FORMAT:
            raise ValueError(f"not this DoubleSqueeze state (format {sd.get('format')!r}, expected {self.FORMAT!r})")
        differ = [k for k, v in self.config.to_dict().items() if sd["config"].get(k) != v]
        if differ:
            raise ValueError(f"checkpoint was written with another DoubleSqueeze config (differs in {differ})")

    def load_state_dict(self, sd: dict) -> None:
        """Resume from `state_dict` of the same rank, world size and config: the residual, step and counters."""
        self._check_origin(sd)
        if sd["world_size"] != self.world_size or sd["rank"] != self.rank:
            raise ValueError(f"state of rank {sd['rank']} of {sd['world_size']} loaded on rank {self.rank} of "
                             f"{self.world_size}")
        if sd["residual"].shape != self.residual.shape:
            raise ValueError(f"residual of {tuple(sd['residual'].shape)} for this model's {tuple(self.residual.shape)}")
        self.residual.copy_(sd["residual"])
        self._load_progress(sd)

    def load_resharded(self, saved: Iterable[dict]) -> dict:
        """Resume from every rank's `state_dict` of a run saved on another number of ranks (DeepSpeed's universal
        checkpoint), the residual's mass kept: every rank's worker residual becomes the saved ranks' mean, element
        by element along `residual_spans`, so the mean over ranks, what the conservation law holds, is the saved
        one; what a rank now owns of it goes out with its next reduction, the rest compressed as ever. The step,
        the counters and the states of auto and the guard (the same on every rank) come from the saved rank 0.

        `saved` is consumed one state at a time, in rank order (an iterator that loads each file to the CPU keeps
        one saved residual in memory, besides the float32 sum). Returns the saved rank 0's state, less its
        residual."""
        mine = self.residual_spans()
        total = torch.zeros(self.residual.numel(), dtype=torch.float32)
        headers, first = [], None
        for sd in saved:
            self._check_origin(sd)
            spans = sd.get("spans")
            if spans is None:
                raise ValueError("the saved states do not say where their residual's elements are (saved by a "
                                 "version without 'spans'): they resume on as many ranks only (without the "
                                 "doublesqueeze_rank_*.pt files the residuals start from zero)")
            if [n for _, n in spans] != [n for _, n in mine]:
                raise ValueError(f"the saved residual holds spans of {[n for _, n in spans]} elements, this model's "
                                 f"{[n for _, n in mine]}")
            for (a0, n), (a, _) in zip(spans, mine):
                total[a:a + n] += sd["residual"][a0:a0 + n].float().cpu()
            self._take_saved(sd)
            headers.append({k: sd.get(k) for k in ("rank", "world_size", "config")})
            if sd.get("rank") == 0:
                first = {k: v for k, v in sd.items() if k != "residual"}
        old = complete_run(headers)
        self.residual.copy_(total.div_(len(old)))
        self._load_progress(first)
        return first

    def _take_saved(self, sd: dict) -> None:
        """`load_resharded`'s hook: what else a stage keeps of each saved state as it goes by."""

    def _load_progress(self, sd: dict) -> None:
        self._residual_live = bool(self.residual.any())
        self.step, self.skipped_steps = sd["step"], sd["skipped_steps"]
        self._decided = -1
        if self.auto is not None and sd.get("auto"):
            self.auto.load_state_dict(sd["auto"])
        self._totals = RoundStats.from_dict(sd["totals"])
        if self.guard is not None and sd.get("guard"):
            self.guard.load_state_dict(sd["guard"])
            self._apply_guard()
