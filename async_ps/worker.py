"""`Worker`: the client side of the asynchronous parameter server, and the training-loop helper.

In a training script::

    worker = async_ps.Worker.from_env(model, optimizer)    # joins, and pulls the full model
    for x, y in batches:
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        worker.step(loss=loss.item())                        # instead of optimizer.step()
    worker.finish()                                          # the model now holds the server's final parameters

`step` lets the optimizer compute its update ``u = p_before - p_after`` (any torch optimizer; the learning rate
and schedule stay in the script), puts the parameters back to the pulled model, and pushes
``c = C_w(u + e)`` with ``e <- u + e - c`` (error feedback on the worker, one residual per key). The residual is
committed only where the server applied the push: a push rejected as stale, skipped, or lost in a server restart
leaves ``e`` as it was, so that over the accepted pushes ``sum(c) + e = sum(u)`` holds exactly, key by key. An
update holding NaN or Inf is not pushed at all (counted in `skipped`). The push is a ``step`` request whose answer
is the server's compressed delta ``C_s(x - x_hat_j)``, added to the parameters, which therefore always equal the
server's ``x_hat_j``: one round trip per step.

With ``overlap=True`` `step` returns as soon as the push is sent, and the next `step` (or `pull`, `finish`)
first takes its answer: the script computes its next gradient while the reply is in flight, on parameters one
delta older (a staleness of one more version, which the server counts like any other).

Several servers (``address`` a list, or ``DSQ_PS_ADDR`` comma-separated): each holds one key range
(`protocol.partition`, announced in its welcome and checked here); a step sends every server its frames and
waits for all answers, each server's outcome (`StepResult.parts`) committing the residual of its own keys.

A server SIGKILLed and resumed from its checkpoint has lost the pushes it applied after that checkpoint; the
worker kept their sum (per checkpoint number, until the server says it is on disk) and puts it back into its
residual, so that it is pushed again: no update is lost (`recovered` counts such restarts).

A heartbeat thread (one socket per server) tells the servers the worker is alive and notices when one stops
answering or forgets the session (a restart); the next request to it then reconnects, says hello again and pulls
that server's keys in full, while the other servers go on.

CUDA models compress and decompress on the device (`BlockCodec` runs on the tensors' device); only the frames
cross to host memory, each message's frames in one transfer each way.
"""
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

import torch
import zmq

from dsq_plugins.engine.codec import BlockCodec
from dsq_plugins.engine.memory import ErrorFeedback
from dsq_plugins.compression.registry import get_compressor

from .protocol import (REPLY_TYPES, Limits, ProtocolError, decode, encode, frame_tensors, key_layout, key_seed,
                       layout_of, layout_to_json, partition, split_keys)

__all__ = ["Worker", "StepResult", "ServerError", "ServerLost", "ENV_ADDR", "ENV_TOKEN", "ENV_WORKER",
           "ENV_NUM_WORKERS"]

log = logging.getLogger("async_ps.worker")

ENV_ADDR, ENV_TOKEN, ENV_WORKER, ENV_NUM_WORKERS = "DSQ_PS_ADDR", "DSQ_PS_TOKEN", "DSQ_PS_WORKER", "DSQ_PS_NUM_WORKERS"


class ServerError(RuntimeError):
    """The server answered a request with an error reply (`code`, see `protocol.ERROR_CODES`)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"parameter server error [{code}]: {message}")
        self.code = code


class ServerLost(RuntimeError):
    """No answer from the server in time, or it restarted and forgot this worker's session."""


@dataclass
class StepResult:
    """What became of one `Worker.step`: ``status`` is ``applied`` (by every server), ``rejected`` (too stale),
    ``skipped`` (non-finite update, not pushed or not applied), ``lost`` (a server gone; the worker rejoined it),
    ``partial`` (servers disagreed: see `parts`) or ``pending`` (``overlap=True``: the first step, whose answer
    the next step takes); ``tau`` is the staleness in versions and ``scale`` the step factor (of the first
    server); ``version`` the model version now held (the sum over servers); ``parts`` each server's
    ``{"status", "tau", "scale"}``."""

    status: str
    version: int
    tau: int = 0
    scale: float = 0.0
    parts: list = field(default_factory=list)


class _Link:
    """One server: its address, sockets, session and the version of its keys this worker holds."""

    def __init__(self, address: str):
        self.address = address
        self.sock = None
        self.session: Optional[str] = None
        self.epoch: Optional[str] = None
        self.pulls = 0                      # pulls applied in this session
        self.version = -1
        self.index = 0                      # the server's index, and its keys [k0, k1) among the model's
        self.k0 = self.k1 = 0
        self.seq = 0
        self.hb = {"last_answer": time.monotonic(), "forgotten": False}
        self.checkpointing = False
        self.unsaved = {}                   # checkpoint number -> per key, the sum of applied pushes it will hold


class Worker:
    """One worker of the parameter server (or servers).

    Args:
        model: the module whose parameters (``named_parameters()`` order) the servers hold. Buffers are local.
        optimizer: computes each update from the gradients (its ``step()`` is called by `step`).
        address: the server endpoint (``tcp://HOST:PORT`` or ``inproc://NAME``), or a list of them (or a
            comma-separated string) for several servers; token: the shared token.
        worker_id: this worker's name (stable across restarts: a restarted worker replaces its old session).
        heartbeat_interval: seconds between heartbeats; a server counts as lost after ``server_timeout``
            seconds without a heartbeat answer.
        request_timeout: seconds to wait for any one answer (a pull may legitimately wait at the staleness bound).
        reconnect_timeout: seconds to keep trying to rejoin a lost server before giving up (`ServerLost`).
        overlap: send each step's push and return; the next call takes the answer (see the module docstring).
        record: keep every pushed and pulled tensor in `records` (tests check the conservation laws with it).
        norm_every_s: seconds between the residual norms reported with the pushes (a pass over the residuals; the
            server logs them about once a second); 0: with every push.
        context: the ZeroMQ context (``inproc://`` needs the server's).
    """

    def __init__(self, model: torch.nn.Module, optimizer, address: Union[str, Sequence[str]], token: str,
                 worker_id: Optional[str] = None, heartbeat_interval: float = 1.0, server_timeout: float = 10.0,
                 request_timeout: float = 300.0, reconnect_timeout: float = 120.0, overlap: bool = False,
                 record: bool = False, context: Optional[zmq.Context] = None, connect: bool = True,
                 norm_every_s: float = 1.0):
        self.model = model
        self.optimizer = optimizer
        addresses = [a.strip() for a in address.split(",")] if isinstance(address, str) else list(address)
        if not addresses or not all(addresses):
            raise ValueError(f"no parameter server address in {address!r}")
        self.address = ",".join(addresses)
        self.links = [_Link(a) for a in addresses]
        self.token = token
        self.worker_id = worker_id or f"w{os.getpid()}-{secrets.token_hex(2)}"
        self.heartbeat_interval = heartbeat_interval
        self.server_timeout = server_timeout
        self.request_timeout = request_timeout
        self.reconnect_timeout = reconnect_timeout
        self.overlap = overlap
        self.norm_every_s = norm_every_s
        self._norm_at = -float("inf")                # when the last residual norm was reported
        self.context = context or zmq.Context.instance()
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters()])
        self.layout = layout_of(zip(self.names, self.params))
        self.keys: List = []
        self.ef = ErrorFeedback()                # residuals by key index (one per tensor for small tensors)
        self.record = record
        self.records = []
        self.up = self.down = None
        self.accepted = self.rejected = self.skipped = self.lost = self.rejoins = self.recovered = 0
        self.bytes_up = self.bytes_down = 0
        self._limits = Limits()
        self._inflight = None
        self._before = self._update = self._left = None
        self._hb_stop = threading.Event()
        self._hb_thread: Optional[threading.Thread] = None
        if connect:
            self.connect()

    @classmethod
    def from_env(cls, model: torch.nn.Module, optimizer, **kwargs) -> "Worker":
        """A worker configured by the launcher's environment: ``DSQ_PS_ADDR`` (comma-separated for several
        servers), ``DSQ_PS_TOKEN``, ``DSQ_PS_WORKER``."""
        missing = [k for k in (ENV_ADDR, ENV_TOKEN) if not os.environ.get(k)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not set: run this script under `dsq-async-ps ... -- python "
                               f"SCRIPT` (or set {ENV_ADDR}=tcp://HOST:PORT and {ENV_TOKEN})")
        return cls(model, optimizer, os.environ[ENV_ADDR], os.environ[ENV_TOKEN],
                   worker_id=os.environ.get(ENV_WORKER), **kwargs)

    @property
    def version(self) -> int:
        """The model version held: the sum over servers of each one's version (-1 before the first pull)."""
        return sum(link.version for link in self.links) if all(lk.version >= 0 for lk in self.links) else -1

    @property
    def session(self) -> Optional[str]:
        return self.links[0].session

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Say hello to every server (checking that their key ranges tile the model), give the parameters to any
        server that has no model yet, then pull the full model. Retries until the servers answer or
        ``reconnect_timeout`` passes."""
        welcomes = [self._hello(link) for link in self.links]
        self._agree(welcomes)
        self._start_heartbeats()
        for link in self.links:
            self._init(link, welcomes[self.links.index(link)])
        self._pull_all(full=False)             # full unless a resumed server still has this worker's copy

    def _hello(self, link: _Link) -> dict:
        deadline = time.monotonic() + self.reconnect_timeout
        while True:
            self._reset_socket(link)
            try:
                held = {"session": link.session, "pulls": link.pulls} if link.session else None
                reply, _ = self._request(link, "hello", timeout=min(2.0, self.reconnect_timeout),
                                         layout=layout_to_json(self.layout), held=held)
                break
            except ServerError:
                link.sock.close(0)              # refused (wrong model, token...): nothing to retry
                link.sock = None
                raise
            except ServerLost:
                if time.monotonic() > deadline:
                    raise ServerLost(f"no parameter server answered at {link.address} within "
                                     f"{self.reconnect_timeout:.0f} s") from None
        restarted = link.epoch is not None and reply["epoch"] != link.epoch
        link.session, link.epoch, link.pulls = reply["session"], reply["epoch"], 0
        self._recover(link, reply, restarted)
        link.checkpointing = bool(reply.get("checkpointing"))
        link.index = int(reply.get("server_index", 0))
        link.k0, link.k1 = reply.get("key_range", [0, 0])
        link.hb.update(last_answer=time.monotonic(), forgotten=False)
        return reply

    def _recover(self, link: _Link, welcome: dict, restarted: bool) -> None:
        """After a server restart: what it applied but did not checkpoint goes back into the residual (and so is
        pushed again), so that ``sum(c applied) + e = sum(u)`` holds for its keys against its resumed state."""
        if not restarted or not link.unsaved:
            link.unsaved = {}
            return
        resumed = welcome.get("resumed_from")
        if not isinstance(resumed, int):
            log.warning("worker %s: server %d restarted without a checkpoint: the pushes it had applied are gone",
                        self.worker_id, link.index)
            link.unsaved = {}
            return
        lost = 0
        for number, sums in sorted(link.unsaved.items()):
            if number <= resumed:
                continue
            lost += 1
            for k, c in sums.items():
                self.ef.add(k, c)
        link.unsaved = {}
        if lost:
            self.recovered += 1
            log.warning("worker %s: server %d resumed from checkpoint %d: pushes it had applied after it are back "
                        "in the residual", self.worker_id, link.index, resumed)

    def _agree(self, welcomes: List[dict]) -> None:
        """Check the servers are one job: same codecs, blocks and keys, indices 0..N-1, ranges that tile the
        model; order the links by server index."""
        first = welcomes[0]
        n = len(self.links)
        for w in welcomes:
            for k in ("up", "down", "block", "key_elems", "mode", "num_servers"):
                if w.get(k) != first.get(k):
                    raise ServerError("layout", f"the servers disagree on {k!r}: {first.get(k)!r} vs {w.get(k)!r}")
        if first.get("num_servers", 1) != n or sorted(lk.index for lk in self.links) != list(range(n)):
            raise ServerError("layout", f"{n} server addresses given, but the servers say they are "
                                        f"{sorted(lk.index for lk in self.links)} of {first.get('num_servers')}")
        block = int(first.get("block", 4096))
        self.keys = split_keys(self.layout, block, int(first.get("key_elems", 1 << 18)))
        self.links.sort(key=lambda lk: lk.index)
        for link, (k0, k1) in zip(self.links, partition(self.keys, n)):
            if (link.k0, link.k1) != (k0, k1):
                raise ServerError("layout", f"server {link.index} holds keys [{link.k0}, {link.k1}), expected "
                                            f"[{k0}, {k1})")
        self.up = BlockCodec(get_compressor(first["up"]), block)
        self.down = BlockCodec(get_compressor(first["down"]), block)
        self.dense = BlockCodec(get_compressor("none"), block)
        self.mode = first["mode"]
        if self.overlap and self.mode == "sync":
            raise ValueError("overlap=True cannot work with a synchronous (mode='sync') server: every push but the "
                             "first of a round would be one version stale, and sync rejects any staleness")
        self._flat = [p.detach().view(-1) for p in self.params]

    def _key_view(self, k: int, tensors=None) -> torch.Tensor:
        i, a, b = self.keys[k]
        return (self._flat[i] if tensors is None else tensors[i].reshape(-1))[a:b]

    def _init(self, link: _Link, welcome: dict) -> None:
        if welcome.get("initialised"):
            return
        frames = _to_host([self._key_view(k).view(torch.uint8) for k in range(link.k0, link.k1)])
        self._request(link, "init", frames, session=link.session)

    def _reset_socket(self, link: _Link) -> None:
        if link.sock is not None:
            link.sock.close(0)
        link.sock = self.context.socket(zmq.DEALER)
        link.sock.setsockopt(zmq.LINGER, 0)
        link.sock.connect(link.address)

    def _send(self, link: _Link, kind: str, frames=(), **fields) -> int:
        link.seq += 1
        link.sock.send_multipart(encode(kind, self.token, self.worker_id, link.seq, frames, **fields), copy=False)
        self.bytes_up += sum(len(f) for f in frames)
        return link.seq

    def _receive(self, link: _Link, kind: str, seq: int, timeout: Optional[float] = None):
        """Wait for the answer to request `seq`: ``(header, frames)``. Raises `ServerError` for an error
        answer and `ServerLost` when none comes in time or the heartbeats say the server is gone."""
        timeout = timeout or self.request_timeout
        deadline = time.monotonic() + timeout
        while True:
            if link.sock.poll(50):
                header, payload = self._decode_reply(link.sock.recv_multipart())
                if header["s"] != seq:
                    continue                     # the answer to an earlier request that timed out
                self.bytes_down += sum(len(f) for f in payload)
                if header["type"] == "error":
                    raise ServerError(str(header.get("code")), str(header.get("message")))
                return header, payload
            if time.monotonic() > deadline:
                raise ServerLost(f"no answer to {kind!r} from {link.address} in {timeout} s")
            if kind != "hello" and self._server_gone(link):
                raise ServerLost(f"the parameter server at {link.address} stopped answering or restarted")

    def _request(self, link: _Link, kind: str, frames=(), timeout: Optional[float] = None, **fields):
        return self._receive(link, kind, self._send(link, kind, frames, **fields), timeout)

    def _decode_reply(self, frames):
        # Replies carry no token: an error reply may go to a peer that never proved it has one.
        header, payload = decode(frames, None, self._limits, types=REPLY_TYPES)
        return header, payload

    def _server_gone(self, link: _Link) -> bool:
        st = link.hb
        return st["forgotten"] or time.monotonic() - st["last_answer"] > self.server_timeout

    def _start_heartbeats(self) -> None:
        if self._hb_thread is not None and self._hb_thread.is_alive():
            return
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name=f"hb-{self.worker_id}", daemon=True)
        self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        socks = {}
        try:
            for link in self.links:
                sock = self.context.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, 4)
                sock.connect(link.address)
                socks[link.address] = sock
            poller = zmq.Poller()
            for sock in socks.values():
                poller.register(sock, zmq.POLLIN)
            while not self._hb_stop.is_set():
                for link in self.links:
                    try:
                        socks[link.address].send_multipart(encode("heartbeat", self.token, self.worker_id, 0,
                                                                  session=link.session, skipped=self.skipped),
                                                           zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                end = time.monotonic() + self.heartbeat_interval
                while not self._hb_stop.is_set() and time.monotonic() < end:
                    for sock, _ in poller.poll(50):
                        link = next(lk for lk in self.links if socks[lk.address] is sock)
                        header, _ = self._decode_reply(sock.recv_multipart())
                        if header.get("type") == "hb" and header.get("session") == link.session:
                            # (an answer to a heartbeat of an earlier session says nothing about this one)
                            link.hb["last_answer"] = time.monotonic()
                            if not header.get("known") or header.get("epoch") != link.epoch:
                                link.hb["forgotten"] = True
        except zmq.ContextTerminated:
            pass
        finally:
            for sock in socks.values():
                sock.close(0)

    def _rejoin(self, link: _Link, why: Exception) -> None:
        """Say hello to a lost server again (it may have restarted), re-initialise it if it has no model, and
        pull its keys (in full, unless it kept this worker's copy)."""
        log.warning("worker %s: server %d: %s; rejoining", self.worker_id, link.index, why)
        self.rejoins += 1
        welcome = self._hello(link)
        if (welcome.get("server_index", 0), *welcome.get("key_range", [0, 0])) != (link.index, link.k0, link.k1):
            raise ServerError("layout", f"the server at {link.address} came back as another server")
        self._init(link, welcome)
        # Not `full`: a server resumed from a checkpoint that still has this worker's copy sends a delta.
        self._apply_pull(link, *self._request(link, "pull", session=link.session, full=False))

    # ------------------------------------------------------------------ training
    def pull(self, full: bool = False) -> int:
        """Bring the parameters up to the servers' model (full: dense; else the compressed deltas). May wait at
        the staleness bound. Returns the version now held."""
        self._collect()
        self._pull_all(full)
        return self.version

    def _pull_all(self, full: bool) -> None:
        seqs = [self._send(link, "pull", session=link.session, full=full) for link in self.links]
        for link, seq in zip(self.links, seqs):
            self._apply_pull(link, *self._receive(link, "pull", seq))

    def _apply_pull(self, link: _Link, header: dict, frames) -> None:
        kind = header.get("kind")
        if kind not in ("full", "delta"):
            raise ProtocolError("malformed", f"unknown model kind {kind!r}")
        codec = self.dense if kind == "full" else self.down
        seed = header.get("seed", 0) if isinstance(header.get("seed", 0), int) else 0
        keys = self.keys[link.k0:link.k1]
        frames = _to_device(frame_tensors(codec, frames, key_layout(self.layout, keys)),
                            [self._key_view(k).device for k in range(link.k0, link.k1)])
        values = [torch.zeros_like(p) for p in self.params] if self.record else None
        with torch.no_grad():
            for k, frame in zip(range(link.k0, link.k1), frames):
                view = self._key_view(k)
                if kind == "full":
                    view.copy_(codec.decode(frame, view.shape, view.dtype, 0, view.device))
                else:
                    codec.decode_add(frame, view, 1.0, key_seed(seed, k))
                if values is not None:
                    before = values[self.keys[k][0]].view(-1)[self.keys[k][1]:self.keys[k][2]]
                    before.copy_(view if kind == "full" else codec.decode(frame, view.shape, view.dtype,
                                                                          key_seed(seed, k), view.device))
        if self.record:
            self.records.append({"kind": kind, "server": link.index, "values": values})
        link.version = header["version"]
        link.pulls += 1

    def step(self, loss: Optional[float] = None) -> StepResult:
        """Take the optimizer's update from the current gradients, push it compressed with the residual, and
        take the servers' answer (with ``overlap``: the previous step's answer, before computing this one).
        Call it where ``optimizer.step()`` would go."""
        # The gradients were taken at the parameters held before the answer in flight (if any) arrives: that
        # version is the push's base, so the extra staleness of `overlap` is counted (a rejoin can only lower it).
        bases = [link.version for link in self.links]
        previous = self._collect()
        bases = [min(b, link.version) for b, link in zip(bases, self.links)]
        if self._before is None:              # reused from step to step: no model-sized allocation per step
            self._before = [torch.empty_like(p) for p in self.params]
            self._update = [torch.empty_like(p) for p in self.params]
            self._left = [torch.empty_like(self._key_view(k)) for k in range(len(self.keys))]
        with torch.no_grad():
            for b, p in zip(self._before, self.params):
                b.copy_(p)
            self.optimizer.step()
            update = [torch.sub(b, p, out=u) for b, p, u in zip(self._before, self.params, self._update)]
            for p, b in zip(self.params, self._before):
                p.copy_(b)
            if self.record:
                update = [u.clone() for u in update]
        # The sum is non-finite whenever an element is (or when finite values overflow it: skipped too, never
        # applied); a reduction costs a tenth of `isfinite(u).all()` on a large tensor. The sums and the norms of
        # the residuals (when reported to the servers) come to the host together: one synchronisation on a GPU.
        n, now = len(update), time.monotonic()
        report = now - self._norm_at >= self.norm_every_s
        checks = torch.stack([u.sum().double() for u in update]
                             + [e.double() for e in (self.ef.norms() if report else ())]).cpu()
        if not bool(torch.isfinite(checks[:n]).all()):
            self.skipped += 1
            return previous or StepResult("skipped", self.version)
        rnorm = None                                    # the residuals only change when an answer commits
        if report:
            rnorm, self._norm_at = float(torch.linalg.vector_norm(checks[n:])), now
        seed = secrets.randbits(32) if self.up.compressor.uses_seed else 0
        frames, seqs = [], []
        for link, base in zip(self.links, bases):
            for k in range(link.k0, link.k1):
                # C(u + e) on the model's device; what it leaves behind waits in _left[k] for the server's answer
                e = self.ef.get(k)
                if e is None:                          # none until a push of this key is applied: zeros, in place
                    e = self._left[k].zero_()
                frames.append(self.up.encode_residual(self._key_view(k, update), e, self._left[k],
                                                      key_seed(seed, k)))
            seqs.append(self._send(link, "step", _to_host(frames[link.k0:link.k1]), session=link.session,
                                   base=base, loss=None if loss is None else float(loss), rnorm=rnorm,
                                   skipped=self.skipped, seed=seed))
        self._inflight = (seqs, frames, seed, update)
        if self.overlap:
            return previous or StepResult("pending", self.version)
        return self._collect()

    def _collect(self) -> Optional[StepResult]:
        """Take the answers to the step in flight: commit the residual of each server's keys it applied, add
        its delta. None when no step is in flight."""
        if self._inflight is None:
            return None
        seqs, frames_up, seed, update = self._inflight
        self._inflight = None
        parts = []
        for link, seq in zip(self.links, seqs):
            try:
                header, frames = self._receive(link, "step", seq)
            except (ServerLost, ServerError) as e:
                if isinstance(e, ServerError) and e.code != "unknown_worker":
                    raise
                self.lost += 1
                self._rejoin(link, e)
                parts.append({"status": "lost", "tau": 0, "scale": 0.0, "server": link.index, "ck": None,
                              "epoch": None})
                continue
            status = header["status"]
            if status == "applied":
                for k in range(link.k0, link.k1):     # the residual becomes what this push left behind
                    self._left[k] = self.ef.swap(k, self._left[k])
                if link.checkpointing:
                    self._unsaved(link, header, frames_up, seed)
            parts.append({"status": status, "tau": header["tau"], "scale": header["scale"], "server": link.index,
                          "ck": header.get("ck"), "epoch": link.epoch})
            self._apply_pull(link, header, frames)
        statuses = {p["status"] for p in parts}
        status = statuses.pop() if len(statuses) == 1 else "partial"
        if status == "applied":
            self.accepted += 1
        elif status == "rejected":
            self.rejected += 1
        elif status == "skipped":
            self.skipped += 1
        if self.record:
            full_sent = [torch.zeros_like(p) for p in self.params]
            for k, frame in enumerate(frames_up):
                view = self._key_view(k, full_sent)
                view.copy_(self.up.decode(frame, view.shape, view.dtype, key_seed(seed, k), view.device))
            self.records.append({"kind": "push", "status": status, "scale": parts[0]["scale"],
                                 "tau": parts[0]["tau"], "parts": parts, "update": update, "sent": full_sent})
        return StepResult(status, self.version, parts[0]["tau"], parts[0]["scale"], parts)

    def _unsaved(self, link: _Link, header: dict, frames, seed: int) -> None:
        """Keep the sums of applied pushes (decoded from their `frames`) per checkpoint number until the server says
        that checkpoint is on disk."""
        number, durable = header.get("ck"), header.get("durable")
        if not isinstance(number, int) or not isinstance(durable, int):
            return
        for n in [n for n in link.unsaved if n <= durable]:
            del link.unsaved[n]
        sums = link.unsaved.setdefault(number, {})
        for k in range(link.k0, link.k1):
            if k not in sums:
                sums[k] = torch.zeros_like(self._left[k])
            self.up.decode_add(frames[k], sums[k], 1.0, key_seed(seed, k))

    def status(self) -> dict:
        """The servers' counters (see `ParameterServer.status`): one server's as they are; several servers' summed
        (versions, pushes, bytes) or their minimum (live and done workers), with each in ``servers``."""
        sts = [self._request(link, "status")[0] for link in self.links]
        if len(sts) == 1:
            return sts[0]
        out = dict(sts[0])
        for k in ("version", "applied", "rejected", "skipped", "dropped", "errors", "bytes_up", "bytes_down"):
            out[k] = sum(s.get(k, 0) for s in sts)
        for k in ("live", "done"):
            out[k] = min(s.get(k, 0) for s in sts)
        out["servers"] = sts
        return out

    def finish(self, wait: bool = True, timeout: float = 600.0, num_workers: Optional[int] = None) -> None:
        """Tell the servers this worker is done; with `wait`, wait until ``num_workers`` workers (default: the
        launcher's ``DSQ_PS_NUM_WORKERS``, else the servers' ``num_workers``) are done, then pull the exact
        (dense) final model into the parameters."""
        self._collect()
        for link in self.links:
            self._request(link, "done", session=link.session)
        if not wait:
            return
        want = num_workers or int(os.environ.get(ENV_NUM_WORKERS, 0)) or None
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            need = want or st.get("num_workers") or 1
            if st["done"] >= need:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {st['done']} of {need} workers finished within {timeout:.0f} s")
            time.sleep(0.2)
        self._pull_all(full=True)

    def residual_norm(self) -> float:
        return self.ef.norm()

    def residuals(self) -> List[torch.Tensor]:
        """The uplink residual ``e`` per parameter (its keys' residuals put together; zeros where none yet)."""
        out = [torch.zeros_like(p) for p in self.params]
        for k in range(len(self.keys)):
            e = self.ef.get(k)
            if e is not None:
                self._key_view(k, out).copy_(e)
        return out

    def close(self) -> None:
        """Say goodbye (the servers forget this worker at once), stop the heartbeats and close the sockets."""
        for link in self.links:
            if link.sock is not None and link.session is not None:
                try:
                    self._request(link, "bye", session=link.session, timeout=2.0)
                except (ServerLost, ServerError):
                    pass
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join()
        for link in self.links:
            if link.sock is not None:
                link.sock.close(0)
                link.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _to_host(frames: List[torch.Tensor]) -> list:
    """Frames (uint8 tensors) as host arrays for the wire: CPU tensors as they are; device tensors joined and
    copied to the host at once (one transfer and one synchronisation per message, not one per key)."""
    if all(f.device.type == "cpu" for f in frames):
        return [f.numpy() for f in frames]
    joined = torch.cat([f.to(frames[0].device) for f in frames]).cpu().numpy()
    out, start = [], 0
    for f in frames:
        out.append(joined[start:start + f.numel()])
        start += f.numel()
    return out


def _to_device(frames: List[torch.Tensor], devices) -> List[torch.Tensor]:
    """Host frames moved to the devices of their keys: joined into one transfer where every key is on one device
    that is not the CPU."""
    if not frames or all(d.type == "cpu" for d in devices) or len(set(devices)) > 1:
        return [f.to(d) for f, d in zip(frames, devices)]
    joined = torch.cat(frames).to(devices[0])
    return list(torch.split(joined, [f.numel() for f in frames]))
