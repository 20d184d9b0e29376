"""`AutoTuner`: ``compressor="auto"`` chooses, per bucket, between dense and the candidate compressors from what
the job's own steps measure, so that compression is on only where it pays.

What it measures: the wall time of each step (from one step's first reduction to the next one's: compute, wire,
compression, everything the user waits for), averaged over the ranks, and per bucket the seconds of compression
work and the bytes on the wire. It explores, then exploits:

    explore   each mode in turn for `settle` unmeasured steps (new plans, DDP's bucket rebuild) and up to
              `measure` measured ones (median): every candidate compressor on every bucket, then dense; a mode
              whose first measured step is `abort` times slower than the best so far is dropped at once (one
              slow step, not `measure`). Then a per-bucket mix: with step times T_d (dense), T_c (best
              compressor c), its compression seconds W_c and bytes N_c against dense's N_d, the link's throughput
              is about BW = (N_d - N_c) / (T_d - T_c + W_c) (two equations ``T = compute + work + bytes / BW``),
              and bucket b pays when its work w_b < (n_d,b - n_c,b) / BW; the mix is measured like the others.
    choose    the fastest mode; dense unless a compressed mode is faster by more than `prefer_dense`.
    exploit   every `check_every` steps the mean step time is compared with the chosen mode's: `drift` slower or
              faster (the link or the load changed: another mode may win now), and it explores again (a drift
              whose exploration changes nothing widens the band 1.5x, up to 4x `drift`: noise). The chosen
              mode's time is the mean of its first `check_every` steps in exploitation (the exploration's
              median of `measure` steps moves with the spread of single steps, and would start drifts itself). A
              compressed mode bound by its compression work does not get faster when the link does, so every
              `probe_every` steps two timed all-reduces (a few KB, then about 20 ms worth) measure the link, and
              dense's step is predicted from it (the chosen step, less its compression work, plus dense's ring
              bytes over the link); it explores when that prediction beats the chosen mode, or when the link
              itself changed by `link_change` since the choice's first probe (probes go on during the holdoff
              that follows a confirmed exploration; only the prediction waits). And after
              `reexplore_every` steps anyway, a period that doubles each time an exploration confirms the choice
              (and starts again when one changes it), so that a slow mode is not tried too often.

Every rank must take the same decision at the same step: decisions fall on step counts that are the same
everywhere, and every measurement they use goes through one small all-reduce (`sync`) first, so all ranks decide
from the same numbers. The exploit phase's check does not wait for it where the caller can issue it without
waiting (`sync_async`): the all-reduce is issued at the step that completes the `check_every` steps and its result
read, and the check decided, at the next one. A blocking all-reduce there would hold every rank's backward pass
until the slowest reaches it, a barrier each `check_every` steps that costs what the ranks' skew is (on a loaded
host, tens to hundreds of milliseconds).

Switching never loses mass: a bucket that goes dense sends its residuals along with its gradients, and one that
changes compressor carries its residuals over (`DoubleSqueezeCollective`).
"""
import statistics
import time
from typing import Callable, Dict, Hashable, List, Optional, Sequence

__all__ = ["AutoTuner", "DENSE", "MIXED", "time_all_reduce"]

DENSE = "dense"
MIXED = "mixed"


def time_all_reduce(comm, nbytes: int, device) -> float:
    """Seconds of a blocking all-reduce of `nbytes` on `comm` (a `Communicator`): auto's probe of the link."""
    import torch
    buf = torch.zeros(max(1, nbytes // 4), dtype=torch.float32, device=device)
    cuda = buf.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(buf.device)
    t0 = time.perf_counter()
    comm.all_reduce_sum(buf)
    if cuda:
        torch.cuda.synchronize(buf.device)
    return time.perf_counter() - t0


class AutoTuner:
    """The decision of ``compressor="auto"`` (module docstring). `choice(bucket)` is what a bucket uses now (a
    compressor spec, or None for dense); `on_step_start` is called once per step, before its first reduction.

    Args:
        candidates: compressor specs to choose from, besides dense.
        settle, measure, abort, prefer_dense, check_every, drift, reexplore_every: the schedule (steps) and
            thresholds (fractions) of the module docstring.
        probe_every: under a compressed mode, steps between probes of the link (`on_step_start`).
        link_change: a probe that finds the link this many times faster or slower than the first probe after the
            last choice starts an exploration.
        clock: where step times come from (seconds; default `time.perf_counter`).
    """

    def __init__(self, candidates: Sequence[str], settle: int = 1, measure: int = 3, abort: float = 1.5,
                 prefer_dense: float = 0.03, check_every: int = 10, drift: float = 0.1, reexplore_every: int = 200,
                 probe_every: int = 25, link_change: float = 2.0, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        if not candidates:
            raise ValueError("auto needs at least one candidate compressor")
        self.candidates = list(candidates)
        self.settle, self.measure, self.abort = settle, measure, abort
        self.prefer_dense, self.check_every, self.drift, self.reexplore_every = (prefer_dense, check_every, drift,
                                                                                 reexplore_every)
        self.mode: str = self.candidates[0]
        self.assignment: Dict[Hashable, Optional[str]] = {}    # the mixed mode's choice per bucket
        self._mix_base: Optional[str] = None                  # ... and of a bucket it did not measure
        self._chosen_time = 0.0
        self.phase = "explore"
        self.queue: List[str] = self.candidates[1:] + [DENSE]
        self.samples: Dict[str, List[float]] = {}
        self.times: Dict[str, float] = {}          # mode -> its measured step time (seconds, mean over ranks)
        self.history: List[tuple] = []             # (step, mode) of every switch, the first mode included
        self.switches = 0
        self._done = 0                             # steps completed in the current mode
        self._since_choice = 0
        self._period = reexplore_every
        self._drift_now = drift
        self._by_drift = False
        self._rebase = False                  # the next check takes its mean as the chosen mode's time
        self.probe_every = probe_every
        self._probe_holdoff = probe_every
        self._last_probe = 0
        self.ring = 1.0                       # bytes a ring all-reduce moves per rank, per byte of its buffer
        self._probe: Optional[Callable[[int], float]] = None
        self._sync_async: Optional[Callable[[List[float]], Callable[[], List[float]]]] = None
        self.bandwidth = 125e6                # the last probe's estimate (bytes/s per rank); a first guess
        self._choice_bandwidth: Optional[float] = None     # the first probe's estimate after the last choice
        self.link_change = link_change
        self.predicted_dense: Optional[float] = None
        self._explored_from: Optional[str] = None    # the mode chosen before this exploration
        self._last_start: Optional[float] = None
        self._local: List[float] = []              # this rank's step times not yet synchronised
        self._pending: Optional[Callable[[], List[float]]] = None     # a check's mean in flight (`sync_async`)
        self._work: Dict[str, Dict[Hashable, List[float]]] = {}   # mode -> bucket -> [seconds, bytes, dense bytes]
        self._work_steps: Dict[str, int] = {}

    # -- what a bucket uses ----------------------------------------------------------------------------------
    def choice(self, bucket: Hashable) -> Optional[str]:
        """The compressor spec bucket `bucket` uses at this step, or None: dense."""
        if self.mode == MIXED:
            return self.assignment.get(bucket, self._mix_base)
        return None if self.mode == DENSE else self.mode

    def record(self, mode_step: bool, bucket: Hashable, seconds: float, nbytes: int, dense_nbytes: int) -> None:
        """One bucket's compression seconds and wire bytes at a measured step of the current mode."""
        if not mode_step:
            return
        w = self._work.setdefault(self.mode, {}).setdefault(bucket, [0.0, 0.0, 0.0])
        w[0] += seconds
        w[1] += nbytes
        w[2] += dense_nbytes

    @property
    def measuring(self) -> bool:
        """Whether the step now running is a measured one of an exploration."""
        return self.phase == "explore" and self._done >= self.settle

    # -- the schedule ------------------------------------------------------------------------------------------
    def on_step_start(self, step: int, now: float, sync: Callable[[List[float]], List[float]],
                      probe: Optional[Callable[[int], float]] = None,
                      sync_async: Optional[Callable[[List[float]], Callable[[], List[float]]]] = None) -> None:
        """A step begins at `now` (seconds): account the one that just ended, then decide this step's mode.
        `sync(values)` is the mean of `values` over the ranks (an all-reduce), called at the same steps on every
        rank. `probe(nbytes)` times (seconds, this rank) an all-reduce of `nbytes`: the link's throughput, which a
        compressed mode's own step time no longer shows once compression work, not the wire, bounds it.
        `sync_async(values)`, if given, issues the same all-reduce and returns a callable that waits for it and
        gives the mean: the exploit phase's checks then read it one step later instead of waiting."""
        self._probe = probe
        self._sync_async = sync_async
        if self._last_start is not None:
            self._local.append(now - self._last_start)
            self._done += 1
            if self.phase == "explore":
                self._explore_step(sync)
            else:
                self._exploit_step(sync)
        if not self.history:
            self.history.append((step, self.mode))
        elif self.history[-1][1] != self.mode:
            self.history.append((step, self.mode))
        self._last_start = now

    def _explore_step(self, sync) -> None:
        if self._done <= self.settle:
            self._local.clear()
            return
        t = sync([self._local[-1]])[0]
        self._local.clear()
        self._work_steps[self.mode] = self._work_steps.get(self.mode, 0) + 1
        samples = self.samples.setdefault(self.mode, [])
        samples.append(t)
        best = min(self.times.values(), default=None)
        if len(samples) >= self.measure or (best is not None and samples[0] > self.abort * best):
            self.times[self.mode] = statistics.median(samples)
            self._next(sync)

    def _next(self, sync) -> None:
        if not self.queue and MIXED not in self.times and self.mode != MIXED:
            mix = self._mix(sync)
            if mix is not None:
                self.assignment = mix
                self.queue.append(MIXED)
        if self.queue:
            self._switch(self.queue.pop(0))
            return
        best = min(self.times, key=self.times.get)
        if best != DENSE and self.times[best] > (1 - self.prefer_dense) * self.times.get(DENSE, float("inf")):
            best = DENSE
        self.phase = "exploit"
        self._since_choice = self._last_probe = 0
        self._choice_bandwidth = None
        if self._explored_from is not None:
            confirmed = best == self._explored_from
            self._period = self._period * 2 if confirmed else self.reexplore_every
            self._probe_holdoff = self._period if confirmed else self.probe_every
            # a drift that changed nothing was noise: a wider band next time (up to 4x), until a choice changes
            if confirmed and self._by_drift:
                self._drift_now = min(4 * self.drift, 1.5 * self._drift_now)
            elif not confirmed:
                self._drift_now = self.drift
        self._by_drift = False
        self._switch(best)
        self._chosen_time = self.times[best]
        self._rebase = True

    def _exploit_step(self, sync) -> None:
        self._since_choice += 1
        if self._done <= self.settle:
            self._local.clear()
            return
        if self._pending is not None:          # the mean issued at the last step: decide on it now
            t, self._pending = self._pending()[0], None
            self._check(t, sync)
            return
        if len(self._local) < self.check_every:
            return
        mean = sum(self._local) / len(self._local)
        self._local.clear()
        if self._sync_async is not None:
            self._pending = self._sync_async([mean])
            return
        self._check(sync([mean])[0], sync)

    def _check(self, t: float, sync) -> None:
        """The exploit phase's check of the chosen mode, on `t`, the mean step time over the last `check_every`
        steps and the ranks. The first check after a choice takes `t` as the chosen mode's time: the exploration
        measured it over `measure` steps, where one slow or fast step moves the median by the step times' spread."""
        if self._rebase:
            self._rebase, self._chosen_time = False, t
        elif abs(t - self._chosen_time) > self._drift_now * self._chosen_time:
            self._by_drift = True
            self.explore()
            return
        if self._since_choice >= self._period or self._dense_pays_now(sync):
            self.explore()

    def _dense_pays_now(self, sync) -> bool:
        """Under a compressed mode, every `probe_every` steps: the link's throughput from two timed all-reduces
        (a small one for the latency, one sized for about 20 ms, after an untimed small one that every rank
        reaches first), and from it dense's step predicted as the chosen mode's step less its compression work
        plus dense's ring bytes over the link (no overlap assumed). True when that beats the chosen mode by
        `prefer_dense`: the link got faster, explore."""
        if self._probe is None or self.mode == DENSE or self._since_choice - self._last_probe < self.probe_every:
            return False
        self._last_probe = self._since_choice
        work = self._work.get(self.mode) or self._work.get(self._mix_base or "", {})
        steps = max(1, self._work_steps.get(self.mode, self._work_steps.get(self._mix_base or "", 0)))
        if not work:
            return False
        big = int(min(64 << 20, max(256 << 10, self.bandwidth * 0.02)))
        small = 4096
        self._probe(small)          # untimed: the ranks' skew is waited out here, not in the latency's figure
        t_small, t_big = sync([self._probe(small), self._probe(big)])
        if t_big <= t_small:
            return False
        self.bandwidth = (big - small) * self.ring / (t_big - t_small)       # bytes per second, per rank
        # the link itself changed since this choice (its first probe): explore, whatever the prediction says (a
        # prediction that assumes no overlap can miss a faster link under a framework that overlaps, FSDP)
        if self._choice_bandwidth is None:
            self._choice_bandwidth = self.bandwidth
        elif max(self.bandwidth / self._choice_bandwidth, self._choice_bandwidth / self.bandwidth) > self.link_change:
            return True
        if self._since_choice < self._probe_holdoff:
            return False
        w_c = sum(v[0] for v in work.values()) / steps
        ring_bytes = sum(v[2] for v in work.values()) / steps
        self.predicted_dense = self._chosen_time - w_c + ring_bytes / self.bandwidth
        return self.predicted_dense < (1 - self.prefer_dense) * self._chosen_time

    def explore(self) -> None:
        """Start a new exploration (at the next step boundary every rank reaches)."""
        self.phase = "explore"
        self._explored_from = self.mode
        self.samples, self.times, self._work, self._work_steps = {}, {}, {}, {}
        order = self.candidates + [DENSE]
        first = self.mode if self.mode in order else order[0]
        self.queue = [m for m in order if m != first]
        self._switch(first, force=True)

    def _switch(self, mode: str, force: bool = False) -> None:
        if mode != self.mode or force:
            if mode != self.mode:
                self.switches += 1
            self.mode = mode
            self._done = 0
            self._local.clear()

    def _mix(self, sync) -> Optional[Dict[Hashable, Optional[str]]]:
        """The per-bucket assignment from the pure modes' measurements (module docstring), or None when it would
        be a pure mode."""
        if DENSE not in self.times:
            return None
        compressed = {m: t for m, t in self.times.items() if m not in (DENSE, MIXED)}
        if not compressed:
            return None
        best = min(compressed, key=compressed.get)
        work = self._work.get(best, {})
        steps = max(1, self._work_steps.get(best, 0))
        buckets = sorted(work, key=repr)
        if not buckets:
            return None
        flat = [x / steps for b in buckets for x in work[b]]
        flat = sync(flat)                  # the same numbers on every rank
        per = {b: flat[3 * i:3 * i + 3] for i, b in enumerate(buckets)}
        w_c = sum(v[0] for v in per.values())
        saved = sum(v[2] - v[1] for v in per.values())
        denominator = self.times[DENSE] - self.times[best] + w_c
        if saved <= 0 or denominator <= 0:
            return None                   # the link is fast enough that dense is free: nothing to mix
        bandwidth = saved / denominator
        # a bucket that saves no bytes (its tensors are all small: dense anyway) keeps the compressor's plan
        mix = {b: (best if v[2] <= v[1] or v[0] < (v[2] - v[1]) / bandwidth else None) for b, v in per.items()}
        if len(set(mix.values())) < 2:
            return None
        self._mix_base = best
        return mix

    def scalars(self) -> Dict[str, float]:
        """What the monitor logs each step: the mode (0 dense, 1.. the candidates in order, then the mix), the
        switches so far, whether exploring, and the measured step time of each mode (seconds)."""
        order = [DENSE] + self.candidates + [MIXED]
        out = {"auto/mode": float(order.index(self.mode)), "auto/switches": float(self.switches),
               "auto/exploring": float(self.phase == "explore")}
        for mode, t in self.times.items():
            out[f"auto/step_seconds/{mode}"] = t
        if self.predicted_dense is not None:
            out["auto/link_bytes_per_s"] = self.bandwidth
            out["auto/predicted_dense_seconds"] = self.predicted_dense
        return out

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"mode": self.mode, "phase": self.phase, "times": dict(self.times), "switches": self.switches,
                "assignment": {repr(k): v for k, v in self.assignment.items()},
                "chosen_time": self._chosen_time}

    def load_state_dict(self, sd: dict) -> None:
        """Resume in the saved mode; a mixed mode, whose buckets are named by this process, is explored again."""
        if sd.get("phase") == "exploit" and sd.get("mode") != MIXED and sd.get("chosen_time"):
            self.mode, self.phase, self.times = sd["mode"], "exploit", dict(sd["times"])
            self._chosen_time, self._rebase = sd["chosen_time"], True
        self.switches = sd.get("switches", 0)
