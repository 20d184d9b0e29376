"""`ParameterServer`: holds the model (or its share of the keys), applies compressed error-compensated pushes as
they arrive, and sends each worker a compressed delta against the copy it holds (docs/ARCHITECTURE.md section 1,
"Asynchronous variant").

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

A ``step`` request is a push whose answer is the pull: one round trip per training step.

Durability: checkpoints are numbered; an applied push's ack says which checkpoint will first hold it (``ck``) and
which ones are on disk (``durable``), and a server resumed from checkpoint ``c`` says ``resumed_from = c`` in its
welcome. A worker keeps the sum of what it sent per checkpoint number not yet on disk, and after such a restart
adds the sums the server lost (numbers above ``c``) back into its residual: a SIGKILL loses no update, it delays
the lost ones to the worker's next pushes.

Blocking bound: a worker whose clock (its pushes) is ``max_staleness`` or more ahead of the pack waits at its next
pull until the pack catches up. The pack's clock is the lower median of the live workers' clocks (with two workers:
the slower one's, i.e. stale synchronous parallel), so one worker cannot run away from the others, while a single
straggler does not hold the majority back: its pushes become too stale and are rejected instead. A worker whose
last push was rejected as stale, or that said it is done, is left out of the pack; a worker silent for
``heartbeat_timeout`` seconds is dropped with its ``x_hat_j``; a worker that joins starts at the pack's clock.
With several servers only server 0 holds pulls at the bound (a step waits for every server's answer, so one gate
bounds the whole model): gates at every server, each with its own clocks (which drift apart, e.g. after a
restart), could leave two workers each waiting at the server where it is ahead. Every server still rejects a
push staler than the bound by its own version.

``mode="sync"`` is the synchronous parameter server on the same code, the baseline of the benchmark: each round
waits for one push from every live worker, applies their mean, and only then answers their pulls.

Keys and servers: the model is cut into keys (`protocol.split_keys`: pieces of at most ``key_elems`` elements,
on block boundaries), one frame per key on the wire. With ``num_servers = N`` servers, server ``i`` owns the i-th
of N contiguous key ranges (`protocol.partition`) and knows nothing of the others: its own version (staleness
clock), ``x_hat_j`` of its keys, counters and checkpoint. The conservation laws hold per server, so for the model.

Threads: the I/O thread owns the ROUTER socket (receives, checks, answers heartbeats and protocol errors without
taking any lock); the control thread decides under ``self._lock``, which holds no arithmetic: sessions, staleness,
the bound and versions (`sessions.py`), counters; the server's keys are split again into ``threads`` shards
(`shards.py`), each applied by its own thread from a FIFO of typed jobs (apply pushes, a round's mean, answer a
pull, copy the state, downlink norms). A job goes to every shard's FIFO in the control thread's order, so every
shard sees the same sequence of pushes and a reply or a checkpoint is a consistent cut at one version; the shard
that finishes a job last sends its reply. A checkpoint costs each shard one copy of its keys; the writer thread
of `checkpoint.CheckpointWriter` puts it on disk.
"""
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from typing import Dict, List, Optional

import torch
import zmq

from dsq_plugins.engine.codec import BlockCodec
from dsq_plugins.compression.registry import get_compressor

from . import checkpoint
from .protocol import (DEFAULT_KEY_ELEMS, Limits, ProtocolError, check_layout, decode, encode, frame_tensors,
                       frames_finite, header_summary, key_layout, layout_from_json, layout_to_json, partition,
                       split_keys, unpack)
from .protocol import field as hfield
from .sessions import HeldCopy, Mode, PendingPull, PushStatus, Sessions, Slot, Staleness, StalenessPolicy
from .shards import Answer, JobKind, ModelCopy, Push, PullKind, ShardExecutor, Update
from .telemetry import Telemetry

__all__ = ["ParameterServer", "STALENESS_POLICIES", "MODES"]

log = logging.getLogger("async_ps.server")

STALENESS_POLICIES = tuple(p.value for p in StalenessPolicy)
MODES = tuple(m.value for m in Mode)


class ParameterServer:
    """The asynchronous parameter server (or server `server_index` of `num_servers`).

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
        num_servers, server_index: this server owns key range `server_index` of `num_servers`.
        key_elems: elements per key (rounded up to whole blocks); every server of a job must use the same.
        threads: shard threads applying this server's keys (default: one per 4M elements, up to 4 and the CPUs;
            at most one per key).
    """

    def __init__(self, bind: str = "tcp://127.0.0.1:0", token: Optional[str] = None, compressor: str = "sign",
                 server_compressor: Optional[str] = None, max_staleness: int = 8,
                 staleness_policy: str = "inverse", mode: str = "async", heartbeat_timeout: float = 10.0,
                 num_workers: Optional[int] = None, checkpoint_dir=None, checkpoint_every_s: Optional[float] = None,
                 checkpoint_every_pushes: Optional[int] = None, resume: bool = False, logdir=None,
                 limits: Optional[Limits] = None, context: Optional[zmq.Context] = None, block_size: int = 4096,
                 num_servers: int = 1, server_index: int = 0, key_elems: int = DEFAULT_KEY_ELEMS,
                 threads: Optional[int] = None):
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
        if not (isinstance(num_servers, int) and num_servers >= 1 and isinstance(server_index, int)
                and 0 <= server_index < num_servers):
            raise ValueError(f"server_index must be in [0, num_servers), got {server_index!r} of {num_servers!r}")
        if not isinstance(key_elems, int) or key_elems < 1:
            raise ValueError(f"key_elems must be a positive integer (elements), got {key_elems!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer, got {threads!r}")
        self.bind = bind
        self.token = token or secrets.token_hex(16)
        self.max_staleness = max_staleness
        self.mode = Mode(mode)
        self.heartbeat_timeout = heartbeat_timeout
        self.num_workers = num_workers
        self.num_servers, self.server_index, self.key_elems = num_servers, server_index, key_elems
        self.threads = threads          # None: chosen from the model's size when it arrives
        self.checkpoint_dir = checkpoint_dir
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

        # state (under self._lock); the values of x, x0 and every x_hat belong to the shard threads
        self.layout = None
        self.keys: List = []                   # this server's keys: (tensor, start, stop)
        self.key_range = (0, 0)                # their indices among all the model's keys
        self.key_layout = None
        self.executor: Optional[ShardExecutor] = None      # the model, once a worker (or a checkpoint) gave it
        self.counters: Counter = Counter()    # applied, rejected, skipped, dropped, rejoined, bytes_up, ...
        self.errors: Counter = Counter()      # protocol errors by code
        self.sessions = Sessions(self.counters)
        self.staleness = Staleness(self.sessions, self.counters, self.mode, StalenessPolicy(staleness_policy),
                                   max_staleness, gate=server_index == 0)
        self.checkpoints = checkpoint.CheckpointWriter(checkpoint_dir, checkpoint_every_s, checkpoint_every_pushes,
                                                       self._lock, self.counters, self.errors)
        self.telemetry = Telemetry(logdir)
        if resume:
            self._restore(checkpoint.load(checkpoint_dir))

    @property
    def slots(self) -> Dict[str, Slot]:
        """The connected workers by name (see `sessions.Slot`)."""
        return self.sessions.slots

    @property
    def version(self) -> int:
        """Pushes applied (rounds, in sync mode): the staleness clock."""
        return self.staleness.version

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "ParameterServer":
        """Bind, start the I/O, control, shard and checkpoint threads; `address` is then the endpoint workers
        connect to."""
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
        self.telemetry.open()
        self._threads = [threading.Thread(target=self._io_loop, args=(router, outbox_pull), name="ps-io", daemon=True),
                         threading.Thread(target=self._control_loop, name="ps-control", daemon=True)]
        for t in self._threads:
            t.start()
        self.checkpoints.start()
        with self._lock:
            if self.executor is not None:          # resumed: the model is here already
                self.executor.start()
        log.info("parameter server %d/%d listening on %s (mode %s, up %s, down %s, max_staleness %d)",
                 self.server_index, self.num_servers, self.address, self.mode.value, self.up.spec, self.down.spec,
                 self.max_staleness)
        return self

    def stop(self) -> None:
        """Stop every thread, write a final checkpoint (if a directory is set) and close the TensorBoard log."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        with self._lock:
            final = bool(self.checkpoint_dir) and self.executor is not None and self.executor.alive
        if final:
            self.save_checkpoint()          # queued behind any older checkpoint still on its way
        self.checkpoints.stop()
        if self.executor is not None:
            self.executor.stop()
        self._threads = []
        self.telemetry.close()

    def __enter__(self):
        return self if self._threads else self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ views for callers and tests
    def snapshot(self) -> dict:
        """A consistent copy of the state at one version: ``x`` and ``x0`` (per tensor when this server owns the
        whole model, else None), ``xk`` and ``x0k`` (per key of this server, 1-D), ``keys``, ``key_range``,
        ``version``, ``counters``, ``errors``, ``taus`` and per worker ``x_hat`` (as ``x``), ``x_hatk``, ``base``,
        ``clock``, ``accepted``, ``rejected``, ``skipped``."""
        with self._lock:
            slots = list(self.slots.values())
            job = self.executor.submit(JobKind.COPY, slots=slots) if self.executor is not None else None
            snap = {"version": self.version, "counters": dict(self.counters), "errors": dict(self.errors),
                    "taus": dict(self.staleness.taus), "done": sorted(self.sessions.done_workers),
                    "keys": list(self.keys), "key_range": self.key_range,
                    "workers": {s.worker: {"base": s.base, "clock": s.clock, "accepted": s.accepted,
                                           "rejected": s.rejected, "skipped": s.skipped, "pulls": s.pulls,
                                           "behind": s.behind, "done": s.done} for s in slots}}
        if job is not None and not job.finished.wait(60):
            raise TimeoutError("the shard threads did not answer a snapshot within 60 s")
        copy = job.copy if job is not None else ModelCopy(None, None, {})
        snap["xk"], snap["x0k"] = copy.x, copy.x0
        snap["x"], snap["x0"] = self._tensors(copy.x), self._tensors(copy.x0)
        for s in slots:
            xh = copy.x_hat.get(s.worker)
            xh = xh if xh is not None and all(t is not None for t in xh) else None
            snap["workers"][s.worker].update(x_hatk=xh, x_hat=self._tensors(xh))
        return snap

    def _tensors(self, per_key) -> Optional[List[torch.Tensor]]:
        """Per-key tensors back to the layout's tensors, when this server owns the whole model (else None)."""
        if per_key is None or self.num_servers != 1:
            return None
        out = [[] for _ in self.layout]
        for (i, _, _), t in zip(self.keys, per_key):
            out[i].append(t)
        return [torch.cat(parts).view(shape) for parts, (_, shape, _) in zip(out, self.layout)]

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

    def status(self) -> dict:
        """Counters for progress displays: version, applied/rejected/skipped pushes, live and done workers,
        protocol errors, bytes up/down, and per live worker its accepted and rejected pushes and pulled version."""
        with self._lock:
            return self._status()

    def _status(self) -> dict:
        c = self.counters
        return {"version": self.version, "applied": c["applied"], "rejected": c["rejected"],
                "skipped": c["skipped"], "dropped": c["dropped"], "live": len(self.slots),
                "done": len(self.sessions.done_workers), "num_workers": self.num_workers,
                "errors": sum(self.errors.values()), "bytes_up": c["bytes_up"], "bytes_down": c["bytes_down"],
                "initialised": self.executor is not None, "server_index": self.server_index,
                "num_servers": self.num_servers, "checkpoints": c["checkpoints"],
                "workers": {w: {"accepted": s.accepted, "rejected": s.rejected, "version": s.base}
                            for w, s in self.slots.items()}}

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
                            router.send_multipart(outbox_pull.recv_multipart(zmq.NOBLOCK, copy=False), copy=False)
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
            # No lock: the control thread may be busy.
            known = self.sessions.heartbeat(wid, header.get("session"), header.get("skipped"))
            router.send_multipart([identity, *encode("hb", "", wid, header["s"], known=known, epoch=self.epoch,
                                                     session=header.get("session"))])
            return
        self._inbox.put((identity, header, payload, nbytes))

    def _protocol_error(self, e: ProtocolError, identity: bytes, seq, what: str) -> None:
        with self._lock:
            self.errors[e.code] += 1
            n = self.errors[e.code]
        if n <= 20 or n % 100 == 0:
            log.warning("rejected a message from peer %s (%s): %s [%s #%d]", identity.hex()[:16], what, e, e.code, n)

    # ------------------------------------------------------------------ control thread
    def _control_loop(self) -> None:
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
                        self._housekeeping(now)
                        self._changed.notify_all()
                for r in replies:
                    outbox.send_multipart(r, copy=False)
        except Exception:          # a bug here must not leave workers hanging silently
            log.exception("control thread crashed")
            raise
        finally:
            outbox.close(0)

    def _handle(self, identity: bytes, header: dict, payload: list, nbytes: int) -> list:
        """One request: the replies to send now (a pull's answer is sent by the shards)."""
        wid, seq, kind = header["w"], header["s"], header["type"]
        try:
            if kind == "hello":
                return [self._hello(identity, header)]
            if kind == "status":
                return [self._reply(identity, "status", wid, seq, **self._status())]
            slot = self.sessions.find(wid, header.get("session"))
            if slot is None:
                raise ProtocolError("unknown_worker", f"worker {wid!r} has no session here (server epoch "
                                                      f"{self.epoch}): send hello again")
            self.sessions.heard(slot, identity)
            if kind == "init":
                return [self._init(slot, seq, payload)]
            if self.executor is None:
                raise ProtocolError("bad_type", "this server has no model yet: send init (the parameters) first")
            if kind == "pull":
                self._pull(slot, seq, bool(header.get("full", False)), {})
                return []
            if kind in ("push", "step"):
                return self._push(slot, header, payload, nbytes, pull=kind == "step")
            if kind == "bye":
                self.sessions.leave(wid)
                reply = self._reply(identity, "status", wid, seq, **self._status())
                self._close_round()
                self._release_pulls()
                return [reply]
            if kind == "done":
                self.sessions.finish(slot)
                reply = self._reply(identity, "status", wid, seq, **self._status())
                self._release_pulls()
                return [reply]
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

    def _adopt_layout(self, layout) -> None:
        keys = split_keys(layout, self.block_size, self.key_elems)
        try:
            k0, k1 = partition(keys, self.num_servers)[self.server_index]
        except ValueError as e:
            raise ProtocolError("layout", str(e)) from None
        self.layout, self.key_range = layout, (k0, k1)
        self.keys = keys[k0:k1]
        self.key_layout = key_layout(layout, self.keys)

    def _adopt_model(self, x: List[torch.Tensor], x0: List[torch.Tensor]) -> None:
        """Copies of `x` and `x0` (per key of this server) become the model, in the shards (whose threads start
        now if the server runs)."""
        self.executor = ShardExecutor([t.clone() for t in x], [t.clone() for t in x0], self.keys, self.key_range[0],
                                      self.up, self.down, self.threads, self.context, self._outbox_addr)
        if self._threads:
            self.executor.start()

    def _hello(self, identity: bytes, header: dict) -> list:
        wid, seq = header["w"], header["s"]
        layout = layout_from_json(header.get("layout"))
        if self.layout is None:
            self._adopt_layout(layout)
        else:
            check_layout(self.layout, layout)
        slot = self.sessions.join(wid, identity, self.staleness.pack_clock(), header.get("held"))
        return self._reply(identity, "welcome", wid, seq, session=slot.session, epoch=self.epoch,
                           version=self.version, up=self.up.spec, down=self.down.spec, block=self.block_size,
                           max_staleness=self.max_staleness, mode=self.mode.value, layout=layout_to_json(self.layout),
                           num_servers=self.num_servers, server_index=self.server_index, key_elems=self.key_elems,
                           key_range=list(self.key_range), initialised=self.executor is not None,
                           checkpointing=bool(self.checkpoint_dir), durable=self.checkpoints.durable,
                           resumed_from=self.checkpoints.resumed_from)

    def _init(self, slot: Slot, seq: int, payload: list) -> list:
        """The first worker's parameters of this server's keys become the model (later inits are ignored)."""
        if self.executor is None:
            x = unpack(self.dense, payload, self.key_layout)
            if not all(bool(torch.isfinite(t).all()) for t in x):
                raise ProtocolError("bad_payload", "the initial parameters hold NaN or Inf")
            self._adopt_model(x, x)
            log.info("model initialised by worker %s: %d keys, %d elements", slot.worker, len(x),
                     sum(t.numel() for t in x))
        return self._reply(slot.identity, "status", slot.worker, seq, **self._status())

    # -- pulls
    def _pull(self, slot: Slot, seq: int, full: bool, ack: dict, updates=()) -> None:
        """Answer a pull now (after `updates`) or hold it at the bound; `ack` fields go in the answer (a step's)."""
        if self.staleness.may_pull(slot):
            self._answer(slot, seq, full, ack, updates)
        else:
            if updates:
                self.executor.submit(JobKind.APPLY, updates=list(updates))
            self.staleness.hold(slot, PendingPull(slot.identity, seq, full, ack))

    def _answer(self, slot: Slot, seq: int, full: bool, ack: dict, updates=()) -> None:
        """Queue the answer to a pull of `slot` (after `updates`) and count it (pulls, bytes down)."""
        seed = secrets.randbits(32) if self.down.compressor.uses_seed else 0
        kind = self.sessions.pulled(slot, full, self.version, len(self.keys))
        codec = self.dense if kind is PullKind.FULL else self.down
        self.counters["pulls"] += 1
        self.counters["bytes_down"] += sum(codec.nbytes(t.numel(), t.dtype) for t in self.executor.x)
        self.counters["full_pulls" if kind is PullKind.FULL else "delta_pulls"] += 1
        fields = dict(ack, kind=kind.value, version=self.version, seed=seed)
        self.executor.submit(JobKind.PULL, updates=list(updates),
                             answer=Answer(slot, kind, seed, slot.identity, slot.worker, seq, fields))

    def _release_pulls(self) -> None:
        for slot, pull in self.staleness.released():
            self._answer(slot, pull.seq, pull.full, pull.ack)

    # -- pushes
    def _push(self, slot: Slot, header: dict, payload: list, nbytes: int, pull: bool) -> list:
        base = hfield(header, "base", int)
        self.staleness.check(slot, base)
        frames = frame_tensors(self.up, payload, self.key_layout)
        seed = hfield(header, "seed", int, 0)
        if not 0 <= seed < 2 ** 32:
            raise ProtocolError("bad_field", f"frame seed {seed} is outside [0, 2**32)")
        self.counters["bytes_up"] += nbytes          # payload bytes of well-formed pushes
        slot.report(header.get("loss"), header.get("rnorm"))
        push = Push(frames, seed)
        verdict = self.staleness.judge(slot, base, push, lambda: frames_finite(self.up, frames, self.key_layout))
        applied_now = verdict.status is PushStatus.APPLIED and self.mode is Mode.ASYNC   # sync: at the round's end
        updates = [Update(push, -verdict.scale)] if applied_now else []
        ack = dict(status=verdict.status.value, reason=verdict.reason, tau=verdict.tau, scale=verdict.scale,
                   ck=self.checkpoints.number, durable=self.checkpoints.durable)
        replies = []
        if pull:
            self._close_round()
            self._pull(slot, header["s"], False, ack, updates)
        else:
            if updates:
                self.executor.submit(JobKind.APPLY, updates=updates)
            replies.append(self._reply(slot.identity, "ack", slot.worker, header["s"], version=self.version, **ack))
            self._close_round()
        self._release_pulls()
        self._maybe_checkpoint(pushes=True)
        return replies

    def _close_round(self) -> None:
        """Sync mode: apply the round's mean once every live worker that is not done has pushed."""
        pushes = self.staleness.close_round()
        if pushes:
            self.executor.submit(JobKind.MEAN, mean=pushes)

    # ------------------------------------------------------------------ liveness, checkpoints, logging
    def _housekeeping(self, now: float) -> None:
        self.sessions.drop_silent(now, self.heartbeat_timeout)
        self._close_round()
        self._release_pulls()
        self._maybe_checkpoint(pushes=False)
        if self.telemetry.write(now, self.staleness, self.slots, self.counters, self.errors) and self.executor:
            self.executor.submit(JobKind.NORMS, slots=self.sessions.holding(), on_done=self.telemetry.keep_norms)

    def _maybe_checkpoint(self, pushes: bool) -> None:
        if self.executor is not None and self.checkpoints.due(self.counters["applied"], pushes):
            self._checkpoint(background=True)

    def _checkpoint(self, background: bool):
        """Begin a checkpoint: its control part now, the shards' copy queued behind the jobs already queued (the
        apply path does not stop), then the writer thread. Returns the `checkpoint.Request` and the copy job."""
        state = {"layout": layout_to_json(self.layout), "version": self.version, "counters": dict(self.counters),
                 "number": self.checkpoints.number, "resumed_from": self.checkpoints.resumed_from,
                 "epoch": self.epoch, "taus": dict(self.staleness.taus), "num_servers": self.num_servers,
                 "server_index": self.server_index, "key_elems": self.key_elems, "block_size": self.block_size,
                 "key_range": list(self.key_range), "keys": [list(k) for k in self.keys],
                 "workers": {s.worker: {"session": s.session, "pulls": s.pulls, "base": s.base,
                                        "accepted": s.accepted, "rejected": s.rejected, "skipped": s.skipped}
                             for s in self.sessions.holding()}}
        request = self.checkpoints.begin(state, self.counters["applied"], background)
        job = self.executor.submit(JobKind.COPY, slots=self.sessions.holding(),
                                   on_done=lambda job: self.checkpoints.copied(request, job.copy))
        return request, job

    def save_checkpoint(self) -> None:
        """Write the checkpoint now (parameters, downlink copies, version, counters) and return once on disk."""
        with self._lock:
            if self.executor is None:
                return
            request, job = self._checkpoint(background=False)
        if not job.finished.wait(60):
            raise TimeoutError("the shard threads did not copy the state within 60 s")
        request.written.wait()
        if request.error is not None:
            raise request.error

    def _restore(self, state: Optional[dict]) -> None:
        if state is None:
            log.warning("--resume: no checkpoint in %s, starting fresh", self.checkpoint_dir)
            return
        mine = [state.get(k) for k in ("num_servers", "server_index", "key_elems", "block_size")]
        if mine != [self.num_servers, self.server_index, self.key_elems, self.block_size]:
            raise ValueError(f"{self.checkpoint_dir}: the checkpoint is of server {mine[1]} of {mine[0]} (keys of "
                             f"{mine[2]} elements, blocks of {mine[3]}); this is server {self.server_index} of "
                             f"{self.num_servers} ({self.key_elems}, {self.block_size})")
        self._adopt_layout(layout_from_json(state["layout"]))
        self._adopt_model(state["x"], state["x0"])
        self.staleness.resume(int(state["version"]), {int(k): v for k, v in state["taus"].items()})
        self.counters.clear()
        self.counters.update(state["counters"])
        self.counters["resumed"] += 1
        self.checkpoints.resume(int(state["number"]), self.counters["applied"])
        self.sessions.resume({w: HeldCopy(info["session"], info["pulls"], info["base"], info["x_hat"])
                              for w, info in state["workers"].items()})
        log.info("resumed from %s at version %d (%d pushes applied)", self.checkpoint_dir, self.version,
                 self.counters["applied"])
