"""The asynchronous parameter server with workers as threads (``inproc://`` and ``tcp://`` loopback): the
conservation laws of both residuals, the staleness bound (blocking and rejection), no lost updates under many
concurrent pushes, a straggler not slowing the others, the synchronous baseline, and bad input."""
import itertools
import json
import threading
import time

import pytest
import torch

import async_ps
from async_ps.protocol import ProtocolError

_names = itertools.count()


def model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def server(bind=None, **kw):
    kw.setdefault("heartbeat_timeout", 5.0)
    return async_ps.ParameterServer(bind=bind or f"inproc://ps-test-{next(_names)}", **kw).start()


def worker(srv, wid, seed=0, lr=0.05, **kw):
    m = model(seed)
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    return async_ps.Worker(m, opt, srv.address, srv.token, worker_id=wid, record=True, heartbeat_interval=0.2,
                           **kw)


def fake_step(w, gen, nan=False):
    """Give every parameter a gradient drawn from `gen` (plain torch, no loss needed) and step."""
    for p in w.params:
        p.grad = torch.randn(p.shape, generator=gen)
        if nan:
            p.grad.view(-1)[0] = float("nan")
    return w.step()


def pushes(w, status="applied", server=0):
    """`w`'s push records whose part at server `server` had `status`."""
    return [r for r in w.records if r["kind"] == "push"
            and next(p["status"] for p in r["parts"] if p["server"] == server) == status]


def assert_server_conservation(snap, workers, server=0):
    """Key by key: x = x0 - sum over every push this server applied of scale * c, recomputed in float64 from what
    the workers sent. `snap` is a snapshot or a checkpoint (per-key ``xk``/``x0k`` or ``x``/``x0`` with ``keys``),
    or per-tensor ``x``/``x0``."""
    xs, x0s = (snap["xk"], snap["x0k"]) if "xk" in snap else (snap["x"], snap["x0"])
    keys = snap.get("keys") or [(i, 0, x.numel()) for i, x in enumerate(xs)]
    assert len(keys) == len(xs)
    for (i, a, b), x, x0 in zip(keys, xs, x0s):
        applied = [(next(p["scale"] for p in r["parts"] if p["server"] == server), r["sent"][i].reshape(-1)[a:b])
                   for w in workers for r in pushes(w, server=server)]
        expected = x0.double().reshape(-1) - sum((scale * c.double() for scale, c in applied),
                                                  torch.zeros(b - a, dtype=torch.float64))
        torch.testing.assert_close(x.double().reshape(-1), expected, rtol=0, atol=1e-5)


def assert_worker_conservation(w):
    """Over the applied pushes: sum of compressed updates sent + the residual = sum of raw updates."""
    applied = pushes(w)
    for i, (p, e) in enumerate(zip(w.params, w.residuals())):
        sent = sum((r["sent"][i] for r in applied), torch.zeros_like(p))
        raw = sum((r["update"][i] for r in applied), torch.zeros_like(p))
        torch.testing.assert_close(sent + e, raw, rtol=0, atol=1e-6)


def assert_downlink(snap, w):
    """The worker holds exactly the server's x_hat_j, which is its full pull plus the compressed deltas."""
    held = snap["workers"][w.worker_id]["x_hat"]
    pulls = [r for r in w.records if r["kind"] in ("full", "delta")]
    last_full = max(k for k, r in enumerate(pulls) if r["kind"] == "full")
    for i, p in enumerate(w.params):
        assert torch.equal(p.detach(), held[i]), "worker copy differs from the server's x_hat_j"
        rebuilt = pulls[last_full]["values"][i].clone()
        for r in pulls[last_full + 1:]:
            rebuilt += r["values"][i]
        assert torch.equal(rebuilt, held[i])


@pytest.mark.parametrize("spec", ["sign", "topk:0.2", "int8"])
def test_conservation_two_workers(spec):
    with server(compressor=spec, max_staleness=1000) as srv:
        ws = [worker(srv, f"w{i}") for i in range(2)]
        gens = [torch.Generator().manual_seed(i) for i in range(2)]

        def loop(w, g):
            for _ in range(15):
                fake_step(w, g)
        ts = [threading.Thread(target=loop, args=a) for a in zip(ws, gens)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        snap = srv.snapshot()
        assert snap["counters"]["applied"] == sum(w.accepted for w in ws) == snap["version"] == 30
        assert_server_conservation(snap, ws)
        for w in ws:
            assert w.ef.norm() > 0, "a lossy compressor must leave a worker residual"
            assert_worker_conservation(w)
            assert_downlink(snap, w)
        # The downlink really is compressed: a delta pull carries exactly the codec's bytes (per tensor, its blocks'
        # payloads: tests/test_codec.py); a full pull the fp32 values.
        delta_bytes = sum(srv.down.nbytes(p.numel(), p.dtype) for p in ws[0].params)
        dense_bytes = sum(4 * p.numel() for p in ws[0].params)
        assert delta_bytes < dense_bytes / 2
        assert snap["counters"]["bytes_down"] == (snap["counters"]["delta_pulls"] * delta_bytes
                                                  + snap["counters"]["full_pulls"] * dense_bytes)
        up_bytes = sum(srv.up.nbytes(p.numel(), p.dtype) for p in ws[0].params)
        assert snap["counters"]["bytes_up"] == 30 * up_bytes
        # After finish, every worker holds the server's exact x.
        ws[0].finish(wait=False)
        ws[1].finish(num_workers=2)
        ws[0].pull(full=True)
        for w in ws:
            assert all(torch.equal(p.detach(), x) for p, x in zip(w.params, srv.snapshot()["x"]))
            w.close()


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_pushes_report_the_residual_norm_they_were_compensated_with(every_s):
    """The worker's residual norm reaches the server with its pushes (its TensorBoard's worker_residual_norm):
    the norm of the residual before that push, recomputed here in plain torch; with every push (``norm_every_s
    =0``), or with the first and then once per ``norm_every_s``."""
    with server() as srv:
        w, gen = worker(srv, "a", norm_every_s=every_s), torch.Generator().manual_seed(3)
        for step in range(3):
            before = torch.cat([e.reshape(-1).double() for e in w.residuals()]).norm().item()
            assert fake_step(w, gen).status == "applied"
            expected = before if every_s == 0 or step == 0 else 0.0     # the first push's residual is zero
            assert srv.slots["a"].worker_rnorm == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert before > 0
        w.close()


def test_staleness_bound_blocks_then_rejects():
    """max_staleness=2, three workers. While A and C hold their first gradients, B may run 2 pushes ahead of the
    pack (the lower median of the clocks), then its pull waits. A's push (tau=2, at the bound) is applied with step
    1/3 and lets B make one more push. C's push is then 4 versions stale: rejected, counted, not applied, C's
    residual untouched, and C is left out of the pack."""
    with server(max_staleness=2, staleness_policy="inverse") as srv:
        a, b, c = (worker(srv, n) for n in "abc")
        gen_a, gen_c = torch.Generator().manual_seed(1), torch.Generator().manual_seed(3)
        results = []
        t = threading.Thread(target=lambda: [results.append(fake_step(b, torch.Generator().manual_seed(2)))
                                             for _ in range(3)])
        t.start()
        blocked = lambda clock: lambda s: s.slots["b"].clock == clock and s.slots["b"].pending_pull is not None  # noqa
        assert srv.wait_for(blocked(2), timeout=20)
        time.sleep(0.2)
        assert srv.snapshot()["version"] == 2 and t.is_alive()

        r = fake_step(a, gen_a)
        assert (r.status, r.tau, r.scale) == ("applied", 2, pytest.approx(1 / 3))
        assert srv.wait_for(blocked(3), timeout=20)
        assert srv.snapshot()["version"] == 4

        x_before = srv.snapshot()["x"]
        r = fake_step(c, gen_c)
        assert (r.status, r.tau) == ("rejected", 4)
        assert len(c.ef) == 0, "a rejected push must leave the residual as it was"
        snap = srv.snapshot()
        assert snap["version"] == 4 and all(torch.equal(x, y) for x, y in zip(x_before, snap["x"]))
        assert snap["counters"]["rejected"] == 1 and snap["workers"]["c"]["rejected"] == 1
        assert snap["workers"]["c"]["behind"]

        r = fake_step(a, gen_a)                         # A's second push moves the pack: B is released
        assert r.status == "applied"
        t.join(20)
        assert not t.is_alive() and [x.status for x in results] == ["applied"] * 3
        c.pull()
        r = fake_step(c, gen_c)                         # C, with a fresh pull, is accepted again
        assert r.status == "applied" and not srv.snapshot()["workers"]["c"]["behind"]
        snap = srv.snapshot()
        assert snap["counters"]["applied"] == a.accepted + b.accepted + c.accepted == 6 == snap["version"]
        assert max(snap["taus"]) <= 2
        assert_server_conservation(snap, [a, b, c])
        for w in (a, b, c):
            w.close()


def test_blocking_bound_two_workers_accepts_at_the_bound():
    """With two workers the bound alone keeps every push within max_staleness: B waits, A is applied at tau=2."""
    with server(max_staleness=2, staleness_policy="constant") as srv:
        a, b = worker(srv, "a"), worker(srv, "b")
        t = threading.Thread(target=lambda: [fake_step(b, torch.Generator().manual_seed(1)) for _ in range(3)])
        t.start()
        assert srv.wait_for(lambda s: s.slots["b"].pending_pull is not None, timeout=20)
        assert srv.snapshot()["workers"]["b"]["accepted"] == 2
        r = fake_step(a, torch.Generator().manual_seed(2))
        assert (r.status, r.tau, r.scale) == ("applied", 2, 1.0)
        # A's push released B for one more push, after which B is 2 ahead again and waits ...
        assert srv.wait_for(lambda s: s.slots["b"].clock == 3 and s.slots["b"].pending_pull is not None, 20)
        # ... until A leaves (a worker that is gone is not waited for).
        a.close()
        t.join(20)
        assert not t.is_alive() and b.accepted == 3
        assert_server_conservation(srv.snapshot(), [a, b])
        b.close()


def test_no_lost_updates_many_concurrent_pushes_over_tcp():
    with server(bind="tcp://127.0.0.1:0", max_staleness=10_000, staleness_policy="constant") as srv:
        ws = [worker(srv, f"w{i}", seed=0) for i in range(8)]
        barrier = threading.Barrier(len(ws))

        def run(w, k):
            g = torch.Generator().manual_seed(k)
            barrier.wait()
            for _ in range(20):
                fake_step(w, g)
        ts = [threading.Thread(target=run, args=(w, k)) for k, w in enumerate(ws)]
        [t.start() for t in ts]
        [t.join(120) for t in ts]
        snap = srv.snapshot()
        assert sum(w.accepted for w in ws) == 160 == snap["counters"]["applied"] == snap["version"]
        assert snap["counters"].get("rejected", 0) == 0
        assert_server_conservation(snap, ws)
        for w in ws:
            assert_downlink(snap, w)
            w.close()


def test_straggler_does_not_slow_the_others():
    with server(max_staleness=4) as srv:
        ws = [worker(srv, f"w{i}") for i in range(3)]
        stop = threading.Event()

        def run(w, sleep):
            g = torch.Generator().manual_seed(int(w.worker_id[1:]))
            while not stop.is_set():
                if sleep:
                    time.sleep(sleep)
                fake_step(w, g)
            w.finish(wait=False)            # a worker that stops pushing says so, or the bound waits for it
        ts = [threading.Thread(target=run, args=(w, 0.25 if i == 0 else 0.0)) for i, w in enumerate(ws)]
        [t.start() for t in ts]
        time.sleep(2.5)
        stop.set()
        [t.join(30) for t in ts]
        assert not any(t.is_alive() for t in ts)
        slow = ws[0].accepted + ws[0].rejected
        fast = [w.accepted for w in ws[1:]]
        assert slow >= 3 and min(fast) >= 3 * slow, (slow, fast)
        snap = srv.snapshot()
        assert snap["counters"]["applied"] == sum(w.accepted for w in ws)
        assert snap["counters"].get("rejected", 0) == sum(w.rejected for w in ws)
        assert_server_conservation(snap, ws)
        for w in ws:
            w.close()


def test_overlap_takes_each_answer_at_the_next_step_and_counts_its_staleness():
    """overlap=True: step returns once the push is sent (the parameters still the previous x_hat_j while the
    server has already answered), the next step takes that answer before its own update, and the push then
    says the version its gradient was taken at: one worker's pushes are 1 stale (step 1/2), and both
    conservation laws and the exact downlink hold for two workers stepping concurrently."""
    with server(max_staleness=8, staleness_policy="inverse") as srv:
        w = worker(srv, "solo", overlap=True)
        gen = torch.Generator().manual_seed(0)
        assert fake_step(w, gen).status == "pending"
        assert srv.wait_for(lambda s: s.version == 1, timeout=20)
        held = srv.snapshot()["workers"]["solo"]["x_hat"]
        assert any(not torch.equal(p.detach(), x) for p, x in zip(w.params, held)), \
            "the reply in flight was already applied: the step waited for it"
        results = [fake_step(w, gen) for _ in range(4)]
        assert [(r.status, r.tau, r.scale) for r in results] == [("applied", 0, 1.0)] + [("applied", 1, 0.5)] * 3
        w.finish(wait=False)                          # takes the last answer
        assert w.accepted == 5 and srv.snapshot()["counters"]["applied"] == 5
        snap = srv.snapshot()
        assert snap["taus"] == {0: 1, 1: 4}
        assert_server_conservation(snap, [w])
        assert_worker_conservation(w)
        assert_downlink(snap, w)
        w.close()

    with server(max_staleness=1000) as srv:
        ws = [worker(srv, f"w{i}", overlap=True) for i in range(2)]

        def loop(w, k):
            g = torch.Generator().manual_seed(k)
            for _ in range(12):
                fake_step(w, g)
            w.pull()                                  # takes the last answer without a push
        ts = [threading.Thread(target=loop, args=(w, k)) for k, w in enumerate(ws)]
        [t.start() for t in ts]
        [t.join(60) for t in ts]
        snap = srv.snapshot()
        assert sum(w.accepted for w in ws) == 24 == snap["counters"]["applied"]
        assert min(snap["taus"]) >= 0 and sum(k * v for k, v in snap["taus"].items()) >= 22
        assert_server_conservation(snap, ws)
        for w in ws:
            assert_worker_conservation(w)
            assert_downlink(snap, w)
            w.close()

    with server(mode="sync") as srv, pytest.raises(ValueError, match="overlap"):
        worker(srv, "s", overlap=True)


def test_sync_mode_applies_the_mean_once_per_round():
    with server(mode="sync", compressor="none") as srv:
        ws = [worker(srv, f"w{i}", lr=1.0) for i in range(3)]
        x0 = [p.detach().clone() for p in ws[0].params]
        grads = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + j))
                  for j, p in enumerate(ws[0].params)] for k in range(3)]

        def run(w, k):
            for p, g in zip(w.params, grads[k]):
                p.grad = g.clone()
            w.step()
        ts = [threading.Thread(target=run, args=(w, k)) for k, w in enumerate(ws)]
        [t.start() for t in ts]
        [t.join(30) for t in ts]
        snap = srv.snapshot()
        assert snap["version"] == 1 and snap["counters"]["applied"] == 3
        for j, x in enumerate(snap["x"]):
            torch.testing.assert_close(x, x0[j] - (grads[0][j] + grads[1][j] + grads[2][j]) / 3)
        for w in ws:
            assert all(torch.equal(p.detach(), x) for p, x in zip(w.params, snap["x"]))
            w.close()


def test_nonfinite_update_is_skipped_and_counted_never_applied():
    with server() as srv:
        w = worker(srv, "w")
        r = fake_step(w, torch.Generator().manual_seed(0), nan=True)
        assert r.status == "skipped" and w.skipped == 1 and len(w.ef) == 0
        assert srv.snapshot()["version"] == 0
        assert fake_step(w, torch.Generator().manual_seed(1)).status == "applied"
        snap = srv.snapshot()
        assert all(torch.isfinite(x).all() for x in snap["x"])
        w.close()


def test_layout_mismatch_and_bad_arguments():
    with pytest.raises(ValueError, match="sign"):
        async_ps.ParameterServer(compressor="nosuch")
    with pytest.raises(ValueError, match="staleness_policy"):
        async_ps.ParameterServer(staleness_policy="linear")
    with pytest.raises(ValueError, match="max_staleness"):
        async_ps.ParameterServer(max_staleness=0)
    with server() as srv:
        w = worker(srv, "a")
        wider = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4))
        for other, what in ((wider, r"\[4, 7\] float32.*shape/dtype mismatch"), (model().double(), "float64"),
                            (torch.nn.Linear(12, 5), "4 tensors, this one 2")):
            with pytest.raises(async_ps.ServerError, match=what) as e:
                async_ps.Worker(other, torch.optim.SGD(other.parameters(), lr=0.1), srv.address, srv.token,
                                worker_id="b")
            assert e.value.code == "layout"
        assert srv.snapshot()["errors"]["layout"] == 3
        assert fake_step(w, torch.Generator().manual_seed(0)).status == "applied"
        w.close()
    with pytest.raises(ProtocolError):
        from async_ps.protocol import layout_from_json
        layout_from_json([["w", [2, -1], "float32"]])


def test_from_env_explains_what_is_missing(monkeypatch):
    monkeypatch.delenv("DSQ_PS_ADDR", raising=False)
    m = model()
    with pytest.raises(RuntimeError, match="dsq-async-ps"):
        async_ps.Worker.from_env(m, torch.optim.SGD(m.parameters(), lr=0.1))


def test_server_skips_a_nonfinite_push_and_counts_it():
    """A push whose payload decodes to NaN (a sign payload with a NaN scale, sent by a raw client) is skipped:
    acknowledged as such, counted, and x and the version are untouched."""
    import zmq

    from async_ps.protocol import encode, layout_of, layout_to_json

    with server(bind="tcp://127.0.0.1:0") as srv:
        net = model()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(srv.address)
        try:
            dense = [p.detach().numpy().tobytes() for p in net.parameters()]
            sock.send_multipart(encode("hello", srv.token, "raw", 1,
                                       layout=layout_to_json(layout_of(net.named_parameters()))))
            assert sock.poll(5000)
            session = json.loads(sock.recv_multipart()[0])["session"]
            sock.send_multipart(encode("init", srv.token, "raw", 1, dense, session=session))     # one key a tensor
            assert sock.poll(5000) and json.loads(sock.recv_multipart()[0])["initialised"]
            frames = []
            for p in net.parameters():
                frame, _ = srv.up.encode(torch.ones_like(p))
                frame[:4] = torch.tensor([float("nan")]).view(torch.uint8)     # the first block's sign scale
                frames.append(frame.numpy().tobytes())
            x_before = srv.snapshot()["x"]
            sock.send_multipart(encode("push", srv.token, "raw", 2, frames, session=session, base=0))
            assert sock.poll(5000)
            ack = json.loads(sock.recv_multipart()[0])
        finally:
            sock.close(0)
        assert (ack["type"], ack["status"]) == ("ack", "skipped")
        snap = srv.snapshot()
        assert snap["counters"]["skipped"] == 1 and snap["version"] == 0
        assert all(torch.equal(a, b) for a, b in zip(x_before, snap["x"]))
