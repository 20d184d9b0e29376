"""Session and staleness control of the parameter server: who is connected (`Sessions`) and what becomes of each
push and pull (`Staleness`): the version, the staleness ``tau`` of a push and its step, the blocking bound, and the
rounds of the synchronous mode. Both run in the control thread, under its lock (heartbeats excepted, see
`Sessions.heartbeat`); they hold no arithmetic.
"""
import logging
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .protocol import ProtocolError
from .shards import PullKind, Push

__all__ = ["Mode", "StalenessPolicy", "PushStatus", "PendingPull", "Slot", "HeldCopy", "Verdict", "Sessions",
           "Staleness"]

log = logging.getLogger("async_ps.server")          # the server's log: its lines keep the server's logger name


class Mode(Enum):
    ASYNC = "async"      # each push applied as it arrives
    SYNC = "sync"        # the baseline: a round waits for every live worker's push and applies their mean


class StalenessPolicy(Enum):
    INVERSE = "inverse"      # step 1 / (1 + tau)
    CONSTANT = "constant"    # step 1


class PushStatus(Enum):
    """What became of a push (its ``status`` on the wire)."""

    APPLIED = "applied"
    REJECTED = "rejected"    # staler than the bound: not applied, the worker keeps its residual
    SKIPPED = "skipped"      # NaN or Inf in it: not applied


@dataclass
class PendingPull:
    """A pull held at the blocking bound: who asked (`identity`, request `seq`), whether in full, and the fields of
    the push it answers (a step's ack; empty for a plain pull)."""

    identity: bytes
    seq: int
    full: bool
    ack: dict


@dataclass
class Slot:
    """What the server knows about one connected worker (counts are of pushes, versions are the server's)."""

    worker: str
    session: str
    identity: bytes
    x_hat: Optional[List[torch.Tensor]] = None      # the worker's copy of each key; each shard writes only its own
    held: bool = False                              # a full pull was sent: x_hat is (or is being) set
    base: int = 0                                   # version of the worker's last pull
    clock: int = 0                                  # pushes made (applied, rejected or skipped), for the bound
    pulls: int = 0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    behind: bool = False                            # last push rejected as stale: not waited for
    done: bool = False
    pending_pull: Optional[PendingPull] = None      # a pull at the bound
    loss: Optional[float] = None                    # last values the worker reported
    worker_rnorm: float = 0.0
    worker_skipped: int = 0
    joined: float = field(default_factory=time.monotonic)

    def report(self, loss, rnorm) -> None:
        """Keep the loss and residual norm a push reported (header fields; ignored unless numbers)."""
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            self.loss = float(loss)
        if isinstance(rnorm, (int, float)) and not isinstance(rnorm, bool):
            self.worker_rnorm = float(rnorm)


@dataclass(frozen=True)
class HeldCopy:
    """A worker's downlink copy as a checkpoint kept it: the session and pull count it had then, the version of its
    last pull (`base`) and its ``x_hat`` per key."""

    session: str
    pulls: int
    base: int
    x_hat: List[torch.Tensor]


@dataclass(frozen=True)
class Verdict:
    """A push's outcome: `status` (and `reason`, for the worker), its staleness `tau` (versions) and step `scale`."""

    status: PushStatus
    reason: str
    tau: int
    scale: float


class Sessions:
    """The workers connected to this server: a `Slot` per worker name, the workers that said they are done, when
    each was last heard from (monotonic seconds), and the downlink copies of a resumed checkpoint, kept for their
    workers until they rejoin. Counts joins, rejoins, drops, leaves and resumed downlinks in `counters`."""

    def __init__(self, counters: Counter):
        self.counters = counters
        self.slots: Dict[str, Slot] = {}
        self.done_workers = set()
        self.seen: Dict[str, float] = {}         # worker -> monotonic time of its last message (I/O thread writes)
        self.resumable: Dict[str, HeldCopy] = {}

    def join(self, wid: str, identity: bytes, clock: int, held) -> Slot:
        """A new session for `wid` starting at `clock`, replacing any older one. `held` is what the worker says it
        holds (``{"session", "pulls"}`` of its last session): when that is what a resumed checkpoint kept, the
        worker keeps its ``x_hat_j`` (and so its downlink residual) instead of pulling the full model again."""
        if wid in self.slots:
            self.counters["rejoined"] += 1
            log.info("worker %s rejoined: its downlink state is reset, it gets a full pull", wid)
        slot = Slot(worker=wid, session=secrets.token_hex(8), identity=identity, clock=clock)
        saved = self.resumable.pop(wid, None)
        if saved and isinstance(held, dict) and [held.get("session"), held.get("pulls")] == [saved.session,
                                                                                              saved.pulls]:
            slot.x_hat = [t.clone() for t in saved.x_hat]
            slot.held = True
            slot.base = saved.base
            self.counters["resumed_downlinks"] += 1
        self.slots[wid] = slot
        self.done_workers.discard(wid)
        self.seen[wid] = time.monotonic()
        self.counters["joins"] += 1
        return slot

    def find(self, wid: str, session) -> Optional[Slot]:
        """The slot of `wid` if `session` is its current session, else None."""
        slot = self.slots.get(wid)
        return slot if slot is not None and slot.session == session else None

    def heard(self, slot: Slot, identity: bytes) -> None:
        """A request came from the worker (at socket `identity`, which may change on reconnect)."""
        self.seen[slot.worker] = time.monotonic()
        slot.identity = identity

    def heartbeat(self, wid: str, session, skipped) -> bool:
        """A heartbeat of `wid`'s `session` (with its count of skipped updates): True when the session is known.
        Called by the I/O thread without the lock: a dict read and plain assignments (atomic in CPython)."""
        slot = self.slots.get(wid)
        known = slot is not None and slot.session == session
        if known:
            self.seen[wid] = time.monotonic()
            if isinstance(skipped, int):
                slot.worker_skipped = skipped
        return known

    def leave(self, wid: str) -> None:
        """The worker said goodbye: forget it at once."""
        del self.slots[wid]
        self.counters["left"] += 1

    def finish(self, slot: Slot) -> None:
        """The worker said it is done: left out of the pack from now on."""
        slot.done = True
        self.done_workers.add(slot.worker)

    def drop_silent(self, now: float, timeout: float) -> None:
        """Drop, with their downlink state, the workers not heard from for `timeout` seconds before `now`."""
        for wid, slot in list(self.slots.items()):
            if now - self.seen.get(wid, slot.joined) > timeout:
                log.warning("worker %s silent for %.1f s: dropped with its downlink state", wid, timeout)
                del self.slots[wid]
                self.counters["dropped"] += 1

    def resume(self, copies: Dict[str, HeldCopy]) -> None:
        """Keep the downlink copies of a resumed checkpoint, by worker, until each worker rejoins (see `join`)."""
        self.resumable = dict(copies)

    def pulled(self, slot: Slot, full: bool, version: int, nkeys: int) -> PullKind:
        """A pull of `slot` is answered at `version`: in full (its ``x_hat_j`` starts over: `nkeys` keys the shards
        fill) when it holds no copy or asks for one, else as a delta against its copy."""
        if slot.x_hat is None or full or not slot.held:
            slot.x_hat = [None] * nkeys
            slot.held = True
            kind = PullKind.FULL
        else:
            kind = PullKind.DELTA
        slot.base = version
        slot.pulls += 1
        return kind

    def holding(self) -> List[Slot]:
        """The workers a full pull was sent to (their ``x_hat_j`` exists)."""
        return [s for s in self.slots.values() if s.held]


class Staleness:
    """The version (pushes applied; rounds in sync mode) and what it decides: a push's staleness ``tau = version -
    base``, whether it is applied and with which step, and whether a pull may be answered now or waits at the
    blocking bound (see server.py's docstring: the pack's clock is the lower median of the live workers'). Keeps
    the staleness of applied pushes (`taus`, and `recent_taus` for the log) and counts pushes in `counters`.

    Args:
        sessions: the workers. counters: the server's counters.
        mode, policy: `Mode` and `StalenessPolicy`. max_staleness: the bound, in versions.
        gate: whether this server holds pulls at the bound (server 0 only: one gate bounds the whole model).
    """

    def __init__(self, sessions: Sessions, counters: Counter, mode: Mode, policy: StalenessPolicy,
                 max_staleness: int, gate: bool):
        self.sessions, self.counters = sessions, counters
        self.mode, self.policy, self.max_staleness, self.gate = mode, policy, max_staleness, gate
        self.version = 0
        self.taus: Counter = Counter()
        self.recent_taus: List[int] = []
        self.round: Dict[str, Push] = {}          # sync mode: this round's pushes, by worker

    def resume(self, version: int, taus: Dict[int, int]) -> None:
        """Continue from a checkpoint's version and staleness counts."""
        self.version = version
        self.taus = Counter(taus)

    # -- pulls
    def gate_members(self) -> List[Slot]:
        return [s for s in self.sessions.slots.values() if not s.done and not s.behind and s.held]

    def pack_clock(self) -> int:
        """The lower median of the clocks of the workers the bound waits for (0 when there are none)."""
        clocks = sorted(s.clock for s in self.gate_members())
        return clocks[(len(clocks) - 1) // 2] if clocks else 0

    def may_pull(self, slot: Slot) -> bool:
        if self.mode is Mode.SYNC:
            return slot.worker not in self.round
        if not self.gate:
            return True
        if slot not in self.gate_members():
            return True
        return slot.clock - self.pack_clock() < self.max_staleness

    def hold(self, slot: Slot, pull: PendingPull) -> None:
        """Hold `pull` at the bound until `released`."""
        slot.pending_pull = pull

    def released(self) -> Iterator[Tuple[Slot, PendingPull]]:
        """The held pulls that may go now, taken off their workers; each worker is checked when reached, after the
        caller answered the ones before (an answer can move the pack's clock)."""
        for slot in self.sessions.slots.values():
            if slot.pending_pull is not None and self.may_pull(slot):
                pull, slot.pending_pull = slot.pending_pull, None
                slot.identity = pull.identity
                yield slot, pull

    # -- pushes
    def check(self, slot: Slot, base: int) -> None:
        """Refuse a push whose `base` version is not one this server had, or a second push in a sync round."""
        if not 0 <= base <= self.version:
            raise ProtocolError("bad_field", f"base version {base} is outside [0, {self.version}]")
        if self.mode is Mode.SYNC and slot.worker in self.round:
            raise ProtocolError("bad_field", "a second push in one synchronous round: pull first")

    def judge(self, slot: Slot, base: int, push: Push, finite: Callable[[], bool]) -> Verdict:
        """Decide a checked push computed at version `base`: rejected when staler than the bound (any staleness in
        sync mode), skipped when not `finite()`, else applied: in async mode the version moves on now (the caller
        applies it with ``-scale``), in sync mode it joins the round."""
        slot.clock += 1
        tau = self.version - base
        if tau > self.max_staleness or (self.mode is Mode.SYNC and tau > 0):
            slot.rejected += 1
            slot.behind = True
            self.counters["rejected"] += 1
            return Verdict(PushStatus.REJECTED, f"stale: tau={tau} > max_staleness={self.max_staleness}", tau, 0.0)
        if not finite():
            slot.skipped += 1
            self.counters["skipped"] += 1
            return Verdict(PushStatus.SKIPPED, "the update holds NaN or Inf", tau, 0.0)
        if self.mode is Mode.SYNC:
            self.round[slot.worker] = push          # applied, as the round's mean, when the round closes
            scale = 1.0
        else:
            scale = 1.0 / (1 + tau) if self.policy is StalenessPolicy.INVERSE else 1.0
            self.version += 1
            self.taus[tau] += 1
            self.recent_taus.append(tau)
        slot.accepted += 1
        slot.behind = False
        self.counters["applied"] += 1
        return Verdict(PushStatus.APPLIED, "", tau, scale)

    def close_round(self) -> Optional[List[Push]]:
        """Sync mode: once every live worker that is not done has pushed, the round's pushes (whose mean the
        caller applies) and the next version; else None."""
        if self.mode is not Mode.SYNC or not self.round:
            return None
        if any(not s.done and s.held and s.worker not in self.round for s in self.sessions.slots.values()):
            return None
        pushes = list(self.round.values())
        self.version += 1
        self.taus[0] += len(pushes)
        self.recent_taus += [0] * len(pushes)
        self.round.clear()
        return pushes

    def take_recent_taus(self) -> List[int]:
        """The staleness of the pushes applied since the last call (for the log's histogram)."""
        taus, self.recent_taus = self.recent_taus, []
        return taus
