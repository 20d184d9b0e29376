"""`ParameterServer`: holds the model, applies compressed error-compensated pushes as they arrive, and sends each
worker a compressed delta against the copy it holds (DESIGN.md section 1, "Asynchronous variant").

Per worker j the server keeps ``x_hat_j``, the model copy j holds. A pull sends ``c = C_s(x - x_hat_j)`` and does
``x_hat_j += c``, so the downlink residual ``x - x_hat_j`` is kept, never lost; a worker's first pull (and any pull
after it rejoined) sends ``x`` dense and sets ``x_hat_j = x``. A checkpoint keeps every ``x_hat_j``; after a resume,
a worker that proves (by its old session and pull count) that it still holds exactly that copy keeps it.

A push carrying ``c_i`` (the worker's compressed, compensated update) computed at version ``b`` has staleness
``tau = version - b``; it is

- rejected (counted, not applied, the worker told) when ``tau > max_staleness``;
- skipped (counted, not applied) when its values are not finite;
- else applied as ``x -= s(tau) * c_i`` with ``s(tau) = 1 / (1 + tau)`` (policy ``inverse``, the default) or
  ``1`` (``constant``), and ``version += 1``.

Blocking bound: a worker whose clock (its pushes) is ``max_staleness`` or more ahead of the pack waits at its next
pull until the pack catches up. The pack's clock is the lower median of the live workers' clocks (with two workers:
the slower one's, i.e. stale synchronous parallel), so one worker cannot run away from the others, while a single
straggler does not hold the majority back: its pushes become too stale and are rejected instead. A worker whose
last push was rejected as stale, or that said it is done, is left out of the pack; a worker silent for
``heartbeat_timeout`` seconds is dropped with its ``x_hat_j``; a worker that joins starts at the pack's clock.

``mode="sync"`` is the synchronous parameter server on the same code, the baseline of the benchmark: each round
waits for one push from every live worker, applies their mean, and only then answers their pulls.

Threads: the I/O thread owns the ROUTER socket (receives, checks, answers heartbeats and protocol errors); the
apply thread owns the state and does all the arithmetic; both touch shared state only under ``self._lock``.
"""
import logging
import math
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import zmq

from dsq_plugins.codec import BlockCodec
from dsq_plugins.registry import get_compressor

from . import checkpoint
from .protocol import (Limits, ProtocolError, check_layout, decode, encode, frame_tensors, frames_finite,
                       header_summary, layout_from_json, layout_to_json, pack, unpack)
from .protocol import field as hfield

__all__ = ["ParameterServer", "STALENESS_POLICIES"]

log = logging.getLogger("async_ps.server")

STALENESS_POLICIES = ("inverse", "constant")
MODES = ("async", "sync")


@dataclass
class _Slot:
    """What the server knows about one connected worker."""

    worker: str
    session: str
    identity: bytes
    x_hat: Optional[List[torch.Tensor]] = None     # the worker's model copy; None until its first (full) pull
    base: int = 0                                   # version of the worker's last pull
    clock: int = 0                                  # pushes made (applied, rejected or skipped), for the bound
    pulls: int = 0
    accepted: int = 0
    rejected: int = 0
    skipped: int = 0
    behind: bool = False                            # last push rejected as stale: not waited for
    done: bool = False
    pending_pull: Optional[tuple] = None            # (identity, seq, full) of a pull waiting at the bound
    loss: Optional[float] = None                    # last values the worker reported
    worker_rnorm: float = 0.0
    worker_skipped: int = 0
    pushes_logged: int = 0
    joined: float = field(default_factory=time.monotonic)


class ParameterServer:
    """The asynchronous parameter server.

    Args:
        bind: ZeroMQ endpoint: ``tcp://HOST:PORT`` (port 0: any free port) or ``inproc://NAME`` (workers as
            threads of this process, same `context`).
        token: the shared secret every request must carry (default: a fresh random one; see `token`).
        compressor: uplink compressor spec (workers' pushes); server_compressor: downlink spec (None: the same).
        block_size: elements per block of both compressors (as in `DoubleSqueezeConfig`); workers learn it.
        max_staleness: the bound in versions (>= 1), see the module docstring.
        staleness_policy: ``inverse`` (step ``1 / (1 + tau)``) or ``constant`` (step 1).
        mode: ``async`` or ``sync`` (the synchronous baseline).
        heartbeat_timeout: seconds of silence after which a worker is dropped.
        num_workers: how many workers the job expects (reported by ``status``; the end-of-training wait uses it).
        checkpoint_dir, checkpoint_every_s, checkpoint_every_pushes: where and how often (seconds, applied pushes)
            to checkpoint; a final checkpoint is written on `stop`. resume: start from the last checkpoint there.
        logdir: TensorBoard directory (staleness histogram, rejected/skipped pushes, pushes/s per worker, bytes,
            residual norms, loss), written about once a second.
        limits: `protocol.Limits` on frames and sizes.
    """

    def __init__(self, bind: str = "tcp://127.0.0.1:0", token: Optional[str] = None, compressor: str = "sign",
                 server_compressor: Optional[str] = None, max_staleness: int = 8,
                 staleness_policy: str = "inverse", mode: str = "async", heartbeat_timeout: float = 10.0,
                 num_workers: Optional[int] = None, checkpoint_dir=None, checkpoint_every_s: Optional[float] = None,
                 checkpoint_every_pushes: Optional[int] = None, resume: bool = False, logdir=None,
                 limits: Optional[Limits] = None, context: Optional[zmq.Context] = None, block_size: int = 4096):
        self.block_size = block_size
        self.up = BlockCodec(get_compressor(compressor), block_size)
        self.down = BlockCodec(get_compressor(server_compressor or compressor), block_size)
        self.dense = BlockCodec(get_compressor("none"), block_size)
        if isinstance(max_staleness, bool) or not isinstance(max_staleness, int) or max_staleness < 1:
            raise ValueError(f"max_staleness must be an integer >= 1 (versions), got {max_staleness!r}")
        if staleness_policy not in STALENESS_POLICIES:
            raise ValueError(f"staleness_policy must be one of {list(STALENESS_POLICIES)}, got {staleness_policy!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
        if resume and not checkpoint_dir:
            raise ValueError("resume needs a checkpoint_dir")
        self.bind = bind
        self.token = token or secrets.token_hex(16)
        self.max_staleness = max_staleness
        self.staleness_policy = staleness_policy
        self.mode = mode
        self.heartbeat_timeout = heartbeat_timeout
        self.num_workers = num_workers
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_pushes = checkpoint_every_pushes
        self.logdir = logdir
        self.limits = limits or Limits()
        self.context = context or zmq.Context.instance()
        self.epoch = secrets.token_hex(6)          # this incarnation: workers notice a restart by its change
        self.address: Optional[str] = None

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._inbox: "queue.Queue" = queue.Queue()
        self._outbox_addr = f"inproc://async-ps-outbox-{id(self)}-{self.epoch}"
        self._threads: List[threading.Thread] = []

        # state (under self._lock)
        self.layout = None
        self.x: Optional[List[torch.Tensor]] = None
        self.x0: Optional[List[torch.Tensor]] = None
        self.version = 0
        self.counters: Counter = Counter()    # applied, rejected, skipped, dropped, rejoined, bytes_up, ...
        self.errors: Counter = Counter()      # protocol errors by code
        self.slots: Dict[str, _Slot] = {}
        self.done_workers = set()
        self.taus: Counter = Counter()        # staleness of applied pushes
        self._recent_taus: List[int] = []
        self._seen: Dict[str, float] = {}     # worker -> monotonic time of its last message (I/O thread writes)
        self._round: Dict[str, List[torch.Tensor]] = {}   # sync mode: this round's pushes
        self._last_ckpt = (time.monotonic(), 0)
        self._monitor = None
        self._resumable: Dict[str, dict] = {}   # downlink state from a checkpoint, by worker, until it rejoins
        if resume:
            self._restore(checkpoint.load(checkpoint_dir))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ParameterServer":
        """Bind, start the I/O and apply threads; `address` is then the endpoint workers connect to."""
        router = self.context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bind = self.bind[:-2] + ":*" if self.bind.startswith("tcp://") and self.bind.endswith(":0") else self.bind
        router.bind(bind)
        self.address = router.getsockopt_string(zmq.LAST_ENDPOINT)
        outbox_pull = self.context.socket(zmq.PULL)
        outbox_pull.setsockopt(zmq.LINGER, 0)
        outbox_pull.bind(self._outbox_addr)
        if self.logdir:
            from dsq_plugins.monitor import TensorBoardMonitor
            self._monitor = TensorBoardMonitor(str(self.logdir), prefix="ps/")
        self._threads = [threading.Thread(target=self._io_loop, args=(router, outbox_pull), name="ps-io", daemon=True),
                         threading.Thread(target=self._apply_loop, name="ps-apply", daemon=True)]
        for t in self._threads:
            t.start()
        log.info("parameter server listening on %s (mode %s, up %s, down %s, max_staleness %d)", self.address,
                 self.mode, self.up.spec, self.down.spec, self.max_staleness)
        return self

    def stop(self) -> None:
        """Stop both threads, write a final checkpoint (if a directory is set) and close the TensorBoard log."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []
        with self._lock:
            if self.checkpoint_dir and self.x is not None:
                self.save_checkpoint()
        if self._monitor:
            self._monitor.close()
            self._monitor = None

    def __enter__(self):
        return self if self._threads else self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ views for callers and tests
    def snapshot(self) -> dict:
        """A consistent copy of the state: ``x``, ``x0``, ``version``, ``counters``, ``errors``, ``taus`` and per
        worker ``x_hat``, ``base``, ``clock``, ``accepted``, ``rejected``, ``skipped``."""
        with self._lock:
            clone = (lambda ts: None if ts is None else [t.clone() for t in ts])  # noqa: E731
            return {"x": clone(self.x), "x0": clone(self.x0), "version": self.version,
                    "counters": dict(self.counters), "errors": dict(self.errors), "taus": dict(self.taus),
                    "done": sorted(self.done_workers),
                    "workers": {w: {"x_hat": clone(s.x_hat), "base": s.base, "clock": s.clock,
                                    "accepted": s.accepted, "rejected": s.rejected, "skipped": s.skipped,
                                    "pulls": s.pulls, "behind": s.behind, "done": s.done}
                                for w, s in self.slots.items()}}

    def wait_for(self, predicate, timeout: float = 30.0) -> bool:
        """Wait until ``predicate(server)`` holds (checked under the lock at every state change)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
            return True

    # ------------------------------------------------------------------ I/O thread
    def _io_loop(self, router, outbox_pull) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(outbox_pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(50))
                if outbox_pull in events:
                    for _ in range(1000):
                        try:
                            router.send_multipart(outbox_pull.recv_multipart(zmq.NOBLOCK), copy=False)
                        except zmq.Again:
                            break
                if router in events:
                    for _ in range(1000):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_message(router, frames)
        finally:
            router.close(0)
            outbox_pull.close(0)

    def _on_message(self, router, frames) -> None:
        identity, body = frames[0], frames[1:]
        try:
            header, payload = decode(body, self.token, self.limits)
        except ProtocolError as e:
            self._protocol_error(e, identity, seq=None, what=f"{len(body)} frames")
            router.send_multipart([identity, *encode("error", "", code=e.code, message=e.message)])
            return
        wid = header["w"]
        nbytes = sum(len(f) for f in payload)             # payload bytes; the JSON header is not counted
        if header["type"] == "heartbeat":
            with self._lock:
                slot = self.slots.get(wid)
                known = slot is not None and slot.session == header.get("session")
                if known:
                    self._seen[wid] = time.monotonic()
                    skipped = header.get("skipped")
                    if isinstance(skipped, int):
                        slot.worker_skipped = skipped
                self.counters["heartbeats"] += 1
            router.send_multipart([identity, *encode("hb", "", wid, header["s"], known=known, epoch=self.epoch)])
            return
        self._inbox.put((identity, header, payload, nbytes))

    def _protocol_error(self, e: ProtocolError, identity: bytes, seq, what: str) -> None:
        with self._lock:
            self.errors[e.code] += 1
            n = self.errors[e.code]
        if n <= 20 or n % 100 == 0:
            log.warning("rejected a message from peer %s (%s): %s [%s #%d]", identity.hex()[:16], what, e, e.code, n)

    # ------------------------------------------------------------------ apply thread
    def _apply_loop(self) -> None:
        outbox = self.context.socket(zmq.PUSH)
        outbox.setsockopt(zmq.LINGER, 0)
        outbox.connect(self._outbox_addr)
        last_housekeeping = 0.0
        try:
            while not self._stop.is_set():
                try:
                    item = self._inbox.get(timeout=0.05)
                except queue.Empty:
                    item = None
                replies = []
                if item is not None:
                    with self._changed:
                        replies = self._handle(*item)
                        self._changed.notify_all()
                now = time.monotonic()
                if now - last_housekeeping >= 0.1 or item is None:
                    last_housekeeping = now
                    with self._changed:
                        replies += self._housekeeping(now)
                        self._changed.notify_all()
                for r in replies:
                    outbox.send_multipart(r, copy=False)
        except Exception:          # a bug here must not leave workers hanging silently
            log.exception("apply thread crashed")
            raise
        finally:
            outbox.close(0)

    def _handle(self, identity: bytes, header: dict, payload: list, nbytes: int) -> list:
        wid, seq, kind = header["w"], header["s"], header["type"]
        try:
            if kind == "hello":
                return [self._hello(identity, header, payload)]
            if kind == "status":
                return [self._reply(identity, "status", wid, seq, **self._status())]
            slot = self.slots.get(wid)
            if slot is None or slot.session != header.get("session"):
                raise ProtocolError("unknown_worker", f"worker {wid!r} has no session here (server epoch "
                                                      f"{self.epoch}): send hello again")
            self._seen[wid] = time.monotonic()
            slot.identity = identity
            if kind == "pull":
                full = bool(header.get("full", False))
                if self._may_pull(slot):
                    return [self._model_reply(slot, seq, full)]
                slot.pending_pull = (identity, seq, full)
                return []
            if kind == "push":
                return self._push(slot, header, payload, nbytes)
            if kind == "bye":
                del self.slots[wid]
                self.counters["left"] += 1
                return [self._reply(identity, "status", wid, seq, **self._status())] + self._close_round() \
                    + self._release_pulls()
            if kind == "done":
                slot.done = True
                self.done_workers.add(wid)
                replies = [self._reply(identity, "status", wid, seq, **self._status())]
                return replies + self._release_pulls()
            raise ProtocolError("bad_type", f"unexpected request {kind!r}")
        except ProtocolError as e:
            self._protocol_error(e, identity, seq, header_summary(header))
            return [self._reply(identity, "error", wid, seq, code=e.code, message=e.message)]
        except Exception as e:      # a bug must not stop the server for everyone: answer, count, log, go on
            log.exception("internal error on %s", header_summary(header))
            self.errors["internal"] += 1
            return [self._reply(identity, "error", wid, seq, code="internal", message=repr(e)[:300])]

    @staticmethod
    def _reply(identity: bytes, msg_type: str, wid: str, seq: int, frames=(), **fields) -> list:
        return [identity, *encode(msg_type, "", wid, seq, frames, **fields)]

    def _hello(self, identity: bytes, header: dict, payload: list) -> list:
        wid, seq = header["w"], header["s"]
        layout = layout_from_json(header.get("layout"))
        if self.x is None:
            x = unpack(self.dense, payload, layout)
            if not all(bool(torch.isfinite(t).all()) for t in x):
                raise ProtocolError("bad_payload", "the initial parameters hold NaN or Inf")
            self.layout = layout
            self.x = [t.clone() for t in x]
            self.x0 = [t.clone() for t in x]
            log.info("model initialised by worker %s: %d tensors, %d elements", wid, len(x),
                     sum(t.numel() for t in x))
        else:
            check_layout(self.layout, layout)
        if wid in self.slots:
            self.counters["rejoined"] += 1
            log.info("worker %s rejoined: its downlink state is reset, it gets a full pull", wid)
        slot = _Slot(worker=wid, session=secrets.token_hex(8), identity=identity, clock=self._pack_clock())
        saved, held = self._resumable.pop(wid, None), header.get("held")
        if saved and isinstance(held, dict) and [held.get("session"), held.get("pulls")] == [saved["session"],
                                                                                              saved["pulls"]]:
            # The worker still holds what it had pulled when the checkpoint was written: keep its x_hat_j (and so
            # its downlink residual x - x_hat_j) instead of sending the full model again.
            slot.x_hat = [t.clone() for t in saved["x_hat"]]
            slot.base = saved["base"]
            self.counters["resumed_downlinks"] += 1
        self.slots[wid] = slot
        self.done_workers.discard(wid)
        self._seen[wid] = time.monotonic()
        self.counters["joins"] += 1
        return self._reply(identity, "welcome", wid, seq, session=slot.session, epoch=self.epoch,
                           version=self.version, up=self.up.spec, down=self.down.spec, block=self.block_size,
                           max_staleness=self.max_staleness, mode=self.mode,
                           layout=layout_to_json(self.layout))

    # -- pulls
    def _gate_members(self):
        return [s for s in self.slots.values() if not s.done and not s.behind and s.x_hat is not None]

    def _pack_clock(self) -> int:
        """The lower median of the clocks of the workers the bound waits for (0 when there are none)."""
        clocks = sorted(s.clock for s in self._gate_members())
        return clocks[(len(clocks) - 1) // 2] if clocks else 0

    def _may_pull(self, slot: _Slot) -> bool:
        if self.mode == "sync":
            return slot.worker not in self._round
        if slot not in self._gate_members():
            return True
        return slot.clock - self._pack_clock() < self.max_staleness

    def _model_reply(self, slot: _Slot, seq: int, full: bool) -> list:
        seed = secrets.randbits(32) if self.down.compressor.uses_seed else 0
        if slot.x_hat is None or full:
            frames, _ = pack(self.dense, self.x)
            slot.x_hat = [t.clone() for t in self.x]
            kind = "full"
        else:
            frames = []
            for x, x_hat in zip(self.x, slot.x_hat):
                f, (c,) = pack(self.down, [x - x_hat], seed)
                x_hat.add_(c)
                frames += f
            kind = "delta"
        slot.base = self.version
        slot.pulls += 1
        self.counters["pulls"] += 1
        self.counters["bytes_down"] += sum(len(f) for f in frames)
        self.counters["full_pulls" if kind == "full" else "delta_pulls"] += 1
        return self._reply(slot.identity, "model", slot.worker, seq, frames, kind=kind, version=self.version,
                           seed=seed)

    def _release_pulls(self) -> list:
        replies = []
        for slot in self.slots.values():
            if slot.pending_pull is not None and self._may_pull(slot):
                identity, seq, full = slot.pending_pull
                slot.pending_pull = None
                slot.identity = identity
                replies.append(self._model_reply(slot, seq, full))
        return replies

    # -- pushes
    def _push(self, slot: _Slot, header: dict, payload: list, nbytes: int) -> list:
        base = hfield(header, "base", int)
        if not 0 <= base <= self.version:
            raise ProtocolError("bad_field", f"base version {base} is outside [0, {self.version}]")
        if self.mode == "sync" and slot.worker in self._round:
            raise ProtocolError("bad_field", "a second push in one synchronous round: pull first")
        frames = frame_tensors(self.up, payload, self.layout)
        seed = hfield(header, "seed", int, 0)
        if not 0 <= seed < 2 ** 32:
            raise ProtocolError("bad_field", f"frame seed {seed} is outside [0, 2**32)")
        self.counters["bytes_up"] += nbytes          # payload bytes of well-formed pushes
        loss, rnorm = header.get("loss"), header.get("rnorm")
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            slot.loss = float(loss)
        if isinstance(rnorm, (int, float)) and not isinstance(rnorm, bool):
            slot.worker_rnorm = float(rnorm)
        slot.clock += 1
        tau = self.version - base
        status, reason, scale = "applied", "", 0.0
        if tau > self.max_staleness or (self.mode == "sync" and tau > 0):
            status, reason = "rejected", f"stale: tau={tau} > max_staleness={self.max_staleness}"
            slot.rejected += 1
            slot.behind = True
            self.counters["rejected"] += 1
        elif not frames_finite(self.up, frames, self.layout):
            status, reason = "skipped", "the update holds NaN or Inf"
            slot.skipped += 1
            self.counters["skipped"] += 1
        else:
            c = unpack(self.up, frames, self.layout, seed)
            if self.mode == "sync":
                self._round[slot.worker] = c         # applied, as the round's mean, when the round closes
                scale = 1.0
            else:
                scale = 1.0 / (1 + tau) if self.staleness_policy == "inverse" else 1.0
                for x, ci in zip(self.x, c):
                    x.add_(ci, alpha=-scale)
                self.version += 1
                self.taus[tau] += 1
                self._recent_taus.append(tau)
            slot.accepted += 1
            slot.behind = False
            self.counters["applied"] += 1
        reply = self._reply(slot.identity, "ack", slot.worker, header["s"], status=status, reason=reason,
                            version=self.version, tau=tau, scale=scale)
        return [reply] + self._close_round() + self._release_pulls() + self._maybe_checkpoint(pushes=True)

    def _close_round(self) -> list:
        """Sync mode: apply the round's mean once every live worker that is not done has pushed."""
        if self.mode != "sync" or not self._round:
            return []
        waiting = [s for s in self.slots.values() if not s.done and s.x_hat is not None
                   and s.worker not in self._round]
        if waiting:
            return []
        n = len(self._round)
        for i, x in enumerate(self.x):
            x.sub_(sum(c[i] for c in self._round.values()) / n)
        self.version += 1
        self.taus[0] += n
        self._recent_taus += [0] * n
        self._round.clear()
        return []

    # ------------------------------------------------------------------ liveness, checkpoints, logging
    def _housekeeping(self, now: float) -> list:
        for wid, slot in list(self.slots.items()):
            if now - self._seen.get(wid, slot.joined) > self.heartbeat_timeout:
                log.warning("worker %s silent for %.1f s: dropped with its downlink state", wid, self.heartbeat_timeout)
                del self.slots[wid]
                self.counters["dropped"] += 1
        replies = self._close_round() + self._release_pulls() + self._maybe_checkpoint(pushes=False)
        self._log(now)
        return replies

    def _maybe_checkpoint(self, pushes: bool) -> list:
        if not self.checkpoint_dir or self.x is None:
            return []
        t0, applied0 = self._last_ckpt
        due = (self.checkpoint_every_pushes and pushes
               and self.counters["applied"] - applied0 >= self.checkpoint_every_pushes)
        due = due or (self.checkpoint_every_s and time.monotonic() - t0 >= self.checkpoint_every_s
                      and self.counters["applied"] != applied0)
        if due:
            self.save_checkpoint()
        return []

    def save_checkpoint(self) -> None:
        """Write the checkpoint now (parameters, downlink copies, version, counters)."""
        with self._lock:
            state = {"layout": layout_to_json(self.layout), "x": self.x, "x0": self.x0, "version": self.version,
                     "counters": dict(self.counters), "taus": dict(self.taus),
                     "workers": {w: {"x_hat": s.x_hat, "session": s.session, "pulls": s.pulls, "base": s.base,
                                     "accepted": s.accepted, "rejected": s.rejected, "skipped": s.skipped}
                                 for w, s in self.slots.items() if s.x_hat is not None}}
            path = checkpoint.save(self.checkpoint_dir, state)
            self._last_ckpt = (time.monotonic(), self.counters["applied"])
            self.counters["checkpoints"] += 1
        log.info("checkpoint at version %d -> %s", self.version, path)

    def _restore(self, state: Optional[dict]) -> None:
        if state is None:
            log.warning("--resume: no checkpoint in %s, starting fresh", self.checkpoint_dir)
            return
        self.layout = layout_from_json(state["layout"])
        self.x = [t.clone() for t in state["x"]]
        self.x0 = [t.clone() for t in state["x0"]]
        self.version = int(state["version"])
        self.counters = Counter(state["counters"])
        self.taus = Counter({int(k): v for k, v in state["taus"].items()})
        self.counters["resumed"] += 1
        self._resumable = dict(state["workers"])
        self._last_ckpt = (time.monotonic(), self.counters["applied"])
        log.info("resumed from %s at version %d (%d pushes applied)", self.checkpoint_dir, self.version,
                 self.counters["applied"])

    def _status(self) -> dict:
        c = self.counters
        return {"version": self.version, "applied": c["applied"], "rejected": c["rejected"],
                "skipped": c["skipped"], "dropped": c["dropped"], "live": len(self.slots),
                "done": len(self.done_workers), "num_workers": self.num_workers,
                "errors": sum(self.errors.values()), "bytes_up": c["bytes_up"], "bytes_down": c["bytes_down"],
                "initialised": self.x is not None,
                "workers": {w: {"accepted": s.accepted, "rejected": s.rejected, "version": s.base}
                            for w, s in self.slots.items()}}

    def status(self) -> dict:
        """Counters for progress displays: version, applied/rejected/skipped pushes, live and done workers,
        protocol errors, bytes up/down, and per live worker its accepted and rejected pushes and pulled version."""
        with self._lock:
            return self._status()

    def _log(self, now: float) -> None:
        m = self._monitor
        if m is None or now - getattr(self, "_last_log", 0.0) < 1.0:
            return
        dt = now - getattr(self, "_last_log", now)
        self._last_log = now
        step = self.version
        c = self.counters
        for tag in ("applied", "rejected", "skipped", "dropped", "rejoined", "bytes_up", "bytes_down"):
            m.log_scalar(f"ps/{tag}", c[tag], step)
        m.log_scalar("ps/worker_skipped", sum(s.worker_skipped for s in self.slots.values()), step)
        m.log_scalar("ps/protocol_errors", sum(self.errors.values()), step)
        m.log_scalar("ps/live_workers", len(self.slots), step)
        if self._recent_taus:
            m.writer.add_histogram("ps/staleness", torch.tensor(self._recent_taus, dtype=torch.float32), step)
            self._recent_taus = []
        for wid, s in self.slots.items():
            pushes = s.accepted + s.rejected + s.skipped
            if dt > 0:
                m.log_scalar(f"ps/pushes_per_s/{wid}", (pushes - s.pushes_logged) / dt, step)
            s.pushes_logged = pushes
            if s.x_hat is not None:
                norm = math.sqrt(sum(float(torch.linalg.vector_norm(x - h)) ** 2 for x, h in zip(self.x, s.x_hat)))
                m.log_scalar(f"ps/downlink_residual_norm/{wid}", norm, step)
            m.log_scalar(f"ps/worker_residual_norm/{wid}", s.worker_rnorm, step)
            if s.loss is not None:
                m.log_scalar(f"ps/loss/{wid}", s.loss, step)
        m.flush()
