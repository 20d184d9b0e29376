"""The shard executor: the server's keys of ``x`` and ``x0`` (and every worker's ``x_hat_j`` of them) split into
shards, each applied by its own thread from a FIFO of typed jobs.

A job goes to every shard's FIFO in the control thread's order, so every shard sees the same sequence of pushes
and a pull's answer or a copy is a consistent cut at one version; the shard that finishes a job last sends its
answer and runs its callback. The arithmetic is `BlockCodec`'s; the frames of key ``k`` are seeded with
``key_seed(seed, first_key + k)`` (keys are numbered among the whole model's).
"""
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Tuple

import torch
import zmq

from .protocol import encode, key_seed, partition

if TYPE_CHECKING:
    from .sessions import Slot

__all__ = ["JobKind", "PullKind", "Push", "Update", "Answer", "ModelCopy", "Job", "Shard", "ShardExecutor"]

log = logging.getLogger("async_ps.server")          # the server's log: its lines keep the server's logger name


class JobKind(Enum):
    APPLY = "apply"      # pushes: x += alpha * decode(frames), per key
    MEAN = "mean"        # a synchronous round: x -= mean(decode(frames)) over its pushes
    PULL = "pull"        # pushes (none, or the step's one), then a worker's pull: the answer's frames
    COPY = "copy"        # x, x0 and the given workers' x_hat (a checkpoint or a snapshot)
    NORMS = "norms"      # the downlink residual |x - x_hat_j|^2 of the given workers


class PullKind(Enum):
    """What a pull's answer holds (its ``kind`` on the wire)."""

    FULL = "full"        # x, dense; the worker's x_hat_j becomes x
    DELTA = "delta"      # c = C_s(x - x_hat_j); x_hat_j += c


@dataclass(frozen=True)
class Push:
    """A worker's compressed update: one uplink frame per key of this server, and the seed of its frames."""

    frames: list
    seed: int


@dataclass(frozen=True)
class Update:
    """``x += alpha * decode(push)`` (``alpha = -s(tau)`` for an applied push)."""

    push: Push
    alpha: float


@dataclass
class Answer:
    """A pull's answer: sent to `identity` as a ``model`` message (worker `worker`, request `seq`) with `fields`
    in its header; `seed` seeds the downlink frames."""

    slot: "Slot"
    kind: PullKind
    seed: int
    identity: bytes
    worker: str
    seq: int
    fields: dict


@dataclass
class ModelCopy:
    """A copy of the state, per key (1-D tensors): ``x``, ``x0`` and per worker ``x_hat`` (None where that worker
    holds no copy of a key)."""

    x: list
    x0: list
    x_hat: Dict[str, list]


@dataclass(eq=False)
class Job:
    """Work every shard does for its keys, in FIFO order. The inputs depend on `kind`: `updates` (APPLY, PULL),
    `mean` (MEAN), `answer` (PULL), `slots` (COPY, NORMS); the results are `frames` (PULL: the answer's, per
    key), `copy` (COPY) and `sq` (NORMS: squared norms by worker). `on_done(job)` runs in the shard that finishes
    last, then `finished` is set; `error` is a shard's exception (the answer then goes as an error)."""

    kind: JobKind
    nkeys: int
    shards: int
    updates: List[Update] = field(default_factory=list)
    mean: List[Push] = field(default_factory=list)
    answer: Optional[Answer] = None
    slots: List["Slot"] = field(default_factory=list)
    on_done: Optional[Callable[["Job"], None]] = None
    frames: list = field(init=False)
    copy: Optional[ModelCopy] = field(init=False, default=None)
    sq: Dict[str, float] = field(init=False, default_factory=dict)
    error: Optional[BaseException] = field(init=False, default=None)
    finished: threading.Event = field(init=False, default_factory=threading.Event)

    def __post_init__(self):
        self.frames = [None] * self.nkeys if self.kind is JobKind.PULL else []
        if self.kind is JobKind.COPY:
            self.copy = ModelCopy([None] * self.nkeys, [None] * self.nkeys,
                                  {s.worker: [None] * self.nkeys for s in self.slots})
        self._left = self.shards
        self._lock = threading.Lock()

    def part_done(self) -> bool:
        """Count one shard's part as done; True for the last one."""
        with self._lock:
            self._left -= 1
            return self._left == 0

    def add_sq(self, worker: str, sq: float) -> None:
        with self._lock:
            self.sq[worker] = self.sq.get(worker, 0.0) + sq


class Shard:
    """Keys ``[k0, k1)`` of the server's range: their share of ``x``, ``x0`` and every ``x_hat_j``, and the thread
    that applies jobs to them in order."""

    def __init__(self, executor: "ShardExecutor", index: int, k0: int, k1: int):
        self.executor, self.index, self.k0, self.k1 = executor, index, k0, k1
        self.jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        biggest = max((executor.x[k].numel() for k in range(k0, k1)), default=0)
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
        ex = self.executor
        outbox = ex.context.socket(zmq.PUSH)
        outbox.setsockopt(zmq.LINGER, 0)
        outbox.connect(ex.outbox_addr)
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    break
                try:
                    self.run(job)
                except Exception as e:          # counted and logged; the answer still goes (as an error)
                    log.exception("shard %d failed a job", self.index)
                    job.error = e
                if job.part_done():
                    ex.finish(job, outbox)
        finally:
            outbox.close(0)

    def run(self, job: Job) -> None:
        """This shard's part of `job` (its keys), in the calling thread."""
        if job.kind is JobKind.APPLY:
            self._apply(job.updates)
        elif job.kind is JobKind.MEAN:
            self._mean(job.mean)
        elif job.kind is JobKind.PULL:
            if job.answer.kind is PullKind.DELTA and len(job.updates) == 1:
                self._apply_and_delta(job.updates[0], job)
            else:
                self._apply(job.updates)
                self._answer(job)
        elif job.kind is JobKind.COPY:
            self._copy(job)
        else:
            self._norms(job)

    def _apply(self, updates: List[Update]) -> None:
        ex, x, g = self.executor, self.executor.x, self.executor.first_key
        for u in updates:
            for k in range(self.k0, self.k1):
                ex.up.decode_add(u.push.frames[k], x[k], u.alpha, key_seed(u.push.seed, g + k), self._scratch(x[k]))

    def _mean(self, pushes: List[Push]) -> None:
        ex, x, g = self.executor, self.executor.x, self.executor.first_key
        for k in range(self.k0, self.k1):
            total = self._scratch(x[k]).view(x[k].shape).zero_()
            for p in pushes:
                ex.up.decode_add(p.frames[k], total, 1.0, key_seed(p.seed, g + k))
            x[k].sub_(total.div_(len(pushes)))

    def _apply_and_delta(self, u: Update, job: Job) -> None:
        """A push answered by its pull: one fused pass per key."""
        ex, x, g, a = self.executor, self.executor.x, self.executor.first_key, job.answer
        for k in range(self.k0, self.k1):
            job.frames[k] = ex.up.apply_delta(u.push.frames[k], x[k], u.alpha, key_seed(u.push.seed, g + k), ex.down,
                                              a.slot.x_hat[k], key_seed(a.seed, g + k), self._scratch(x[k])).numpy()

    def _answer(self, job: Job) -> None:
        ex, x, g, a = self.executor, self.executor.x, self.executor.first_key, job.answer
        for k in range(self.k0, self.k1):
            if a.kind is PullKind.FULL:
                a.slot.x_hat[k] = x[k].clone()
                job.frames[k] = x[k].clone().numpy().view("uint8")     # the frame may still be in flight
            else:
                job.frames[k] = ex.down.encode_delta(x[k], a.slot.x_hat[k], key_seed(a.seed, g + k),
                                                     self._scratch(x[k])).numpy()

    def _copy(self, job: Job) -> None:
        ex, c = self.executor, job.copy
        for k in range(self.k0, self.k1):
            c.x[k], c.x0[k] = ex.x[k].clone(), ex.x0[k].clone()
            for slot in job.slots:
                if slot.x_hat is not None and slot.x_hat[k] is not None:
                    c.x_hat[slot.worker][k] = slot.x_hat[k].clone()

    def _norms(self, job: Job) -> None:
        x = self.executor.x
        for slot in job.slots:
            if slot.x_hat is None:
                continue
            job.add_sq(slot.worker, sum(float(torch.linalg.vector_norm(x[k] - slot.x_hat[k])) ** 2
                                        for k in range(self.k0, self.k1) if slot.x_hat[k] is not None))


class ShardExecutor:
    """The server's model keys ``x`` and ``x0`` (lists of 1-D tensors, key order; their values belong to the shard
    threads once started) cut into shards, and the jobs that change or read them.

    Args:
        x, x0: the model and the initial model, per key (kept, not copied).
        keys: the server's keys ``(tensor, start, stop)`` (for the cut into shards); first_key: the index of the
            first among the model's keys (for the frames' seeds).
        up, down: the uplink and downlink `BlockCodec`s.
        threads: shard threads (None: one per 4M elements, up to 4 and the CPUs); at most one per key.
        context, outbox_addr: where the shards send the answers (a ZeroMQ PUSH each, to the I/O thread).
    """

    def __init__(self, x: List[torch.Tensor], x0: List[torch.Tensor], keys: list, first_key: int, up, down,
                 threads: Optional[int], context: zmq.Context, outbox_addr: str):
        self.x, self.x0, self.first_key, self.up, self.down = x, x0, first_key, up, down
        self.context, self.outbox_addr = context, outbox_addr
        # By default one shard thread per 4M elements, up to 4 and the CPUs: below that, handing a push to a second
        # thread costs more than its half of the arithmetic saves (measured, benchmarks/async_ps.py).
        elems = sum(b - a for _, a, b in keys)
        want = threads or max(1, min(4, os.cpu_count() or 1, elems // (1 << 22)))
        n = min(want, len(keys))
        self.shards = [Shard(self, i, a, b) for i, (a, b) in enumerate(partition(keys, n))]

    def start(self) -> None:
        for sh in self.shards:
            sh.thread.start()

    @property
    def alive(self) -> bool:
        """The shard threads are running (started and not stopped)."""
        return bool(self.shards) and self.shards[0].thread.is_alive()

    def stop(self) -> None:
        """Let every shard finish the jobs queued, then end its thread (waiting up to 10 s each)."""
        for sh in self.shards:
            sh.jobs.put(None)
        for sh in self.shards:
            if sh.thread.is_alive():
                sh.thread.join(timeout=10)

    def submit(self, kind: JobKind, **inputs) -> Job:
        """Queue a job on every shard; call it under the control lock, so all shards see all jobs in one order."""
        job = Job(kind, len(self.x), len(self.shards), **inputs)
        for sh in self.shards:
            sh.jobs.put(job)
        return job

    def finish(self, job: Job, outbox) -> None:
        """Runs in the shard that finished `job` last: send its answer, run its callback, set `finished`."""
        a = job.answer
        if a is not None:
            if job.error is not None:
                msg = encode("error", "", a.worker, a.seq, code="internal", message=repr(job.error)[:300])
            else:
                msg = encode("model", "", a.worker, a.seq, job.frames, **a.fields)
            outbox.send_multipart([a.identity, *msg], copy=False)
        if job.on_done is not None:
            try:
                job.on_done(job)
            except Exception:
                log.exception("a job's callback failed")
        job.finished.set()
