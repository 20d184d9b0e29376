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
taking any lock); the control thread decides (sessions, staleness, the bound, versions, counters) under
``self._lock``, which holds no arithmetic; the server's keys are split again into ``threads`` shards, each applied
by its own thread from a FIFO of jobs. A job (apply pushes, answer a pull, copy for a checkpoint) goes to every
shard's FIFO in the control thread's order, so every shard sees the same sequence of pushes and a reply or a
checkpoint is a consistent cut at one version; the shard that finishes a job last sends its reply. A checkpoint
costs each shard one copy of its keys; a writer thread puts it on disk.
"""
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import zmq

from dsq_plugins.engine.codec import BlockCodec
from dsq_plugins.compression.registry import get_compressor

from . import checkpoint
from .protocol import (DEFAULT_KEY_ELEMS, Limits, ProtocolError, check_layout, decode, encode, frame_tensors,
                       frames_finite, header_summary, key_layout, key_seed, layout_from_json, layout_to_json,
                       partition, split_keys, unpack)
from .protocol import field as hfield

__all__ = ["ParameterServer", "STALENESS_POLICIES", "MODES"]

log = logging.getLogger("async_ps.server")

STALENESS_POLICIES = ("inverse", "constant")
MODES = ("async", "sync")


@dataclass
class _Slot:
    """What the server knows about one connected worker."""

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
    pending_pull: Optional[tuple] = None            # (identity, seq, full, ack fields) of a pull at the bound
    loss: Optional[float] = None                    # last values the worker reported
    worker_rnorm: float = 0.0
    worker_skipped: int = 0
    pushes_logged: int = 0
    joined: float = field(default_factory=time.monotonic)


class _Job:
    """Work every shard does for its keys, in FIFO order: `applies` (``(frames, alpha, seed)``: ``x += alpha *
    decode(frame)`` per key) or a synchronous round's `mean` (``[(frames, seed), ...]``: ``x -= mean(decode)``),
    then a `reply` (``(slot, kind, seed, message fields)``: a full or delta pull of that
    worker, whose frames the shards fill), a `copy` of the state (for a checkpoint or a snapshot) or `norms` (the
    downlink residual of each worker). `on_done(job)` runs in the shard that finishes last."""

    def __init__(self, nkeys: int, shards: int, applies=(), reply=None, copy: Optional[List[_Slot]] = None,
                 norms: Optional[List[_Slot]] = None, on_done: Optional[Callable] = None, mean=None):
        self.applies, self.reply, self.copy, self.norms, self.on_done = list(applies), reply, copy, norms, on_done
        self.mean = mean
        self.frames: List = [None] * nkeys if reply is not None else []
        self.state: Dict[str, list] = {"x": [None] * nkeys, "x0": [None] * nkeys,
                                       "x_hat": {s.worker: [None] * nkeys for s in copy}} if copy is not None else {}
        self.sq: Dict[str, float] = {}
        self.fields: dict = {}
        self.error: Optional[BaseException] = None
        self._left = shards
        self._lock = threading.Lock()
        self.finished = threading.Event()

    def part_done(self) -> bool:
        with self._lock:
            self._left -= 1
            return self._left == 0


class _Shard:
    """Keys ``[k0, k1)`` of the server's range: their share of ``x``, ``x0`` and every ``x_hat_j``, and the thread
    that applies jobs to them in order."""

    def __init__(self, server: "ParameterServer", index: int, k0: int, k1: int):
        self.server, self.index, self.k0, self.k1 = server, index, k0, k1
        self.jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        biggest = max((server.x[k].numel() for k in range(k0, k1)), default=0)
        self.scratch = torch.empty(biggest, dtype=torch.float64)     # reused by every job (sliced, viewed)
        self._views: Dict[Tuple[int, torch.dtype], torch.Tensor] = {}
        self.thread = threading.Thread(target=self._loop, name=f"ps-shard-{index}", daemon=True)

    def _scratch(self, t: torch.Tensor) -> torch.Tensor:
        key = (t.numel(), t.dtype)
        view = self._views.get(key)                  # one view per key size, made once
        if view is None:
            view = self._views[key] = self.scratch.view(torch.uint8)[:t.numel() * t.element_size()].view(t.dtype)
        return view

    def _loop(self) -> None:
        srv = self.server
        outbox = srv.context.socket(zmq.PUSH)
        outbox.setsockopt(zmq.LINGER, 0)
        outbox.connect(srv._outbox_addr)
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    break
                try:
                    self._run(job)
                except Exception as e:          # counted and logged; the reply still goes (as an error)
                    log.exception("shard %d failed a job", self.index)
                    job.error = e
                if job.part_done():
                    srv._finish(job, outbox)
        finally:
            outbox.close(0)

    def _run(self, job: _Job) -> None:
        srv = self.server
        x = srv.x
        g = srv.key_range[0]                    # keys are numbered among the whole model's (their seeds)
        if job.reply is not None and job.reply[1] == "delta" and len(job.applies) == 1 and not job.mean:
            (frames, alpha, seed), (slot, _, down_seed, _) = job.applies[0], job.reply
            for k in range(self.k0, self.k1):       # a push answered by its pull: one fused pass per key
                job.frames[k] = srv.up.apply_delta(frames[k], x[k], alpha, key_seed(seed, g + k), srv.down,
                                                   slot.x_hat[k], key_seed(down_seed, g + k),
                                                   self._scratch(x[k])).numpy()
            return self._copy_and_norms(job)
        for frames, alpha, seed in job.applies:
            for k in range(self.k0, self.k1):
                srv.up.decode_add(frames[k], x[k], alpha, key_seed(seed, g + k), self._scratch(x[k]))
        if job.mean:
            for k in range(self.k0, self.k1):
                total = self._scratch(x[k]).view(x[k].shape).zero_()
                for frames, seed in job.mean:
                    srv.up.decode_add(frames[k], total, 1.0, key_seed(seed, g + k))
                x[k].sub_(total.div_(len(job.mean)))
        if job.reply is not None:
            slot, kind, seed, _ = job.reply
            for k in range(self.k0, self.k1):
                if kind == "full":
                    slot.x_hat[k] = x[k].clone()
                    job.frames[k] = x[k].clone().numpy().view("uint8")     # the frame may still be in flight
                else:
                    job.frames[k] = srv.down.encode_delta(x[k], slot.x_hat[k], key_seed(seed, g + k),
                                                          self._scratch(x[k])).numpy()
        self._copy_and_norms(job)

    def _copy_and_norms(self, job: _Job) -> None:
        srv, x = self.server, self.server.x
        if job.copy is not None:
            st = job.state
            for k in range(self.k0, self.k1):
                st["x"][k], st["x0"][k] = x[k].clone(), srv.x0[k].clone()
                for slot in job.copy:
                    if slot.x_hat is not None and slot.x_hat[k] is not None:
                        st["x_hat"][slot.worker][k] = slot.x_hat[k].clone()
        if job.norms is not None:
            for slot in job.norms:
                if slot.x_hat is None:
                    continue
                sq = sum(float(torch.linalg.vector_norm(x[k] - slot.x_hat[k])) ** 2
                         for k in range(self.k0, self.k1) if slot.x_hat[k] is not None)
                with job._lock:
                    job.sq[slot.worker] = job.sq.get(slot.worker, 0.0) + sq


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
        self.staleness_policy = staleness_policy
        self.mode = mode
        self.heartbeat_timeout = heartbeat_timeout
        self.num_workers = num_workers
        self.num_servers, self.server_index, self.key_elems = num_servers, server_index, key_elems
        self.threads = threads          # None: chosen from the model's size when it arrives
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
        self._writer: "queue.Queue" = queue.Queue()

        # state (under self._lock); the values of x, x0 and every x_hat belong to the shard threads
        self.layout = None
        self.keys: List = []                   # this server's keys: (tensor, start, stop)
        self.key_range = (0, 0)                # their indices among all the model's keys
        self.key_layout = None
        self.x: Optional[List[torch.Tensor]] = None      # one 1-D tensor per key
        self.x0: Optional[List[torch.Tensor]] = None
        self.shards: List[_Shard] = []
        self.version = 0
        self.counters: Counter = Counter()    # applied, rejected, skipped, dropped, rejoined, bytes_up, ...
        self.errors: Counter = Counter()      # protocol errors by code
        self.slots: Dict[str, _Slot] = {}
        self.done_workers = set()
        self.taus: Counter = Counter()        # staleness of applied pushes
        self._recent_taus: List[int] = []
        self._seen: Dict[str, float] = {}     # worker -> monotonic time of its last message (I/O thread writes)
        self._round: Dict[str, tuple] = {}    # sync mode: this round's pushes (frames, seed)
        self._last_ckpt = (time.monotonic(), 0)
        self._ckpt_pending = False
        self.ckpt_epoch = 0          # checkpoint copies queued so far: a push applied now is in checkpoint number
        self.durable = -1            # ckpt_epoch and later ones; checkpoints 0..durable are on disk
        self.resumed_from: Optional[int] = None
        self._monitor = None
        self._norms: Dict[str, float] = {}
        self._resumable: Dict[str, dict] = {}   # downlink state from a checkpoint, by worker, until it rejoins
        if resume:
            self._restore(checkpoint.load(checkpoint_dir))

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
        if self.logdir:
            from dsq_plugins.monitoring.monitor import TensorBoardMonitor
            self._monitor = TensorBoardMonitor(str(self.logdir), prefix="ps/")
        self._threads = [threading.Thread(target=self._io_loop, args=(router, outbox_pull), name="ps-io", daemon=True),
                         threading.Thread(target=self._control_loop, name="ps-control", daemon=True),
                         threading.Thread(target=self._writer_loop, name="ps-checkpoint", daemon=True)]
        for t in self._threads:
            t.start()
        with self._lock:
            for sh in self.shards:          # resumed: the model is here already
                sh.thread.start()
        log.info("parameter server %d/%d listening on %s (mode %s, up %s, down %s, max_staleness %d)",
                 self.server_index, self.num_servers, self.address, self.mode, self.up.spec, self.down.spec,
                 self.max_staleness)
        return self

    def stop(self) -> None:
        """Stop every thread, write a final checkpoint (if a directory is set) and close the TensorBoard log."""
        self._stop.set()
        for t in self._threads[:2]:
            t.join(timeout=10)
        self._writer.put(None)              # an older checkpoint still queued lands before the final one
        for t in self._threads[2:]:
            t.join(timeout=60)
        with self._lock:
            if self.checkpoint_dir and self.x is not None and self.shards and self.shards[0].thread.is_alive():
                self.save_checkpoint()
            for sh in self.shards:
                sh.jobs.put(None)
        for sh in self.shards:
            if sh.thread.is_alive():
                sh.thread.join(timeout=10)
        self._threads = []
        if self._monitor:
            self._monitor.close()
            self._monitor = None

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
            slots = [s for s in self.slots.values()]
            job = self._copy_job(slots) if self.shards else None
            snap = {"version": self.version, "counters": dict(self.counters), "errors": dict(self.errors),
                    "taus": dict(self.taus), "done": sorted(self.done_workers), "keys": list(self.keys),
                    "key_range": self.key_range,
                    "workers": {s.worker: {"base": s.base, "clock": s.clock, "accepted": s.accepted,
                                           "rejected": s.rejected, "skipped": s.skipped, "pulls": s.pulls,
                                           "behind": s.behind, "done": s.done} for s in slots}}
        if job is not None and not job.finished.wait(60):
            raise TimeoutError("the shard threads did not answer a snapshot within 60 s")
        st = job.state if job is not None else {"x": None, "x0": None, "x_hat": {}}
        snap["xk"], snap["x0k"] = st["x"], st["x0"]
        snap["x"], snap["x0"] = self._tensors(st["x"]), self._tensors(st["x0"])
        for s in slots:
            xh = st["x_hat"].get(s.worker)
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
            # No lock: a dict read and plain assignments (atomic in CPython); the control thread may be busy.
            slot = self.slots.get(wid)
            known = slot is not None and slot.session == header.get("session")
            if known:
                self._seen[wid] = time.monotonic()
                skipped = header.get("skipped")
                if isinstance(skipped, int):
                    slot.worker_skipped = skipped
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
                        replies += self._housekeeping(now)
                        self._changed.notify_all()
                for r in replies:
                    outbox.send_multipart(r, copy=False)
        except Exception:          # a bug here must not leave workers hanging silently
            log.exception("control thread crashed")
            raise
        finally:
            outbox.close(0)

    def _dispatch(self, job: _Job) -> _Job:
        """Queue `job` on every shard (under the lock: all shards see all jobs in one order)."""
        for sh in self.shards:
            sh.jobs.put(job)
        return job

    def _finish(self, job: _Job, outbox) -> None:
        """Runs in the shard that finished `job` last: send its reply, run its callback."""
        if job.reply is not None:
            slot, kind, seed, fields = job.reply
            ident, wid, seq = fields.pop("_identity"), fields.pop("_worker"), fields.pop("_seq")
            if job.error is not None:
                msg = self._reply(ident, "error", wid, seq, code="internal", message=repr(job.error)[:300])
            else:
                msg = self._reply(ident, "model", wid, seq, job.frames, **fields)
            outbox.send_multipart(msg, copy=False)
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:
                log.exception("a job's callback failed")
        job.finished.set()

    def _handle(self, identity: bytes, header: dict, payload: list, nbytes: int) -> list:
        wid, seq, kind = header["w"], header["s"], header["type"]
        try:
            if kind == "hello":
                return [self._hello(identity, header)]
            if kind == "status":
                return [self._reply(identity, "status", wid, seq, **self._status())]
            slot = self.slots.get(wid)
            if slot is None or slot.session != header.get("session"):
                raise ProtocolError("unknown_worker", f"worker {wid!r} has no session here (server epoch "
                                                      f"{self.epoch}): send hello again")
            self._seen[wid] = time.monotonic()
            slot.identity = identity
            if kind == "init":
                return [self._init(slot, seq, payload)]
            if self.x is None:
                raise ProtocolError("bad_type", "this server has no model yet: send init (the parameters) first")
            if kind == "pull":
                return self._pull(slot, seq, bool(header.get("full", False)), {})
            if kind in ("push", "step"):
                return self._push(slot, header, payload, nbytes, pull=kind == "step")
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

    def _adopt_layout(self, layout) -> None:
        keys = split_keys(layout, self.block_size, self.key_elems)
        try:
            k0, k1 = partition(keys, self.num_servers)[self.server_index]
        except ValueError as e:
            raise ProtocolError("layout", str(e)) from None
        self.layout, self.key_range = layout, (k0, k1)
        self.keys = keys[k0:k1]
        self.key_layout = key_layout(layout, self.keys)

    def _hello(self, identity: bytes, header: dict) -> list:
        wid, seq = header["w"], header["s"]
        layout = layout_from_json(header.get("layout"))
        if self.layout is None:
            self._adopt_layout(layout)
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
            slot.held = True
            slot.base = saved["base"]
            self.counters["resumed_downlinks"] += 1
        self.slots[wid] = slot
        self.done_workers.discard(wid)
        self._seen[wid] = time.monotonic()
        self.counters["joins"] += 1
        return self._reply(identity, "welcome", wid, seq, session=slot.session, epoch=self.epoch,
                           version=self.version, up=self.up.spec, down=self.down.spec, block=self.block_size,
                           max_staleness=self.max_staleness, mode=self.mode, layout=layout_to_json(self.layout),
                           num_servers=self.num_servers, server_index=self.server_index, key_elems=self.key_elems,
                           key_range=list(self.key_range), initialised=self.x is not None,
                           checkpointing=bool(self.checkpoint_dir), durable=self.durable,
                           resumed_from=self.resumed_from)

    def _init(self, slot: _Slot, seq: int, payload: list) -> list:
        """The first worker's parameters of this server's keys become the model (later inits are ignored)."""
        if self.x is None:
            x = unpack(self.dense, payload, self.key_layout)
            if not all(bool(torch.isfinite(t).all()) for t in x):
                raise ProtocolError("bad_payload", "the initial parameters hold NaN or Inf")
            self.x = [t.clone() for t in x]
            self.x0 = [t.clone() for t in x]
            self._start_shards()
            log.info("model initialised by worker %s: %d keys, %d elements", slot.worker, len(x),
                     sum(t.numel() for t in x))
        return self._reply(slot.identity, "status", slot.worker, seq, **self._status())

    def _start_shards(self) -> None:
        # By default one shard thread per 4M elements, up to 4 and the CPUs: below that, handing a push to a second
        # thread costs more than its half of the arithmetic saves (measured, benchmarks/async_ps.py).
        elems = sum(b - a for _, a, b in self.keys)
        want = self.threads or max(1, min(4, os.cpu_count() or 1, elems // (1 << 22)))
        n = min(want, len(self.keys))
        self.shards = [_Shard(self, i, a, b) for i, (a, b) in enumerate(partition(self.keys, n))]
        if self._threads:
            for sh in self.shards:
                sh.thread.start()

    # -- pulls
    def _gate_members(self):
        return [s for s in self.slots.values() if not s.done and not s.behind and s.held]

    def _pack_clock(self) -> int:
        """The lower median of the clocks of the workers the bound waits for (0 when there are none)."""
        clocks = sorted(s.clock for s in self._gate_members())
        return clocks[(len(clocks) - 1) // 2] if clocks else 0

    def _may_pull(self, slot: _Slot) -> bool:
        if self.mode == "sync":
            return slot.worker not in self._round
        if self.server_index != 0:
            return True             # the job's one gate is server 0 (see the module docstring)
        if slot not in self._gate_members():
            return True
        return slot.clock - self._pack_clock() < self.max_staleness

    def _pull(self, slot: _Slot, seq: int, full: bool, ack: dict, applies=()) -> list:
        """Answer a pull now (a job) or hold it at the bound; `ack` fields go in the answer (a step's)."""
        if self._may_pull(slot):
            self._dispatch(self._model_job(slot, seq, full, ack, applies))
        else:
            if applies:
                self._dispatch(_Job(len(self.keys), len(self.shards), applies))
            slot.pending_pull = (slot.identity, seq, full, ack)
        return []

    def _model_job(self, slot: _Slot, seq: int, full: bool, ack: dict, applies=()) -> _Job:
        seed = secrets.randbits(32) if self.down.compressor.uses_seed else 0
        if slot.x_hat is None or full or not slot.held:
            slot.x_hat = [None] * len(self.keys)
            slot.held = True
            kind, nbytes = "full", sum(self.dense.nbytes(t.numel(), t.dtype) for t in self.x)
        else:
            kind, nbytes = "delta", sum(self.down.nbytes(t.numel(), t.dtype) for t in self.x)
        slot.base = self.version
        slot.pulls += 1
        self.counters["pulls"] += 1
        self.counters["bytes_down"] += nbytes
        self.counters["full_pulls" if kind == "full" else "delta_pulls"] += 1
        fields = dict(ack, kind=kind, version=self.version, seed=seed, _identity=slot.identity, _worker=slot.worker,
                      _seq=seq)
        return _Job(len(self.keys), len(self.shards), applies, reply=(slot, kind, seed, fields))

    def _release_pulls(self) -> list:
        for slot in self.slots.values():
            if slot.pending_pull is not None and self._may_pull(slot):
                identity, seq, full, ack = slot.pending_pull
                slot.pending_pull = None
                slot.identity = identity
                self._dispatch(self._model_job(slot, seq, full, ack))
        return []

    # -- pushes
    def _push(self, slot: _Slot, header: dict, payload: list, nbytes: int, pull: bool) -> list:
        base = hfield(header, "base", int)
        if not 0 <= base <= self.version:
            raise ProtocolError("bad_field", f"base version {base} is outside [0, {self.version}]")
        if self.mode == "sync" and slot.worker in self._round:
            raise ProtocolError("bad_field", "a second push in one synchronous round: pull first")
        frames = frame_tensors(self.up, payload, self.key_layout)
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
        status, reason, scale, applies = "applied", "", 0.0, []
        if tau > self.max_staleness or (self.mode == "sync" and tau > 0):
            status, reason = "rejected", f"stale: tau={tau} > max_staleness={self.max_staleness}"
            slot.rejected += 1
            slot.behind = True
            self.counters["rejected"] += 1
        elif not frames_finite(self.up, frames, self.key_layout):
            status, reason = "skipped", "the update holds NaN or Inf"
            slot.skipped += 1
            self.counters["skipped"] += 1
        else:
            if self.mode == "sync":
                self._round[slot.worker] = (frames, seed)    # applied, as the round's mean, when the round closes
                scale = 1.0
            else:
                scale = 1.0 / (1 + tau) if self.staleness_policy == "inverse" else 1.0
                applies = [(frames, -scale, seed)]
                self.version += 1
                self.taus[tau] += 1
                self._recent_taus.append(tau)
            slot.accepted += 1
            slot.behind = False
            self.counters["applied"] += 1
        ack = dict(status=status, reason=reason, tau=tau, scale=scale, ck=self.ckpt_epoch, durable=self.durable)
        if pull:
            self._close_round()
            replies = self._pull(slot, header["s"], False, ack, applies)
        else:
            if applies:
                self._dispatch(_Job(len(self.keys), len(self.shards), applies))
            replies = [self._reply(slot.identity, "ack", slot.worker, header["s"], version=self.version, **ack)]
            self._close_round()
        return replies + self._release_pulls() + self._maybe_checkpoint(pushes=True)

    def _close_round(self) -> list:
        """Sync mode: apply the round's mean once every live worker that is not done has pushed."""
        if self.mode != "sync" or not self._round:
            return []
        waiting = [s for s in self.slots.values() if not s.done and s.held and s.worker not in self._round]
        if waiting:
            return []
        n = len(self._round)
        self._dispatch(_Job(len(self.keys), len(self.shards), mean=list(self._round.values())))
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
        if not self.checkpoint_dir or self.x is None or self._ckpt_pending:
            return []
        t0, applied0 = self._last_ckpt
        due = (self.checkpoint_every_pushes and pushes
               and self.counters["applied"] - applied0 >= self.checkpoint_every_pushes)
        due = due or (self.checkpoint_every_s and time.monotonic() - t0 >= self.checkpoint_every_s
                      and self.counters["applied"] != applied0)
        if due:
            self._checkpoint_async()
        return []

    def _copy_job(self, slots: List[_Slot], on_done=None, checkpoint: bool = False) -> _Job:
        """Queue a copy of the state; for a checkpoint, the pushes applied from now on belong to the next one."""
        job = self._dispatch(_Job(len(self.keys), len(self.shards), copy=slots, on_done=on_done))
        if checkpoint:
            self.ckpt_epoch += 1
        return job

    def _checkpoint_state(self) -> dict:
        """The control part of a checkpoint, taken at the moment its copy job is queued."""
        return {"layout": layout_to_json(self.layout), "version": self.version, "counters": dict(self.counters),
                "number": self.ckpt_epoch, "resumed_from": self.resumed_from, "epoch": self.epoch,
                "taus": dict(self.taus), "num_servers": self.num_servers, "server_index": self.server_index,
                "key_elems": self.key_elems, "block_size": self.block_size, "key_range": list(self.key_range),
                "keys": [list(k) for k in self.keys],
                "workers": {s.worker: {"session": s.session, "pulls": s.pulls, "base": s.base,
                                       "accepted": s.accepted, "rejected": s.rejected, "skipped": s.skipped}
                            for s in self.slots.values() if s.held}}

    def _checkpoint_async(self) -> _Job:
        """Queue a copy of the state on the shards (each copies its keys when it gets there: the apply path does
        not stop) and hand it to the writer thread."""
        state = self._checkpoint_state()
        slots = [s for s in self.slots.values() if s.held]
        self._ckpt_pending = True
        self._last_ckpt = (time.monotonic(), self.counters["applied"])

        def to_writer(job):
            st = dict(state, x=job.state["x"], x0=job.state["x0"])
            st["workers"] = {w: dict(info, x_hat=job.state["x_hat"][w]) for w, info in state["workers"].items()}
            self._writer.put(st)
        return self._copy_job(slots, on_done=to_writer, checkpoint=True)

    def _writer_loop(self) -> None:
        while True:
            state = self._writer.get()
            if state is None:
                break
            try:
                path = checkpoint.save(self.checkpoint_dir, state)
                with self._lock:
                    self.counters["checkpoints"] += 1
                    self.durable = max(self.durable, state["number"])
                log.info("checkpoint at version %d -> %s", state["version"], path)
            except Exception:
                log.exception("checkpoint failed")
                with self._lock:
                    self.errors["checkpoint"] += 1
            finally:
                with self._lock:
                    self._ckpt_pending = False

    def save_checkpoint(self) -> None:
        """Write the checkpoint now (parameters, downlink copies, version, counters) and return once on disk."""
        with self._lock:
            if self.x is None:
                return
            state = self._checkpoint_state()
            slots = [s for s in self.slots.values() if s.held]
            job = self._copy_job(slots, checkpoint=True)
        if not job.finished.wait(60):
            raise TimeoutError("the shard threads did not copy the state within 60 s")
        state.update(x=job.state["x"], x0=job.state["x0"])
        state["workers"] = {w: dict(info, x_hat=job.state["x_hat"][w]) for w, info in state["workers"].items()}
        path = checkpoint.save(self.checkpoint_dir, state)
        with self._lock:
            self._last_ckpt = (time.monotonic(), state["counters"].get("applied", 0))
            self.counters["checkpoints"] += 1
            self.durable = max(self.durable, state["number"])
        log.info("checkpoint at version %d -> %s", state["version"], path)

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
        self.x = [t.clone() for t in state["x"]]
        self.x0 = [t.clone() for t in state["x0"]]
        self.version = int(state["version"])
        self.counters = Counter(state["counters"])
        self.taus = Counter({int(k): v for k, v in state["taus"].items()})
        self.counters["resumed"] += 1
        self.durable = self.resumed_from = int(state["number"])
        self.ckpt_epoch = self.durable + 1
        self._resumable = dict(state["workers"])
        self._last_ckpt = (time.monotonic(), self.counters["applied"])
        self._start_shards()
        log.info("resumed from %s at version %d (%d pushes applied)", self.checkpoint_dir, self.version,
                 self.counters["applied"])

    def _status(self) -> dict:
        c = self.counters
        return {"version": self.version, "applied": c["applied"], "rejected": c["rejected"],
                "skipped": c["skipped"], "dropped": c["dropped"], "live": len(self.slots),
                "done": len(self.done_workers), "num_workers": self.num_workers,
                "errors": sum(self.errors.values()), "bytes_up": c["bytes_up"], "bytes_down": c["bytes_down"],
                "initialised": self.x is not None, "server_index": self.server_index,
                "num_servers": self.num_servers, "checkpoints": c["checkpoints"],
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
            if wid in self._norms:      # computed by the shards at the last log (a consistent cut)
                m.log_scalar(f"ps/downlink_residual_norm/{wid}", self._norms[wid], step)
            m.log_scalar(f"ps/worker_residual_norm/{wid}", s.worker_rnorm, step)
            if s.loss is not None:
                m.log_scalar(f"ps/loss/{wid}", s.loss, step)
        m.flush()
        if self.shards:
            def keep(job):
                self._norms = {w: math.sqrt(v) for w, v in job.sq.items()}
            self._dispatch(_Job(len(self.keys), len(self.shards), norms=[s for s in self.slots.values() if s.held],
                                on_done=keep))
