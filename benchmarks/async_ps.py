"""The asynchronous parameter server on loopback: the server's arithmetic per push, push throughput, and time to a
target accuracy with a straggler, side by side with the code before issue 14 ("today's code", `--baseline-rev`).

What it measures, in one run:

1. **server time per push** (``passes``): the server's work for one push answered by its pull (parse and check
   the frames, apply the sign update, compress ``x - x_hat_j`` and update ``x_hat_j``), one thread, in this
   process, for models of 1,001,000 and 25,005,000 parameters; as a ratio to ``clone`` of the same model
   (target <= 3x). The baseline runs the old server's ``_push`` + ``_model_reply`` on the same data, from the
   baseline revision's code.
2. **throughput**: pushes per second with 1, 2, 4 and 8 worker processes pushing a fixed synthetic gradient flat
   out (`Worker.step`: one round trip a step) to 1 or 2 servers started by ``dsq-async-ps --role server``, for
   1M (``nn.Linear(1000, 1000)``) and 25M (``nn.Linear(5000, 5000)``) parameters; counted on server 0 over
   ``--seconds`` once every worker has pushed. The baseline's launcher and worker run the same rows (1 server).
   Target: 8 workers, 1M, sign: at least 150 pushes/s.
3. **time to target**: 4 workers train the digits MLP of ``examples/async_digits.py`` (one data shard each,
   SGD lr 0.1, sign compression both ways); a step's compute is simulated by sleeping ``--step-s`` seconds, and
   worker 0 sleeps 4 times as long. The same code runs the asynchronous server (``mode="async"``,
   ``max_staleness=8``, step ``1/(1+tau)``) and the synchronous one (``mode="sync"``: a barrier per round, the
   mean of all workers' pushes). Time runs from the moment all workers have joined until the server's model
   reaches ``--target`` test accuracy (evaluated every 0.1 s). Target: async at least 2.5x faster.

The machine this was written on has 2 cores: the workers' own compute shares them with the servers, so
throughput is CPU-bound, not network-bound. Absolute figures are context; compare the ratios.

Run it::

    .venv/bin/python benchmarks/async_ps.py --json runs/bench/async_ps.json          # everything, about 8 min
    .venv/bin/python benchmarks/async_ps.py --parts passes
    .venv/bin/python benchmarks/async_ps.py --parts throughput --sizes 1m --workers 1,8 --servers 1 --seconds 3
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = Path(os.environ.get("DSQ_BENCH_CODE", ROOT))       # whose async_ps a worker or probe runs
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(CODE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

TARGET_SPEEDUP = 2.5
TARGET_PASSES = 3.0
TARGET_PUSHES = 150.0
BASELINE_REV = "219b8fc"          # the last commit before issue 14's server
SIZES = {"1m": (1000, 1000), "25m": (5000, 5000)}


# ---------------------------------------------------------------- worker processes
def _throughput_worker(args) -> None:
    import async_ps

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(*SIZES[args.size])
    gen = torch.Generator().manual_seed(int(os.environ["DSQ_PS_WORKER"]))
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    worker = async_ps.Worker.from_env(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    while True:
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        worker.step()


def _digits_worker(args) -> None:
    import async_ps
    from examples.digits_common import digits, mlp

    torch.set_num_threads(1)
    n, wid = int(os.environ["DSQ_PS_NUM_WORKERS"]), int(os.environ["DSQ_PS_WORKER"])
    x_tr, y_tr, _, _ = digits(0)
    x_tr, y_tr = x_tr[wid::n], y_tr[wid::n]
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    worker = async_ps.Worker.from_env(model, opt)
    while worker.status()["live"] < n:          # start together, so that neither mode gets a head start
        time.sleep(0.05)
    sleep = args.step_s * (args.slow_factor if wid == 0 else 1.0)
    gen = torch.Generator().manual_seed(wid)
    loss_fn = nn.CrossEntropyLoss()
    while True:
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            opt.zero_grad()
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
            time.sleep(sleep)
            worker.step()


# ---------------------------------------------------------------- server time per push
def _timed(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def _model_data(size: str):
    torch.manual_seed(0)
    shapes = [SIZES[size], (SIZES[size][0],)]
    x = [torch.randn(s) for s in shapes]
    x_hat = [t + 0.01 * torch.randn(s) for t, s in zip(x, shapes)]
    g = [torch.randn(s) for s in shapes]
    return shapes, x, x_hat, g


def passes_new(size: str, reps: int) -> dict:
    """This tree's server: the control thread's checks, then the job: on one shard doing all of it (``push_s``,
    one thread), and through the server's shard threads (``wall_s``, `ParameterServer` default threads)."""
    import threading

    import zmq

    from async_ps.protocol import frame_tensors, frames_finite, key_seed
    from async_ps.server import ParameterServer
    from async_ps.sessions import Slot
    from async_ps.shards import Answer, Job, JobKind, PullKind, Push, Update

    shapes, x, x_hat, g = _model_data(size)
    out = {"size": size, "params": sum(t.numel() for t in x), "clone_s": _timed(lambda: [t.clone() for t in x], reps)}
    for threads in (1, None):
        srv = ParameterServer(compressor="sign", threads=threads)
        srv._adopt_layout([(f"p{i}", s, torch.float32) for i, s in enumerate(shapes)])
        flat = lambda ts: [t.view(-1)[a:b].clone() for (i, a, b) in srv.keys for t in [ts[i]]]  # noqa: E731
        srv._adopt_model(flat(x), flat(x))
        ex = srv.executor
        slot = Slot(worker="w", session="s", identity=b"w", x_hat=flat(x_hat), held=True)
        payload = [srv.up.encode(c, key_seed(0, k))[0].numpy().tobytes() for k, c in enumerate(flat(g))]

        def updates():
            f = frame_tensors(srv.up, payload, srv.key_layout)
            assert frames_finite(srv.up, f, srv.key_layout)
            return [Update(Push(f, 0), -0.5)]

        def answer():
            return Answer(slot, PullKind.DELTA, 0, b"w", "w", 1, {})
        if threads == 1:
            shard = ex.shards[0]
            out["push_s"] = _timed(lambda: shard.run(Job(JobKind.PULL, len(srv.keys), 1, updates(), answer=answer())),
                                   reps)
            out["keys"] = len(srv.keys)
            continue
        sink = srv.context.socket(zmq.PULL)
        sink.bind(srv._outbox_addr)
        stop = threading.Event()

        def drain():
            while not stop.is_set():
                if sink.poll(50):
                    sink.recv_multipart()
        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        ex.start()

        def push():
            ex.submit(JobKind.PULL, updates=updates(), answer=answer()).finished.wait()
        out["wall_s"], out["threads"] = _timed(push, reps), len(ex.shards)
        ex.stop()
        stop.set()
        drainer.join()
        sink.close(0)
    return out


def passes_old(size: str, reps: int) -> dict:
    """The baseline revision's server (run with its tree first on the path): `_push` then `_model_reply`."""
    from async_ps.protocol import pack
    from async_ps.server import ParameterServer, _Slot

    shapes, x, x_hat, g = _model_data(size)
    srv = ParameterServer(compressor="sign")
    srv.layout = [(f"p{i}", s, torch.float32) for i, s in enumerate(shapes)]
    srv.x, srv.x0 = [t.clone() for t in x], [t.clone() for t in x]
    slot = _Slot(worker="w", session="s", identity=b"w", x_hat=[t.clone() for t in x_hat])
    srv.slots["w"] = slot
    payload, _ = pack(srv.up, g)
    nbytes = sum(len(f) for f in payload)

    def push():
        srv._push(slot, {"s": 1, "base": srv.version}, payload, nbytes)
        srv._model_reply(slot, 1, False)
    clone = _timed(lambda: [t.clone() for t in x], reps)
    return {"size": size, "params": sum(t.numel() for t in x), "clone_s": clone, "push_s": _timed(push, reps)}


def _in_code(code: Path, argv) -> dict:
    """Run this file's hidden `--measure` mode with `code` first on the path; its JSON result."""
    out = subprocess.run([sys.executable, __file__, *argv], env=dict(os.environ, DSQ_BENCH_CODE=str(code),
                                                                  OMP_NUM_THREADS="1"),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- harness
def _kill(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=30)


def _status(address: str, token: str, proto: int) -> dict:
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart([json.dumps({"p": proto, "t": token, "type": "status", "w": "bench", "s": 1}).encode()])
        if not sock.poll(30000):
            raise RuntimeError(f"no status from {address}")
        return json.loads(sock.recv_multipart()[0])
    finally:
        sock.close(0)


def throughput(code: Path, size: str, n: int, servers: int, seconds: float, compressor: str,
               max_staleness: int) -> dict:
    """`n` worker processes against `servers` server processes (`dsq-async-ps --role server`), all running
    `code`'s async_ps; pushes handled per second by server 0."""
    token = "b" * 32
    proto = 3 if code == ROOT else 2
    env = dict(os.environ, PYTHONPATH=f"{code}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1", DSQ_PS_TOKEN=token,
               DSQ_BENCH_CODE=str(code))
    procs, addresses = [], []
    try:
        for i in range(servers):
            cmd = [sys.executable, "-m", "async_ps.launcher", "--role", "server", "--num-workers", str(n),
                   "--compressor", compressor, "--max-staleness", str(max_staleness), "--no-progress",
                   "--bind", "tcp://127.0.0.1:0"]
            if servers > 1:
                cmd += ["--num-servers", str(servers), "--server-index", str(i)]
            # cwd: `python -m` puts the working directory first on the path, ahead of PYTHONPATH
            p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 start_new_session=True, cwd=str(code))
            procs.append(p)
            addresses.append(p.stdout.readline().strip())
        wenv = dict(env, DSQ_PS_ADDR=",".join(addresses), DSQ_PS_NUM_WORKERS=str(n))
        procs += [subprocess.Popen([sys.executable, __file__, "--worker", "throughput", "--size", size],
                                   env=dict(wenv, DSQ_PS_WORKER=str(i)), start_new_session=True,
                                   stdout=subprocess.DEVNULL) for i in range(n)]
        deadline = time.monotonic() + 300
        while True:
            st = _status(addresses[0], token, proto)
            if st["live"] == n and st["applied"] + st["rejected"] >= 3 * n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{n} throughput workers did not all start within 300 s")
            time.sleep(0.2)
        s0, t0 = _status(addresses[0], token, proto), time.monotonic()
        time.sleep(seconds)
        s1, t1 = _status(addresses[0], token, proto), time.monotonic()
    finally:
        _kill(procs)
    dt = t1 - t0
    handled = (s1["applied"] + s1["rejected"] + s1["skipped"]) - (s0["applied"] + s0["rejected"] + s0["skipped"])
    pulls = max(1, handled)
    return {"code": "baseline" if code != ROOT else "this", "size": size, "workers": n, "servers": servers,
            "seconds": dt, "pushes": handled, "pushes_per_s": handled / dt,
            "applied_per_s": (s1["applied"] - s0["applied"]) / dt, "rejected": s1["rejected"] - s0["rejected"],
            "bytes_up_per_push": (s1["bytes_up"] - s0["bytes_up"]) / pulls,
            "bytes_down_per_pull": (s1["bytes_down"] - s0["bytes_down"]) / pulls}


def _spawn(n: int, server, argv) -> list:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DSQ_PS_ADDR=server.address,
               DSQ_PS_TOKEN=server.token, DSQ_PS_NUM_WORKERS=str(n))
    return [subprocess.Popen([sys.executable, __file__, *argv], env=dict(env, DSQ_PS_WORKER=str(i)),
                             start_new_session=True, stdout=subprocess.DEVNULL) for i in range(n)]


def time_to_target(mode: str, args) -> dict:
    import async_ps
    from examples.digits_common import accuracy, digits, mlp

    _, _, x_te, y_te = digits(0)
    probe = mlp(0)
    n = 4
    with async_ps.ParameterServer(compressor="sign", max_staleness=8, mode=mode, num_workers=n) as server:
        procs = _spawn(n, server, ["--worker", "digits", "--step-s", str(args.step_s), "--lr", str(args.lr),
                                   "--slow-factor", str(args.slow_factor)])
        try:
            if not server.wait_for(lambda s: len(s.slots) == n, 180):
                raise RuntimeError("the digits workers did not all join within 180 s")
            t0 = time.monotonic()
            curve, reached = [], None
            while time.monotonic() - t0 < args.limit_s:
                snap = server.snapshot()
                with torch.no_grad():
                    for p, x in zip(probe.parameters(), snap["x"]):
                        p.copy_(x)
                acc = accuracy(probe, x_te, y_te)
                t = time.monotonic() - t0
                curve.append([round(t, 3), snap["version"], round(acc, 4)])
                if acc >= args.target:
                    reached = t
                    break
                time.sleep(0.1)
            st = server.status()
            per_worker = {w: {"accepted": s["accepted"], "rejected": s["rejected"]}
                          for w, s in server.snapshot()["workers"].items()}
        finally:
            _kill(procs)
    return {"mode": mode, "seconds_to_target": reached, "reached": reached is not None, "version": st["version"],
            "applied": st["applied"], "rejected": st["rejected"], "per_worker": per_worker, "curve": curve}


def format_table(res: dict) -> str:
    lines = []
    if "passes" in res:
        lines += ["server time per push (parse, apply, downlink delta + x_hat update; one thread), sign, as a "
                  "ratio to clone of the model", "",
                  f"{'params':>11}{'clone ms':>10}{'this ms':>9}{'x clone':>9}{'threads':>8}{'wall ms':>9}"
                  f"{'x clone':>9}{'baseline ms':>13}{'x clone':>9}{'speed-up':>10}"]
        lines.append("-" * len(lines[-1]))
        for r in res["passes"]:
            new, old = r["this"], r.get("baseline")
            row = (f"{new['params']:>11}{new['clone_s'] * 1e3:>10.3f}{new['push_s'] * 1e3:>9.3f}"
                   f"{new['push_s'] / new['clone_s']:>9.2f}{new['threads']:>8}{new['wall_s'] * 1e3:>9.3f}"
                   f"{new['wall_s'] / new['clone_s']:>9.2f}")
            if old:
                row += (f"{old['push_s'] * 1e3:>13.3f}{old['push_s'] / old['clone_s']:>9.2f}"
                        f"{old['push_s'] / new['push_s']:>10.1f}")
            lines.append(row)
        for key, what in (("push_s", "one thread"), ("wall_s", "the server's shard threads")):
            worst = max(r["this"][key] / r["this"]["clone_s"] for r in res["passes"])
            lines.append(f"{'' if key == 'wall_s' else chr(10)}worst ratio to clone, {what}: {worst:.2f} "
                         f"(target <= {TARGET_PASSES:g})  {'PASS' if worst <= TARGET_PASSES else 'MISS'}")
    if "throughput" in res:
        rows = res["throughput"]
        if lines:
            lines.append("")
        lines += [f"throughput: pushes/s counted on server 0, compressor {res['compressor']}, loopback tcp, "
                  f"{res['cpus']} CPUs, {rows[0]['seconds']:.0f} s per row", "",
                  f"{'code':>9}{'params':>7}{'servers':>8}{'workers':>8}{'pushes/s':>10}{'applied/s':>11}"
                  f"{'rejected':>9}{'up B/push':>11}{'down B/pull':>12}"]
        lines.append("-" * len(lines[-1]))
        for r in rows:
            lines.append(f"{r['code']:>9}{r['size']:>7}{r['servers']:>8}{r['workers']:>8}{r['pushes_per_s']:>10.1f}"
                         f"{r['applied_per_s']:>11.1f}{r['rejected']:>9}{r['bytes_up_per_push']:>11.0f}"
                         f"{r['bytes_down_per_pull']:>12.0f}")
        best = max((r["pushes_per_s"] for r in rows if r["code"] == "this" and r["size"] == "1m"
                    and r["workers"] == 8), default=None)
        if best is not None:
            lines += ["", f"8 workers, 1M parameters: {best:.1f} pushes/s (target >= {TARGET_PUSHES:g})  "
                          f"{'PASS' if best >= TARGET_PUSHES else 'MISS'}"]
    if "time_to_target" in res:
        tt = res["time_to_target"]
        if lines:
            lines.append("")
        lines += [f"time to {tt['target']:.2f} test accuracy on digits, 4 workers, worker 0 {tt['slow_factor']:g}x "
                  f"slower ({tt['step_s'] * 1000:.0f} ms vs {tt['step_s'] * tt['slow_factor'] * 1000:.0f} ms a "
                  "step), sign both ways", "",
                  f"{'mode':>6}{'seconds':>9}{'versions':>10}{'applied':>9}{'rejected':>10}"]
        lines.append("-" * len(lines[-1]))
        for r in (tt["sync"], tt["async"]):
            secs = f"{r['seconds_to_target']:.2f}" if r["reached"] else f">{tt['limit_s']:g}"
            lines.append(f"{r['mode']:>6}{secs:>9}{r['version']:>10}{r['applied']:>9}{r['rejected']:>10}")
        sp = tt["speedup"]
        verdict = "PASS" if sp is not None and sp >= TARGET_SPEEDUP else "MISS"
        lines += ["", f"async is {sp:.2f}x faster to target than sync (target >= {TARGET_SPEEDUP}x)  {verdict}"
                  if sp is not None else f"speedup unknown (a mode did not reach the target)  {verdict}"]
    return "\n".join(lines)


def _baseline_tree(rev: str) -> Path:
    """The baseline revision's async_ps and dsq_plugins, extracted from git into a temporary directory."""
    out = Path(tempfile.mkdtemp(prefix="dsq-baseline-"))
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "async_ps", "dsq_plugins"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="passes,throughput,time", help="comma-separated: passes, throughput, time")
    ap.add_argument("--sizes", default="1m,25m", help="model sizes of passes and throughput: 1m, 25m")
    ap.add_argument("--workers", default="1,2,4,8", help="worker counts of the throughput part")
    ap.add_argument("--servers", default="1,2", help="server counts of the throughput part")
    ap.add_argument("--seconds", type=float, default=5.0, help="measured seconds per throughput row")
    ap.add_argument("--compressor", default="sign", help="compressor of the throughput part")
    ap.add_argument("--max-staleness", type=int, default=8)
    ap.add_argument("--baseline-rev", default=BASELINE_REV,
                    help=f"git revision of today's code to run beside (default {BASELINE_REV}; 'none': skip)")
    ap.add_argument("--target", type=float, default=0.90, help="test accuracy of the time-to-target part")
    ap.add_argument("--step-s", type=float, default=0.02, help="simulated compute per step of a fast worker")
    ap.add_argument("--slow-factor", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--limit-s", type=float, default=120.0, help="give up on a mode after this many seconds")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    ap.add_argument("--worker", choices=("throughput", "digits"), help=argparse.SUPPRESS)
    ap.add_argument("--size", default="1m", help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=("new", "old"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "throughput":
        _throughput_worker(args)
        return 0
    if args.worker == "digits":
        _digits_worker(args)
        return 0
    if args.measure:
        torch.set_num_threads(1)
        reps = 200 if args.size == "1m" else 8
        print(json.dumps((passes_new if args.measure == "new" else passes_old)(args.size, reps)))
        return 0

    from tqdm import tqdm

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    server_counts = [int(c) for c in args.servers.split(",") if c.strip()]
    base = None if args.baseline_rev == "none" else _baseline_tree(args.baseline_rev)
    res = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
           "baseline_rev": args.baseline_rev}
    rows = [(base, s, n, 1) for s in sizes for n in counts] if base else []
    rows = [(ROOT, s, n, k) for s in sizes for k in server_counts for n in counts] + rows
    steps = (2 * len(sizes) if "passes" in parts else 0) + (len(rows) if "throughput" in parts else 0) \
        + (2 if "time" in parts else 0)
    bar = tqdm(total=steps, desc="bench", unit="run", file=sys.stderr)
    if "passes" in parts:
        res["passes"] = []
        for size in sizes:
            bar.set_postfix_str(f"passes {size}")
            row = {"this": _in_code(ROOT, ["--measure", "new", "--size", size])}
            bar.update(1)
            if base:
                row["baseline"] = _in_code(base, ["--measure", "old", "--size", size])
            bar.update(1)
            res["passes"].append(row)
    if "throughput" in parts:
        res.update(compressor=args.compressor, max_staleness=args.max_staleness, throughput=[])
        for code, size, n, k in rows:
            bar.set_postfix_str(f"throughput {'baseline' if code != ROOT else 'this'} {size} {k}s {n}w")
            res["throughput"].append(throughput(code, size, n, k, args.seconds, args.compressor, args.max_staleness))
            bar.update(1)
    if "time" in parts:
        tt = {"target": args.target, "step_s": args.step_s, "slow_factor": args.slow_factor, "lr": args.lr,
              "limit_s": args.limit_s, "max_staleness": 8}
        for mode in ("sync", "async"):
            bar.set_postfix_str(f"time to target, {mode}")
            tt[mode] = time_to_target(mode, args)
            bar.update(1)
        s, a = tt["sync"]["seconds_to_target"], tt["async"]["seconds_to_target"]
        tt["speedup"] = s / a if s and a else None
        tt["pass"] = tt["speedup"] is not None and tt["speedup"] >= TARGET_SPEEDUP
        res["time_to_target"] = tt
    bar.close()
    print(format_table(res))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
