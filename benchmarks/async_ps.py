"""The asynchronous parameter server on loopback: push throughput, and time to a target accuracy with a straggler.

What it measures, in one run, with real worker processes talking ZeroMQ over ``tcp://127.0.0.1`` to a server in
this process:

1. **throughput**: pushes per second handled by the server with 1, 2, 4 and 8 workers on a 1,001,000-parameter
   model (``nn.Linear(1000, 1000)``), each worker pushing a fixed synthetic gradient as fast as it can (push, then
   pull the compressed delta: the full round trip of `Worker.step`). Counted on the server over ``--seconds``
   seconds once every worker has pushed; reported with the ratio to 1 worker and the payload bytes per push.
2. **time to target**: 4 workers train the digits MLP of ``examples/async_digits.py`` (one data shard each,
   SGD lr 0.1, sign compression both ways); a step's compute is simulated by sleeping ``--step-s`` seconds, and
   worker 0 sleeps 4 times as long. The same code runs the asynchronous server (``mode="async"``,
   ``max_staleness=8``, step ``1/(1+tau)``) and the synchronous one (``mode="sync"``: a barrier per round, the
   mean of all workers' pushes). Time runs from the moment all workers have joined until the server's model
   reaches ``--target`` test accuracy (evaluated every 0.1 s). Target: async at least 2.5x faster.

The machine this was written on has 2 cores: with 8 workers the processes share them, so throughput there is
CPU-bound, not network-bound. Absolute figures are context; compare the ratios.

Run it::

    .venv/bin/python benchmarks/async_ps.py                         # both parts, the table
    .venv/bin/python benchmarks/async_ps.py --json runs/bench/async_ps.json
    .venv/bin/python benchmarks/async_ps.py --parts throughput --workers 1,2 --seconds 3
"""
import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import async_ps  # noqa: E402

TARGET_SPEEDUP = 2.5


# ---------------------------------------------------------------- worker processes
def _throughput_worker(args) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Linear(1000, 1000)
    gen = torch.Generator().manual_seed(int(os.environ["DSQ_PS_WORKER"]))
    grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    worker = async_ps.Worker.from_env(model, torch.optim.SGD(model.parameters(), lr=1e-3))
    while True:
        for p, g in zip(model.parameters(), grads):
            p.grad = g
        worker.step()


def _digits_worker(args) -> None:
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


# ---------------------------------------------------------------- harness
def _spawn(n: int, server, argv) -> list:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DSQ_PS_ADDR=server.address,
               DSQ_PS_TOKEN=server.token, DSQ_PS_NUM_WORKERS=str(n))
    return [subprocess.Popen([sys.executable, __file__, *argv], env=dict(env, DSQ_PS_WORKER=str(i)),
                             start_new_session=True, stdout=subprocess.DEVNULL) for i in range(n)]


def _kill(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait(timeout=30)


def throughput(n: int, seconds: float, compressor: str, max_staleness: int) -> dict:
    with async_ps.ParameterServer(compressor=compressor, max_staleness=max_staleness) as server:
        procs = _spawn(n, server, ["--worker", "throughput"])
        try:
            ok = server.wait_for(lambda s: len(s.slots) == n and all(w.accepted >= 1 for w in s.slots.values()), 180)
            if not ok:
                raise RuntimeError(f"{n} throughput workers did not all start within 180 s")
            s0, t0 = server.status(), time.monotonic()
            time.sleep(seconds)
            s1, t1 = server.status(), time.monotonic()
            events = {k: server.counters[k] for k in ("full_pulls", "rejoined", "dropped")}
        finally:
            _kill(procs)
    dt = t1 - t0
    handled = (s1["applied"] + s1["rejected"] + s1["skipped"]) - (s0["applied"] + s0["rejected"] + s0["skipped"])
    applied = s1["applied"] - s0["applied"]
    pulls = max(1, handled)
    return {"workers": n, "seconds": dt, "pushes": handled, "pushes_per_s": handled / dt,
            "applied_per_s": applied / dt, "rejected": s1["rejected"] - s0["rejected"],
            "bytes_up_per_push": (s1["bytes_up"] - s0["bytes_up"]) / pulls,
            "bytes_down_per_pull": (s1["bytes_down"] - s0["bytes_down"]) / pulls, **events}


def time_to_target(mode: str, args) -> dict:
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
    if "throughput" in res:
        rows = res["throughput"]
        base = rows[0]["pushes_per_s"]
        lines += [f"throughput: {res['params']} parameters, compressor {res['compressor']}, loopback tcp, "
                  f"{res['cpus']} CPUs, {rows[0]['seconds']:.0f} s per row", "",
                  f"{'workers':>8}{'pushes/s':>11}{'x 1 worker':>12}{'applied/s':>11}{'rejected':>10}"
                  f"{'up B/push':>11}{'down B/pull':>13}"]
        lines.append("-" * len(lines[-1]))
        for r in rows:
            lines.append(f"{r['workers']:>8}{r['pushes_per_s']:>11.1f}{r['pushes_per_s'] / base:>12.2f}"
                         f"{r['applied_per_s']:>11.1f}{r['rejected']:>10}{r['bytes_up_per_push']:>11.0f}"
                         f"{r['bytes_down_per_pull']:>13.0f}")
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="throughput,time", help="comma-separated: throughput, time")
    ap.add_argument("--workers", default="1,2,4,8", help="worker counts of the throughput part")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per throughput row")
    ap.add_argument("--compressor", default="sign", help="compressor of the throughput part")
    ap.add_argument("--max-staleness", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.90, help="test accuracy of the time-to-target part")
    ap.add_argument("--step-s", type=float, default=0.02, help="simulated compute per step of a fast worker")
    ap.add_argument("--slow-factor", type=float, default=4.0)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--limit-s", type=float, default=120.0, help="give up on a mode after this many seconds")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON to FILE")
    ap.add_argument("--worker", choices=("throughput", "digits"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "throughput":
        _throughput_worker(args)
        return 0
    if args.worker == "digits":
        _digits_worker(args)
        return 0

    from tqdm import tqdm

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    counts = [int(c) for c in args.workers.split(",") if c.strip()]
    res = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count()}
    steps = (len(counts) if "throughput" in parts else 0) + (2 if "time" in parts else 0)
    bar = tqdm(total=steps, desc="bench", unit="run", file=sys.stderr)
    if "throughput" in parts:
        res.update(params=1000 * 1000 + 1000, compressor=args.compressor, max_staleness=args.max_staleness,
                   throughput=[])
        for n in counts:
            bar.set_postfix_str(f"throughput {n} workers")
            res["throughput"].append(throughput(n, args.seconds, args.compressor, args.max_staleness))
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
