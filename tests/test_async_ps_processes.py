"""The asynchronous parameter server with real processes and real sockets on loopback: malformed traffic, a
worker killed with SIGKILL and restarted, server checkpoint / kill / resume with the worker reconnecting, the
launcher (restarts, failure, Ctrl-C) and the example's accuracy under a kill plus malformed traffic."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
import torch
import zmq
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import async_ps
import dsq_plugins as dsq
from dsq_plugins.engine.codec import BlockCodec
from async_ps import checkpoint
from async_ps.protocol import encode, layout_of, layout_to_json

from .conftest import ROOT
from .test_async_ps_inproc import assert_server_conservation, fake_step, model, pushes, worker

PROC = ROOT / "tests" / "async_ps_proc.py"
EXAMPLE = ROOT / "examples" / "async_digits.py"
LAUNCHER = [sys.executable, "-m", "async_ps.launcher"]


class Proc:
    """A child process in its own process group whose output lines are collected by reader threads."""

    def __init__(self, cmd, env=None):
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
        self.p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=full_env, start_new_session=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        self._readers = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.p.stdout, self.out), (self.p.stderr, self.err))]
        for r in self._readers:
            r.start()

    @staticmethod
    def _read(stream, buf):
        for line in stream:
            buf.append(line.rstrip("\n"))

    def wait_line(self, pattern, timeout=60.0, stream="err"):
        buf = self.err if stream == "err" else self.out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(buf):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.p.poll() is not None and not any(r.is_alive() for r in self._readers):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; {self.text()}")

    def wait(self, timeout):
        rc = self.p.wait(timeout=timeout)
        for r in self._readers:
            r.join(5)
        return rc

    def kill(self, sig=signal.SIGKILL):
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def text(self):
        return "\n--- stdout\n" + "\n".join(self.out[-30:]) + "\n--- stderr\n" + "\n".join(self.err[-60:])


@contextmanager
def cleanup():
    procs = []
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(sock, frames, timeout=5.0):
    sock.send_multipart(frames)
    assert sock.poll(int(timeout * 1000)), "no reply"
    reply = sock.recv_multipart()
    return json.loads(reply[0]), reply[1:]


def malformed_traffic(address: str, token: str, net: torch.nn.Module, huge_bytes: int) -> dict:
    """Hit the server with garbage of every kind; return the error code of each reply that came back."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2) as raw:        # not even ZeroMQ
        raw.sendall(os.urandom(4096))
    ctx = zmq.Context.instance()
    codes = {}
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        codes["random"] = request(sock, [os.urandom(100), os.urandom(50)])[0]["code"]
        codes["not_object"] = request(sock, [b"[1, 2, 3]"])[0]["code"]
        codes["bad_token"] = request(sock, encode("status", "not-the-token", "intruder", 1))[0]["code"]
        no_token = json.dumps({"p": 1, "type": "status", "w": "x", "s": 1}).encode()
        codes["no_token"] = request(sock, [no_token])[0]["code"]
        codes["version"] = request(sock, [json.dumps({"p": 99, "t": token, "type": "status", "w": "x",
                                                      "s": 1}).encode()])[0]["code"]
        codes["bad_type"] = request(sock, encode("rm -rf", token, "intruder", 1))[0]["code"]
        codes["bad_seq"] = request(sock, encode("status", token, "intruder", "one"))[0]["code"]
        codes["too_many_frames"] = request(sock, encode("status", token, "intruder", 1, [b""] * 5000))[0]["code"]
        codes["no_session"] = request(sock, encode("push", token, "intruder", 1, [b"x"], session="nope",
                                                   base=0))[0]["code"]
        # An authenticated client that joins properly, then sends broken pushes.
        lay = layout_of(net.named_parameters())
        dense = [p.detach().numpy().tobytes() for p in net.parameters()]
        welcome, _ = request(sock, encode("hello", token, "intruder", 2, layout=layout_to_json(lay)))
        assert welcome["type"] == "welcome", welcome
        session = welcome["session"]
        assert request(sock, encode("init", token, "intruder", 2, dense, session=session))[0]["type"] == "status"
        frames = [b"\x00" * 3 for _ in lay]                                     # truncated payloads
        codes["truncated"] = request(sock, encode("push", token, "intruder", 3, frames, session=session,
                                                  base=0))[0]["code"]
        codes["missing_frames"] = request(sock, encode("push", token, "intruder", 4, frames[:1], session=session,
                                                       base=0))[0]["code"]
        big = [b"\x01" * (4 << 20)] + frames[1:]                                 # a 4 MiB frame, within the limit
        codes["big_frame"] = request(sock, encode("push", token, "intruder", 5, big, session=session,
                                                  base=0))[0]["code"]
        codes["future_base"] = request(sock, encode("push", token, "intruder", 6, frames, session=session,
                                                    base=10 ** 9))[0]["code"]
        request(sock, encode("bye", token, "intruder", 7, session=session))
    finally:
        sock.close(0)
    huge = ctx.socket(zmq.DEALER)                                               # over the limit: ZeroMQ drops it
    huge.setsockopt(zmq.LINGER, 0)
    huge.connect(address)
    huge.send_multipart(encode("status", token, "intruder", 1, [b"\x00" * huge_bytes]))
    codes["huge_frame_reply"] = huge.poll(1000)
    huge.close(0)
    return codes


EXPECTED_CODES = {"random": "malformed", "not_object": "malformed", "bad_token": "auth", "no_token": "auth",
                  "version": "version", "bad_type": "bad_type", "bad_seq": "bad_field",
                  "too_many_frames": "too_many_frames", "no_session": "unknown_worker", "truncated": "bad_payload",
                  "missing_frames": "bad_payload", "big_frame": "bad_payload", "future_base": "bad_field",
                  "huge_frame_reply": 0}


def test_malformed_traffic_leaves_the_server_serving():
    limits = async_ps.Limits(max_frame_bytes=8 << 20)
    with async_ps.ParameterServer(bind="tcp://127.0.0.1:0", limits=limits, max_staleness=10_000) as srv:
        good = worker(srv, "good")
        stop = threading.Event()

        def train():
            g = torch.Generator().manual_seed(0)
            while not stop.is_set():
                fake_step(good, g)
        t = threading.Thread(target=train)
        t.start()
        try:
            codes = malformed_traffic(srv.address, srv.token, model(), huge_bytes=16 << 20)
            before = good.accepted
            time.sleep(0.5)
        finally:
            stop.set()
            t.join(30)
        assert codes == EXPECTED_CODES
        assert good.accepted > before, "the good worker stopped making progress"
        snap = srv.snapshot()
        errors = snap["errors"]
        for code in ("malformed", "auth", "bad_payload", "bad_field"):
            assert errors[code] >= 2, (code, errors)
        assert errors["too_many_frames"] == errors["version"] == errors["bad_type"] == 1
        assert snap["counters"]["applied"] == good.accepted and snap["counters"].get("rejected", 0) == 0
        per_push = sum(srv.up.nbytes(p.numel(), p.dtype) for p in good.params)
        assert snap["counters"]["bytes_up"] == good.accepted * per_push, "broken pushes counted as bytes up"
        assert_server_conservation(snap, [good])
        good.close()


def test_sigkilled_worker_is_dropped_others_go_on_and_a_restart_rejoins_with_a_full_pull():
    # workers heartbeat every second: 3 s of silence is two missed beats, not one late beat on a loaded machine
    with async_ps.ParameterServer(bind="tcp://127.0.0.1:0", heartbeat_timeout=3.0, max_staleness=10_000) as srv, \
            cleanup() as procs:
        env = {"DSQ_PS_ADDR": srv.address, "DSQ_PS_TOKEN": srv.token}
        for wid in ("0", "1"):
            procs.append(Proc([sys.executable, PROC, "--steps", "100000", "--sleep", "0.01"],
                              dict(env, DSQ_PS_WORKER=wid)))
        assert srv.wait_for(lambda s: all(w in s.slots and s.slots[w].accepted >= 5 for w in "01"), 60), \
            procs[0].text()
        procs[1].kill(signal.SIGKILL)
        procs[1].wait(10)
        t_kill = time.monotonic()
        assert srv.wait_for(lambda s: "1" not in s.slots, 15), "the killed worker was not detected"
        detected_after = time.monotonic() - t_kill
        assert 2.0 <= detected_after < 8.0, detected_after
        snap = srv.snapshot()
        assert snap["counters"]["dropped"] == 1 and "1" not in snap["workers"]
        survivor = snap["workers"]["0"]["accepted"]
        assert srv.wait_for(lambda s: s.slots["0"].accepted >= survivor + 10, 20), "the survivor stopped"
        full_before = snap["counters"]["full_pulls"]
        procs.append(Proc([sys.executable, PROC, "--steps", "100000", "--sleep", "0.01"],
                          dict(env, DSQ_PS_WORKER="1")))
        assert srv.wait_for(lambda s: "1" in s.slots and s.slots["1"].accepted >= 3, 60), procs[-1].text()
        snap = srv.snapshot()
        assert snap["counters"]["full_pulls"] == full_before + 1
        assert snap["workers"]["1"]["pulls"] >= 3 and snap["counters"]["dropped"] == 1


def test_checkpoint_kill_resume_and_the_worker_reconnects(tmp_path):
    port = free_port()
    ckpt = tmp_path / "ckpt"
    cmd = [*LAUNCHER, "--role", "server", "--bind", f"tcp://127.0.0.1:{port}", "--checkpoint-dir", ckpt,
           "--checkpoint-every-pushes", "5", "--checkpoint-every-s", "3600", "--max-staleness", "100",
           "--no-progress"]
    token = "t" * 32
    with cleanup() as procs:
        procs.append(Proc(cmd, {"DSQ_PS_TOKEN": token}))
        address = procs[0].wait_line(r"^(tcp://\S+)$", 60, stream="out").group(1)
        m = model()
        w = async_ps.Worker(m, torch.optim.SGD(m.parameters(), lr=0.05), address, token, worker_id="w",
                            record=True, heartbeat_interval=0.2, server_timeout=2.0, reconnect_timeout=60)
        g = torch.Generator().manual_seed(0)
        for _ in range(12):
            assert fake_step(w, g).status == "applied"
        deadline = time.monotonic() + 20          # checkpoints are written by a thread of their own
        while (checkpoint.load(ckpt) or {"version": -1})["version"] < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        procs[0].kill(signal.SIGKILL)
        procs[0].wait(10)
        state = checkpoint.load(ckpt)
        assert state["version"] == 10 and state["counters"]["applied"] == 10
        # The checkpoint holds x0 minus exactly the first 10 applied pushes, and the worker's downlink copy.
        first10 = {"x": state["x"], "x0": state["x0"]}
        w_records = w.records
        w.records = [r for r in w_records if r["kind"] != "push"] + pushes(w)[:10]
        assert_server_conservation(first10, [w])
        w.records = w_records
        assert len(state["workers"]["w"]["x_hat"]) == len(state["x"])

        procs.append(Proc([*cmd, "--resume"], {"DSQ_PS_TOKEN": token}))
        procs[1].wait_line(r"^tcp://", 60, stream="out")
        r = fake_step(w, g)                      # the server is gone mid-step: the worker rejoins and re-pulls
        assert r.status == "lost" and w.rejoins == 1 and w.version == 10
        assert all(torch.equal(p.detach().reshape(-1), x) for p, x in zip(w.params, state["x"]))   # one key each
        for _ in range(3):
            assert fake_step(w, g).status == "applied"
        assert w.version == 13
        procs[1].kill(signal.SIGTERM)                    # a clean stop writes a final checkpoint
        assert procs[1].wait(20) == 130, procs[1].text()
        final = checkpoint.load(ckpt)
        assert final["version"] == 13 and final["counters"]["resumed"] == 1 and final["counters"]["applied"] == 13
        held = [p.detach().clone() for p in w.params]
        assert all(torch.equal(a.reshape(-1), b) for a, b in zip(held, final["workers"]["w"]["x_hat"]))

        # Resumed again: the worker still holds exactly its checkpointed x_hat, so it keeps it (a delta pull,
        # no full model) and goes on.
        procs.append(Proc([*cmd, "--resume"], {"DSQ_PS_TOKEN": token}))
        procs[2].wait_line(r"^tcp://", 60, stream="out")
        n_records = len(w.records)
        assert fake_step(w, g).status == "lost" and w.rejoins == 2
        assert [(r["kind"], r.get("status")) for r in w.records[n_records:]] == [("delta", None), ("push", "lost")]
        sign = BlockCodec(dsq.get_compressor("sign"))
        for p, h, x, x_hat, got in zip(w.params, held, final["x"], final["workers"]["w"]["x_hat"],
                                       w.records[n_records]["values"]):
            assert torch.equal(got.reshape(-1), sign.encode(x - x_hat)[1])       # C_s of the kept residual
            assert torch.equal(p.detach(), h + got)
        assert fake_step(w, g).status == "applied" and w.version == 14
        w.close()


def test_launcher_refuses_bad_arguments(capsys):
    from async_ps.launcher import parse_args

    for argv, message in ((["--compressor", "nope", "--", "x"], "valid names: bf16"),
                          (["--max-staleness", "0", "--", "x"], "--max-staleness must be >= 1"),
                          (["--num-workers", "2"], "give the training command"),
                          (["--role", "worker", "--", "x"], "--server tcp://HOST:PORT")):
        with pytest.raises(SystemExit) as e:
            parse_args(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_launcher_restarts_then_fails_with_nonzero_exit():
    with cleanup() as procs:
        procs.append(Proc([*LAUNCHER, "--num-workers", "2", "--max-restarts", "1", "--no-progress", "--",
                           sys.executable, "-c", "import os, sys; sys.exit(3 if os.environ['DSQ_PS_WORKER'] == '1' "
                                                 "else 0)"]))
        assert procs[0].wait(60) == 1, procs[0].text()
        text = procs[0].text()
        assert "worker 1 died (exit code 3); restart 1/1" in text
        assert "worker 1 failed (exit code 3) and has no restarts left" in text and "FAILED" in text


def test_launcher_ctrl_c_stops_everything():
    with cleanup() as procs:
        procs.append(Proc([*LAUNCHER, "--num-workers", "2", "--no-progress", "--",
                           sys.executable, "-c", "import time; time.sleep(600)"]))
        pids = [int(procs[0].wait_line(rf"worker {i} started \(pid (\d+)\)", 60).group(1)) for i in range(2)]
        procs[0].p.send_signal(signal.SIGINT)
        assert procs[0].wait(30) == 130, procs[0].text()
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_launcher_server_and_worker_roles_on_two_launchers():
    port = free_port()
    env = {"DSQ_PS_TOKEN": "r" * 32}
    with cleanup() as procs:
        procs.append(Proc([*LAUNCHER, "--role", "server", "--bind", f"tcp://127.0.0.1:{port}", "--num-workers", "2",
                           "--no-progress"], env))
        assert procs[0].wait_line(r"^(tcp://\S+)$", 60, stream="out").group(1) == f"tcp://127.0.0.1:{port}"
        procs.append(Proc([*LAUNCHER, "--role", "worker", "--server", f"tcp://127.0.0.1:{port}", "--num-workers",
                           "2", "--worker-prefix", "hostB-", "--no-progress", "--", sys.executable, PROC,
                           "--steps", "20", "--finish"], env))
        assert procs[1].wait(120) == 0, procs[1].text()
        assert procs[0].wait(60) == 0, procs[0].text()
        reports = sorted((json.loads(line) for line in procs[1].out if line.startswith("{")),
                         key=lambda r: r["worker"])
        assert [r["worker"] for r in reports] == ["hostB-0", "hostB-1"]
        assert all(r["accepted"] + r["rejected"] == 20 for r in reports)
        applied = sum(r["accepted"] for r in reports)
        assert f"version {applied}, {applied} pushes applied" in procs[0].text()
        assert all(r["version"] == applied for r in reports), "finish() must leave the final model"


def test_launcher_example_survives_a_kill_and_malformed_traffic(tmp_path):
    """The acceptance run: 3 workers on the digits example, worker 1 SIGKILLed once (and restarted), malformed
    traffic at the server; the job succeeds with accuracy >= 0.85 and TensorBoard has the server's metrics."""
    token = "s" * 32
    logdir = tmp_path / "tb"
    with cleanup() as procs:
        procs.append(Proc([*LAUNCHER, "--num-workers", "3", "--compressor", "sign", "--max-staleness", "8",
                           "--max-restarts", "1", "--heartbeat-timeout", "3", "--logdir", logdir,
                           "--max-frame-mb", "8", "--no-progress", "--",
                           sys.executable, EXAMPLE, "--epochs", "20"], {"DSQ_PS_TOKEN": token}))
        launcher = procs[0]
        address = launcher.wait_line(r"^(tcp://\S+)$", 60, stream="out").group(1)
        pid = int(launcher.wait_line(r"worker 1 started \(pid (\d+)\)", 60).group(1))
        ctx = zmq.Context.instance()
        probe = ctx.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        probe.connect(address)
        deadline = time.monotonic() + 60
        while request(probe, encode("status", token, "probe", 1))[0]["workers"].get("1", {}).get("accepted", 0) < 30:
            assert time.monotonic() < deadline, launcher.text()
            time.sleep(0.2)
        probe.close(0)
        os.kill(pid, signal.SIGKILL)
        from examples.digits_common import mlp
        codes = malformed_traffic(address, token, mlp(0), huge_bytes=16 << 20)
        assert codes == EXPECTED_CODES
        assert launcher.wait(240) == 0, launcher.text()
        assert launcher.out[-1].startswith("final_accuracy=")
        acc = float(launcher.out[-1].split("=")[1])
        assert acc >= 0.85, launcher.text()
        text = launcher.text()
        assert "worker 1 died (signal SIGKILL); restart 1/1" in text
        assert re.search(r"[1-9]\d* rejoined|[1-9]\d* workers dropped", text), text
        done = re.search(r"done: version (\d+), (\d+) pushes applied, (\d+) rejected as stale, (\d+) skipped", text)
        version, applied, stale, skipped = map(int, done.groups())
        assert version == applied
        # Every push the workers made is accounted for (a stale one is rejected by design, not lost): the three
        # full runs (20 epochs of 15 steps) plus the killed worker's 30 or more before the kill.
        assert applied + stale + skipped >= 3 * 300 + 30, "the killed worker's pushes before the kill were not kept"
        assert applied >= 0.9 * (3 * 300 + 30), text
    events = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("ps/applied", "ps/rejected", "ps/skipped", "ps/bytes_up", "ps/bytes_down", "ps/protocol_errors",
                "ps/pushes_per_s/0", "ps/downlink_residual_norm/0", "ps/worker_residual_norm/0", "ps/loss/0"):
        assert tag in scalars, (tag, sorted(scalars))
    assert "ps/staleness" in events.Tags()["histograms"]
    assert events.Scalars("ps/protocol_errors")[-1].value >= 10


def test_two_servers_four_workers_a_server_sigkilled_and_resumed_loses_no_update(tmp_path):
    """`dsq-async-ps --num-servers 2`: 4 digits workers (the example) against 2 server processes, each owning half
    the keys. Server 1 is SIGKILLed mid-training; the launcher restarts it from its checkpoint while the workers
    keep pushing to server 0. Then, per server and key: x = x0 - sum of the surviving applied pushes (scale * c);
    per worker and key: surviving c + e = every applied u (what server 1 lost went back into the residuals); worker
    0 ends holding both servers' exact model, which reaches 0.9 test accuracy."""
    token, ckpt, rec = "k" * 32, tmp_path / "ckpt", tmp_path / "rec"
    rec.mkdir()
    with cleanup() as procs:
        procs.append(Proc([*LAUNCHER, "--num-servers", "2", "--num-workers", "4", "--checkpoint-dir", ckpt,
                           "--checkpoint-every-pushes", "25", "--max-restarts", "1", "--heartbeat-timeout", "5",
                           "--no-progress", "--", sys.executable, EXAMPLE, "--epochs", "20", "--record-dir", rec],
                          {"DSQ_PS_TOKEN": token}))
        launcher = procs[0]
        m = launcher.wait_line(r"server 1 of 2 started \(pid (\d+)\) at (tcp://\S+)", 60)
        pid, address = int(m.group(1)), m.group(2)
        probe = zmq.Context.instance().socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        probe.connect(address)
        deadline = time.monotonic() + 90
        while request(probe, encode("status", token, "probe", 1))[0]["applied"] < 200:
            assert time.monotonic() < deadline, launcher.text()
            time.sleep(0.1)
        probe.close(0)
        os.kill(pid, signal.SIGKILL)
        assert launcher.wait(240) == 0, launcher.text()
        text = "\n".join(launcher.err)
        assert "server 1 died (signal SIGKILL); restart 1/1 from its checkpoint" in text, text
        acc = float(launcher.out[-1].split("=")[1])
        assert acc >= 0.9, text
    finals = [checkpoint.load(ckpt / f"server-{s}") for s in range(2)]
    assert finals[1]["resumed_from"] is not None and finals[0]["resumed_from"] is None
    dumps = [torch.load(rec / f"worker-{i}.pt", weights_only=False) for i in range(4)]
    keys = dumps[0]["keys"]
    for s, final in enumerate(finals):
        k0, k1 = final["key_range"]
        assert [tuple(k) for k in final["keys"]] == [tuple(k) for k in keys[k0:k1]]

        def survived(key):
            server, epoch, ck, status = key
            return (server == s and status == "applied"
                    and (epoch == final["epoch"]
                         or (final["resumed_from"] is not None and ck <= final["resumed_from"])))
        for (i, a, b), x, x0 in zip(keys[k0:k1], final["x"], final["x0"]):
            kept = sum((v["scaled"][i].reshape(-1)[a:b] for d in dumps for key, v in d["sums"].items()
                        if survived(key)), torch.zeros(b - a, dtype=torch.float64))
            torch.testing.assert_close(x.double(), x0.double() - kept, rtol=0, atol=1e-5)
            for d in dumps:
                sent = sum((v["sent"][i].reshape(-1)[a:b] for key, v in d["sums"].items() if survived(key)),
                           torch.zeros(b - a))
                raw = sum((v["update"][i].reshape(-1)[a:b] for key, v in d["sums"].items()
                           if key[0] == s and key[3] == "applied"), torch.zeros(b - a))
                torch.testing.assert_close(sent + d["residuals"][i].reshape(-1)[a:b], raw, rtol=0, atol=1e-5)
            # Worker 0 waits for all, then pulls the exact model (the others leave holding their x_hat).
            assert torch.equal(dumps[0]["params"][i].reshape(-1)[a:b], x), "worker 0 does not end with the model"
    # Server 0 went on while server 1 was down: steps whose server-1 part was lost were applied by server 0.
    lost = [key for d in dumps for key in d["sums"] if key[0] == 1 and key[3] == "lost"]
    assert lost, "no worker saw server 1 go"
    print(f"recovered after the restart: {sum(d['recovered'] for d in dumps)} workers; accuracy {acc}")
