"""Server checkpoints on disk: one file, written atomically, read back without unpickling arbitrary objects.

A checkpoint holds one server's keys of the model ``x`` and of the initial model ``x0`` (lists of 1-D tensors in
key order; ``keys`` says which tensor and elements each is), the layout, which server of how many it is, its number
(``number``, see the server's durability), the version (steps applied), the counters, and per worker its downlink
copy ``x_hat_j`` of the same keys (so its downlink residual is ``x - x_hat_j``), its pull count and its push
counters. It is written with `torch.save` and read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.

`CheckpointWriter` numbers a server's checkpoints, says when the next one is due, and writes them on its own
thread.
"""
import logging
import os
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

__all__ = ["FILENAME", "save", "load", "Request", "CheckpointWriter"]

log = logging.getLogger("async_ps.server")          # the server's log: its lines keep the server's logger name

FILENAME = "async_ps.pt"
FORMAT = 2


def save(directory, state: dict) -> Path:
    """Write `state` to ``directory/async_ps.pt`` atomically (a temporary file, then a rename): a crash while
    saving leaves the previous checkpoint intact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load(directory) -> Optional[dict]:
    """The last checkpoint in `directory`, or None when there is none."""
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
    return state


@dataclass(eq=False)
class Request:
    """One checkpoint on its way to disk: `state` (the control part, completed by `CheckpointWriter.copied` with
    the shards' copy), whether nobody waits for it (`background`: a failure is logged and counted, not raised),
    `written` (set once it is on disk or failed) and `error`."""

    state: dict
    background: bool
    written: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None


class CheckpointWriter:
    """Numbers, schedules and writes one server's checkpoints to `directory` (see `save`), on the thread
    ``ps-checkpoint``, one at a time in the order they were copied.

    Numbering (the server's durability): a push applied now will first be in checkpoint `number` (copies queued
    so far); checkpoints ``0..durable`` are on disk (-1: none); `resumed_from` is the one this server resumed from
    (None: it started fresh). Schedule: a checkpoint is due every `every_s` seconds (if pushes were applied since
    the last) or every `every_pushes` applied pushes, one at a time. Counts ``checkpoints`` in `counters` and
    background failures as ``errors["checkpoint"]``, both under `lock` (the server's).
    """

    def __init__(self, directory, every_s: Optional[float], every_pushes: Optional[int], lock,
                 counters: Counter, errors: Counter):
        self.directory, self.every_s, self.every_pushes = directory, every_s, every_pushes
        self.lock, self.counters, self.errors = lock, counters, errors
        self.number = 0
        self.durable = -1
        self.resumed_from: Optional[int] = None
        self.pending = False                    # a background checkpoint is on its way
        self._last = (time.monotonic(), 0)      # when the last one began, and the applied pushes it holds
        self._queue: "queue.Queue" = queue.Queue()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ps-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write the checkpoints queued, then end the thread (waiting up to 60 s)."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=60)

    def resume(self, number: int, applied: int) -> None:
        """The server resumed from checkpoint `number` (holding `applied` pushes): the next one is ``number + 1``."""
        self.durable = self.resumed_from = number
        self.number = number + 1
        self._last = (time.monotonic(), applied)

    def due(self, applied: int, pushes: bool) -> bool:
        """Whether a background checkpoint is due now, with `applied` pushes applied so far; `pushes`: called
        after a push (the count schedule is only checked then)."""
        if not self.directory or self.pending:
            return False
        t0, applied0 = self._last
        due = self.every_pushes and pushes and applied - applied0 >= self.every_pushes
        return bool(due or (self.every_s and time.monotonic() - t0 >= self.every_s and applied != applied0))

    def begin(self, state: dict, applied: int, background: bool) -> Request:
        """Start checkpoint `state["number"]` (the control part of the state, taken now): pushes applied from now
        on belong to the next one. The caller queues the copy whose callback is `copied`."""
        if background:
            self.pending = True
        self._last = (time.monotonic(), applied)
        self.number += 1
        return Request(state, background)

    def copied(self, request: Request, copy) -> None:
        """The shards copied the state (a `shards.ModelCopy`): complete the request and queue it for the thread."""
        st = dict(request.state, x=copy.x, x0=copy.x0)
        st["workers"] = {w: dict(info, x_hat=copy.x_hat[w]) for w, info in request.state["workers"].items()}
        request.state = st
        self._queue.put(request)

    def _loop(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                break
            state = request.state
            try:
                path = save(self.directory, state)
                with self.lock:
                    self.counters["checkpoints"] += 1
                    self.durable = max(self.durable, state["number"])
                log.info("checkpoint at version %d -> %s", state["version"], path)
            except Exception as e:
                if not request.background:
                    request.error = e
                else:
                    log.exception("checkpoint failed")
                    with self.lock:
                        self.errors["checkpoint"] += 1
            finally:
                if request.background:
                    with self.lock:
                        self.pending = False
                request.written.set()
