"""`QualityGuard`: a tensor whose compression no longer contracts moves to a higher-fidelity compressor, then dense.

Error feedback is only as good as the compressor's contraction on the data it meets. Per pass, the fraction of the
compressed input's energy that a compressor keeps is

    delta = 1 - |v - C(v)|^2 / |v|^2          (v: the compensated input, g + e_i up, mean_i c_i + e down)

and the residual then settles near ``sqrt(1 - delta) / (1 - sqrt(1 - delta))`` times the input. On a standard
Gaussian block a compressor keeps its *nominal* delta_0 (sign: 2/pi; topk:0.01: about 0.07; int4:128: 0.99). Real
gradients can defeat it: a scaled sign over a block whose mass sits in a few entries (embedding and output-head
rows, heavy-tailed weight gradients) keeps delta near 0.1 on a transformer, its residuals grow to 10-20 times the
gradient, and training falls far behind dense, under SGD and AdamW alike (docs/RESULTS.md section 7).

The guard measures delta per tensor and pass on sampled steps (every step for the first `early` (32), then every
`sample_every` (8): two extra reads of the compensated input and of the residual, by rows, folded into per-tensor
sums; +19% of an int4:128 round's CPU time on a sampled step), and sums the ranks' figures in one small
all-reduce, so that every rank takes the same decision at the same step: after every sample during the first
`early` steps and after the first sample of a tensor under a new compressor, then every `window` samples. A tensor
whose delta on either pass is below ``min_fraction * delta_0`` moves to the `fallback` compressor, and a tensor
that fails under the fallback too goes dense. A switch loses nothing: the tensor's residuals move to its new
compressor's rows, or, going dense, are sent along with its next gradient (``g + e_i`` from every rank and ``W e``
from the owners), so the conservation law holds across it. Each switch warns (`QualityWarning`) and goes to the
monitor (``guard/switches`` and ``guard/<tensor>``, the new compressor's level: 1 the fallback, 2 dense).
"""
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ..compression.registry import get_compressor

__all__ = ["QualityGuard", "QualityWarning", "Switch", "nominal_delta", "DENSE_LEVEL"]

DENSE_LEVEL = 2


class QualityWarning(UserWarning):
    """A tensor's compressor stopped contracting on its gradients; the guard moved it to higher fidelity."""


_NOMINAL: Dict[Tuple[str, int], float] = {}


def nominal_delta(spec: str, block_size: int) -> float:
    """The fraction of a standard Gaussian block's energy that compressor `spec` keeps (mean of 4 seeded blocks of
    `block_size` elements): what it keeps on data without structure."""
    key = (spec, block_size)
    if key not in _NOMINAL:
        c = get_compressor(spec)
        gen = torch.Generator().manual_seed(20261203)
        err = total = 0.0
        for i in range(4):
            x = torch.randn(block_size, generator=gen)
            d = x - c.decompress(c.compress(x, seed=i))
            err += float(d.double().square().sum())
            total += float(x.double().square().sum())
        _NOMINAL[key] = 1.0 - err / total
    return _NOMINAL[key]


@dataclass
class Switch:
    """One decision of the guard: tensor `key`, under the bucket compressor `spec`, moved to `to` (None: dense)
    at `step`, because `pass_` kept `delta` of its input's energy (nominal `nominal`)."""
    step: int
    key: Hashable
    spec: str
    to: Optional[str]
    pass_: str
    delta: float
    nominal: float


class QualityGuard:
    """The per-tensor decisions of the guard (module docstring).

    Args:
        min_fraction: a pass keeping less than this fraction of its compressor's nominal delta fails.
        fallback: the compressor a failing tensor moves to (then dense); None: dense at once.
        block_size: the engine's block size (the nominal delta is measured on blocks of this size).
        sample_every: steps between sampled steps.
        window: samples per decision.
        early: for the first `early` steps every step is sampled and decided on: a residual that stops contracting
            grows within tens of steps, and what it feeds the optimiser meanwhile stays (Adam's second moment).
    """

    def __init__(self, min_fraction: float, fallback: Optional[str], block_size: int, sample_every: int = 8,
                 window: int = 4, early: int = 32):
        self.min_fraction, self.fallback, self.block_size = min_fraction, fallback, block_size
        self.sample_every, self.window, self.early = sample_every, window, early
        self.levels: Dict[Tuple[Hashable, str], int] = {}     # (tensor, bucket spec) -> 1 fallback, 2 dense
        self.switches: List[Switch] = []
        self._sums: Dict[Tuple[tuple, str], torch.Tensor] = {}
        self._samples = 0
        self._judged = set()          # (tensor, bucket spec) pairs decided on at least once

    # -- what a tensor uses --------------------------------------------------------------------------------------
    def spec_for(self, key: Hashable, spec: str) -> Optional[str]:
        """The compressor tensor `key` uses when its bucket's is `spec` (None: dense)."""
        level = self.levels.get((key, spec), 0)
        if level == 0:
            return spec
        return self.fallback if level == 1 and self.fallback not in (None, spec) else None

    def samples(self, step: int) -> bool:
        """Whether the engine measures delta at `step`."""
        return step < self.early or step % self.sample_every == 0

    # -- measurements --------------------------------------------------------------------------------------------
    def add(self, keys: Sequence[Hashable], spec: str, sums: torch.Tensor) -> None:
        """Add one sampled step's squared norms of a group of tensors compressed under bucket spec `spec`: `sums`
        is (4, len(keys)) on any device, rows worker error, worker input, server error, server input."""
        k = (tuple(keys), spec)
        acc = self._sums.get(k)
        self._sums[k] = sums.clone() if acc is None else acc.add_(sums)

    def end_sample(self) -> None:
        self._samples += 1

    def due(self, step: int) -> bool:
        """Whether the next step starts with a decision: a window of samples is complete, or a tensor has been
        sampled under a compressor for the first time (a compressor that does not contract would otherwise feed
        its inflated updates to the optimiser for a whole window, and Adam's second moment remembers them for
        about 1000 steps)."""
        if self._samples >= (1 if step <= self.early else self.window):
            return True
        return self._samples >= 1 and any((k, spec) not in self._judged for keys, spec in self._sums for k in keys)

    def decide(self, step: int, total: Callable[[List[float]], List[float]]) -> List[Switch]:
        """Sum the window's figures over the ranks (`total`: an all-reduce sum, called on every rank with the same
        number of values, in the same order) and move the failing tensors. Returns the new switches."""
        per: Dict[Tuple[Hashable, str], List[float]] = {}
        for (keys, spec), sums in self._sums.items():
            cols = sums.double().cpu().t().tolist()
            for key, four in zip(keys, cols):
                acc = per.setdefault((key, spec), [0.0] * 4)
                for i in range(4):
                    acc[i] += four[i]
        self._sums.clear()
        self._samples = 0
        self._judged.update(per)
        items = sorted(per.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))
        if not items:
            return []
        values = total([v for _, four in items for v in four])
        new = []
        for n, ((key, spec), _) in enumerate(items):
            current = self.spec_for(key, spec)
            if current is None:
                continue
            nominal = nominal_delta(current, self.block_size)
            if nominal <= 0:
                continue            # not a contraction even on Gaussian data: nothing to compare with
            for k, p in enumerate(("worker", "server")):
                err, inp = values[4 * n + 2 * k], values[4 * n + 2 * k + 1]
                if not inp > 0:
                    continue
                delta = 1.0 - err / inp
                if delta < self.min_fraction * nominal:
                    level = self.levels.get((key, spec), 0) + 1
                    if level == 1 and self.fallback in (None, spec):
                        level = DENSE_LEVEL
                    self.levels[(key, spec)] = level
                    sw = Switch(step, key, spec, self.spec_for(key, spec), p, delta, nominal)
                    self.switches.append(sw)
                    new.append(sw)
                    break
        return new

    @staticmethod
    def warn(switches: Sequence[Switch], describe: Callable[[Hashable], str] = str) -> None:
        if not switches:
            return
        lines = [f"{describe(s.key)}: the {s.pass_} pass of {s.spec!r} kept {s.delta:.3f} of its input's energy "
                 f"(on Gaussian data {s.nominal:.3f}) -> {s.to or 'dense'}" for s in switches]
        warnings.warn(f"DoubleSqueeze's quality guard moved {len(switches)} tensor(s) to higher fidelity at step "
                      f"{switches[0].step} (error feedback was not contracting; nothing is lost in the switch):\n  "
                      + "\n  ".join(lines), QualityWarning, stacklevel=2)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"levels": [[k, s, lvl] for (k, s), lvl in self.levels.items()],
                "switches": [vars(s).copy() for s in self.switches], "judged": [list(j) for j in self._judged]}

    def load_state_dict(self, sd: dict) -> None:
        self.levels = {(k, s): lvl for k, s, lvl in sd.get("levels", [])}
        self.switches = [Switch(**s) for s in sd.get("switches", [])]
        self._sums.clear()
        self._samples = 0
        self._judged = {tuple(j) for j in sd.get("judged", [])}
