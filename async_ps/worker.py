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
``c = C_w(u + e)`` with ``e <- u + e - c`` (error feedback on the worker). The residual ``e`` is committed only when
the server applied the push: a push rejected as stale, skipped, or lost in a server restart leaves ``e`` as it was,
so that over the accepted pushes ``sum(c) + e = sum(u)`` holds exactly. An update holding NaN or Inf is not
pushed at all (counted in `skipped`). Then it pulls: the server's compressed delta ``C_s(x - x_hat_j)`` is added to
the parameters, which therefore always equal the server's ``x_hat_j``.

A heartbeat thread (its own socket) tells the server the worker is alive and notices when the server stops
answering or forgets the session (a restart); the next request then reconnects, says hello again and pulls the
full model.
"""
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Optional

import torch
import zmq

from dsq_plugins.codec import BlockCodec
from dsq_plugins.memory import ErrorFeedback
from dsq_plugins.registry import get_compressor

from .protocol import REPLY_TYPES, Limits, ProtocolError, decode, encode, layout_of, layout_to_json, pack, unpack

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
    """What became of one `Worker.step`: ``status`` is ``applied``, ``rejected`` (too stale), ``skipped``
    (non-finite update, not pushed or not applied) or ``lost`` (server gone; the worker rejoined); ``tau`` is the
    staleness in versions and ``scale`` the step factor the server used; ``version`` the model version now held."""

    status: str
    version: int
    tau: int = 0
    scale: float = 0.0


class Worker:
    """One worker of the parameter server.

    Args:
        model: the module whose parameters (``named_parameters()`` order) the server holds. Buffers are local.
        optimizer: computes each update from the gradients (its ``step()`` is called by `step`).
        address: the server endpoint (``tcp://HOST:PORT`` or ``inproc://NAME``); token: the shared token.
        worker_id: this worker's name (stable across restarts: a restarted worker replaces its old session).
        heartbeat_interval: seconds between heartbeats; the server counts as lost after ``server_timeout``
            seconds without a heartbeat answer.
        request_timeout: seconds to wait for any one answer (a pull may legitimately wait at the staleness bound).
        reconnect_timeout: seconds to keep trying to rejoin a lost server before giving up (`ServerLost`).
        record: keep every pushed and pulled tensor in `records` (tests check the conservation laws with it).
        context: the ZeroMQ context (``inproc://`` needs the server's).
    """

    def __init__(self, model: torch.nn.Module, optimizer, address: str, token: str, worker_id: Optional[str] = None,
                 heartbeat_interval: float = 1.0, server_timeout: float = 10.0, request_timeout: float = 300.0,
                 reconnect_timeout: float = 120.0, record: bool = False, context: Optional[zmq.Context] = None,
                 connect: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.address = address
        self.token = token
        self.worker_id = worker_id or f"w{os.getpid()}-{secrets.token_hex(2)}"
        self.heartbeat_interval = heartbeat_interval
        self.server_timeout = server_timeout
        self.request_timeout = request_timeout
        self.reconnect_timeout = reconnect_timeout
        self.context = context or zmq.Context.instance()
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters()])
        self.layout = layout_of(zip(self.names, self.params))
        self.ef = ErrorFeedback()
        self.record = record
        self.records = []
        self.version = -1
        self.session: Optional[str] = None
        self._pulls = 0                                  # pulls applied in this session
        self.epoch: Optional[str] = None
        self.up = self.down = None
        self.accepted = self.rejected = self.skipped = self.lost = self.rejoins = 0
        self.bytes_up = self.bytes_down = 0
        self._sock = None
        self._seq = 0
        self._limits = Limits()
        self._hb_state = {"last_answer": time.monotonic(), "forgotten": False}
        self._hb_stop = threading.Event()
        self._hb_thread: Optional[threading.Thread] = None
        if connect:
            self.connect()

    @classmethod
    def from_env(cls, model: torch.nn.Module, optimizer, **kwargs) -> "Worker":
        """A worker configured by the launcher's environment: ``DSQ_PS_ADDR``, ``DSQ_PS_TOKEN``, ``DSQ_PS_WORKER``."""
        missing = [k for k in (ENV_ADDR, ENV_TOKEN) if not os.environ.get(k)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not set: run this script under `dsq-async-ps ... -- python "
                               f"SCRIPT` (or set {ENV_ADDR}=tcp://HOST:PORT and {ENV_TOKEN})")
        return cls(model, optimizer, os.environ[ENV_ADDR], os.environ[ENV_TOKEN],
                   worker_id=os.environ.get(ENV_WORKER), **kwargs)

    # ------------------------------------------------------------------ connection
    def connect(self) -> None:
        """Say hello (the server adopts this model if it has none yet), then pull the full model. Retries until
        the server answers or ``reconnect_timeout`` passes."""
        deadline = time.monotonic() + self.reconnect_timeout
        dense = BlockCodec(get_compressor("none"))
        while True:
            self._reset_socket()
            frames, _ = pack(dense, [p.detach() for p in self.params])
            try:
                held = {"session": self.session, "pulls": self._pulls} if self.session else None
                reply, _ = self._request("hello", frames, timeout=min(2.0, self.reconnect_timeout),
                                         layout=layout_to_json(self.layout), held=held)
                break
            except ServerError:
                self._sock.close(0)             # refused (wrong model, token...): nothing to retry
                self._sock = None
                raise
            except ServerLost:
                if time.monotonic() > deadline:
                    raise ServerLost(f"no parameter server answered at {self.address} within "
                                     f"{self.reconnect_timeout:.0f} s") from None
        self.session, self.epoch, self._pulls = reply["session"], reply["epoch"], 0
        block = int(reply.get("block", 4096))
        self.up = BlockCodec(get_compressor(reply["up"]), block)
        self.down = BlockCodec(get_compressor(reply["down"]), block)
        self.dense = BlockCodec(get_compressor("none"), block)
        self.mode = reply["mode"]
        self._hb_state.update(last_answer=time.monotonic(), forgotten=False)
        self._start_heartbeats()
        self.pull()

    def _reset_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
        self._sock = self.context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)

    def _request(self, kind: str, frames=(), timeout: Optional[float] = None, **fields):
        """Send one request and wait for its answer: ``(header, frames)``. Raises `ServerError` for an error
        answer and `ServerLost` when none comes in time or the heartbeats say the server is gone."""
        self._seq += 1
        msg = encode(kind, self.token, self.worker_id, self._seq, frames, **fields)
        self._sock.send_multipart(msg, copy=False)
        self.bytes_up += sum(len(f) for f in frames)
        deadline = time.monotonic() + (timeout or self.request_timeout)
        while True:
            if self._sock.poll(50):
                header, payload = self._decode_reply(self._sock.recv_multipart())
                if header["s"] != self._seq:
                    continue                     # the answer to an earlier request that timed out
                self.bytes_down += sum(len(f) for f in payload)
                if header["type"] == "error":
                    raise ServerError(str(header.get("code")), str(header.get("message")))
                return header, payload
            if time.monotonic() > deadline:
                raise ServerLost(f"no answer to {kind!r} from {self.address} in {timeout or self.request_timeout} s")
            if kind != "hello" and self._server_gone():
                raise ServerLost(f"the parameter server at {self.address} stopped answering or restarted")

    def _decode_reply(self, frames):
        # Replies carry no token: an error reply may go to a peer that never proved it has one.
        header, payload = decode(frames, None, self._limits, types=REPLY_TYPES)
        return header, payload

    def _server_gone(self) -> bool:
        st = self._hb_state
        return st["forgotten"] or time.monotonic() - st["last_answer"] > self.server_timeout

    def _start_heartbeats(self) -> None:
        if self._hb_thread is not None and self._hb_thread.is_alive():
            return
        self._hb_stop.clear()
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name=f"hb-{self.worker_id}", daemon=True)
        self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        sock = None
        try:
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 4)
            sock.connect(self.address)
            while not self._hb_stop.is_set():
                try:
                    sock.send_multipart(encode("heartbeat", self.token, self.worker_id, 0, session=self.session,
                                               skipped=self.skipped), zmq.NOBLOCK)
                except zmq.Again:
                    pass
                end = time.monotonic() + self.heartbeat_interval
                while not self._hb_stop.is_set() and time.monotonic() < end:
                    if sock.poll(50):
                        header, _ = self._decode_reply(sock.recv_multipart())
                        if header.get("type") == "hb":
                            self._hb_state["last_answer"] = time.monotonic()
                            if not header.get("known") or header.get("epoch") != self.epoch:
                                self._hb_state["forgotten"] = True
        except zmq.ContextTerminated:
            pass
        finally:
            if sock is not None:
                sock.close(0)

    def _rejoin(self, why: Exception) -> None:
        log.warning("worker %s: %s; rejoining", self.worker_id, why)
        self.rejoins += 1
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join()
        self.connect()

    # ------------------------------------------------------------------ training
    def pull(self, full: bool = False) -> int:
        """Bring the parameters up to the server's model (full: dense; else the compressed delta). May wait at the
        staleness bound. Returns the version now held."""
        header, frames = self._request("pull", session=self.session, full=full)
        codec = self.dense_or_down(header["kind"])
        seed = header.get("seed", 0) if isinstance(header.get("seed", 0), int) else 0
        values = unpack(codec, frames, self.layout, seed, device=self.params[0].device)
        with torch.no_grad():
            for p, v in zip(self.params, values):
                if header["kind"] == "full":
                    p.copy_(v)
                else:
                    p.add_(v)
        if self.record:
            self.records.append({"kind": header["kind"], "values": [v.clone() for v in values]})
        self.version = header["version"]
        self._pulls += 1
        return self.version

    def dense_or_down(self, kind: str):
        if kind == "full":
            return self.dense
        if kind == "delta":
            return self.down
        raise ProtocolError("malformed", f"unknown model kind {kind!r}")

    def step(self, loss: Optional[float] = None) -> StepResult:
        """Take the optimizer's update from the current gradients, push it compressed with the residual, and
        pull. Call it where ``optimizer.step()`` would go."""
        try:
            return self._step(loss)
        except (ServerLost, ServerError) as e:
            if isinstance(e, ServerError) and e.code != "unknown_worker":
                raise
            self.lost += 1
            self._rejoin(e)
            return StepResult("lost", self.version)

    def _step(self, loss) -> StepResult:
        with torch.no_grad():
            before = [p.detach().clone() for p in self.params]
            self.optimizer.step()
            update = [b - p for b, p in zip(before, self.params)]
            for p, b in zip(self.params, before):
                p.copy_(b)
        # The sum is non-finite whenever an element is (or when finite values overflow it: skipped too, never
        # applied); a reduction costs a tenth of `isfinite(u).all()` on a large tensor.
        if not all(bool(torch.isfinite(u.sum())) for u in update):
            self.skipped += 1
            return StepResult("skipped", self.version)
        compensated = [self.ef.compensate(i, u) for i, u in enumerate(update)]
        seed = secrets.randbits(32) if self.up.compressor.uses_seed else 0
        frames, sent = pack(self.up, compensated, seed)        # compressed on the model's device
        header, _ = self._request("push", frames, session=self.session, base=self.version,
                                  loss=None if loss is None else float(loss), rnorm=self.ef.norm(),
                                  skipped=self.skipped, seed=seed)
        status = header["status"]
        if status == "applied":
            for i, (v, c) in enumerate(zip(compensated, sent)):
                self.ef.update(i, v, c)
            self.accepted += 1
        elif status == "rejected":
            self.rejected += 1
        else:
            self.skipped += 1
        if self.record:
            self.records.append({"kind": "push", "status": status, "scale": header["scale"], "tau": header["tau"],
                                 "update": update, "sent": [c.clone() for c in sent]})
        result = StepResult(status, self.version, header["tau"], header["scale"])
        self.pull()
        result.version = self.version
        return result

    def status(self) -> dict:
        """The server's counters (see `ParameterServer.status`)."""
        return self._request("status")[0]

    def finish(self, wait: bool = True, timeout: float = 600.0, num_workers: Optional[int] = None) -> None:
        """Tell the server this worker is done; with `wait`, wait until ``num_workers`` workers (default: the
        launcher's ``DSQ_PS_NUM_WORKERS``, else the server's ``num_workers``) are done, then pull the exact
        (dense) final model into the parameters."""
        self._request("done", session=self.session)
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
        self.pull(full=True)

    def residual_norm(self) -> float:
        return self.ef.norm()

    def close(self) -> None:
        """Say goodbye (the server forgets this worker at once), stop the heartbeats and close the sockets."""
        if self._sock is not None and self.session is not None:
            try:
                self._request("bye", session=self.session, timeout=2.0)
            except (ServerLost, ServerError):
                pass
        self._hb_stop.set()
        if self._hb_thread is not None:
            self._hb_thread.join()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
