"""Horovod: bytes on the wire (counted by the operating system) and step time, stock Horovod against
horovod_ext, side by side in one invocation.

Methods (each a fresh horovodrun job on Gloo, the same model, data and steps):
    stock        hvd.DistributedOptimizer, no compression (ring allreduce of fp32 gradients)
    dsq-none     horovod_ext.DistributedOptimizer(compression=Compression.none): the double pass, uncompressed;
                 its step time against `stock` is the integration's overhead
    dsq-SPEC     the unedited script under `dsq-horovodrun --dsq-compressor SPEC` (e.g. dsq-sign)

As root, each job runs in a fresh network namespace (`unshare --net`) whose only interface is loopback, so the
kernel's counters hold exactly that job's traffic; without root, only step times are reported. Bytes are
counted from after the parameter broadcast and warm-up steps to the end of training ("training"), and for the
whole job, rendezvous included ("run"). Jobs are interleaved over --rounds and the median taken.

    python benchmarks/horovod_bench.py --nproc 3 --methods stock,dsq-none,dsq-sign --json runs/bench/horovod.json
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ddp_bytes import lo_bytes


def worker(args):
    """One rank, under horovodrun."""
    import horovod.torch as hvd
    import torch
    import torch.nn as nn

    import horovod_ext

    torch.set_num_threads(1)
    hvd.init()
    torch.manual_seed(0)
    h = args.hidden
    model = nn.Sequential(nn.Linear(256, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    if args.method == "stock":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    elif args.method == "dsq-none":
        opt = horovod_ext.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                               compression=horovod_ext.Compression.none)
    else:      # switched by dsq-horovodrun's flag
        opt = horovod_ext.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    gen = torch.Generator().manual_seed(hvd.rank())

    def step():
        x, y = torch.randn(64, 256, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    hvd.allreduce(torch.zeros(1), name="barrier.start")
    start, times = lo_bytes(), []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    hvd.allreduce(torch.zeros(1), name="barrier.end")
    if hvd.rank() == 0:
        dsq = getattr(opt, "doublesqueeze", None)
        print("COUNTED", json.dumps({"os_training_bytes": lo_bytes() - start, "median_step_s": statistics.median(times),
                                     "counted": dsq.totals.as_dict() if dsq else None}), flush=True)


def job(args, method):
    """Run one horovodrun job; returns (its RESULT dict, the loopback bytes of the whole job)."""
    bin_dir = Path(sys.executable).parent
    flags = [] if method in ("stock", "dsq-none") else ["--dsq-compressor", method[len("dsq-"):]]
    launcher = "dsq-horovodrun" if flags else "horovodrun"
    cmd = [str(bin_dir / launcher), *flags, "-np", str(args.nproc), "--gloo", "-H", f"localhost:{args.nproc}",
           sys.executable, __file__, "--worker", "--method", method, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--hidden", str(args.hidden)]
    before = lo_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = next((l.split("COUNTED ", 1)[1] for l in proc.stdout.splitlines() if "COUNTED " in l), None)
    if proc.returncode or line is None:
        sys.exit(f"{method} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line), lo_bytes() - before


def in_namespace(args):
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    counted, run_bytes = job(args, args.method)
    print("RESULT", json.dumps(dict(counted, os_run_bytes=run_bytes)))


def measure(args, method, isolated: bool) -> dict:
    if not isolated:
        counted, _ = job(args, method)
        return dict(counted, os_training_bytes=None, os_run_bytes=None)
    cmd = ["unshare", "--net", sys.executable, __file__, "--in-namespace", "--method", method,
           "--nproc", str(args.nproc), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--hidden", str(args.hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
    if proc.returncode or line is None:
        sys.exit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line.split(" ", 1)[1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=3)
    ap.add_argument("--methods", default="stock,dsq-none,dsq-sign")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--hidden", type=int, default=1024, help="MLP width (1024: about 1.3M parameters)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="stock", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.in_namespace:
        return in_namespace(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("stock", "dsq-none") and not m.startswith("dsq-"):
            sys.exit(f"unknown method {m!r}: stock, dsq-none or dsq-SPEC")
    isolated = os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("ip"))
    if not isolated:
        print("not root (or no unshare/ip): step times only, no byte counts", file=sys.stderr)

    runs = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            runs[m].append(measure(args, m, isolated))
            print(f"round {r + 1}/{args.rounds} {m}: {runs[m][-1]['median_step_s'] * 1e3:.1f} ms/step", flush=True)
    params = 256 * args.hidden + args.hidden + args.hidden * args.hidden + args.hidden + args.hidden * 10 + 10
    rows = []
    for m in methods:
        med = lambda k: statistics.median(x[k] for x in runs[m]) if runs[m][0][k] is not None else None  # noqa
        rows.append({"method": m, "step_time_s": med("median_step_s"), "os_bytes_training": med("os_training_bytes"),
                     "os_bytes_run": med("os_run_bytes"), "step_times_s": [x["median_step_s"] for x in runs[m]],
                     "counted_rank0": runs[m][0]["counted"]})
    stock = next((r for r in rows if r["method"] == "stock"), None)
    print(f"\nHorovod (Gloo), {args.nproc} ranks, {params} parameters, {args.steps} steps after {args.warmup} "
          f"warm-up, median of {args.rounds} interleaved rounds")
    print(f"{'method':>14} {'ms/step':>8} {'vs stock':>9} {'MB training':>12} {'fewer':>7} {'MB run':>8} {'fewer':>7}")
    for r in rows:
        r["step_time_ratio_to_stock"] = r["step_time_s"] / stock["step_time_s"] if stock else None
        for k in ("training", "run"):
            b = r[f"os_bytes_{k}"]
            r[f"bytes_ratio_{k}"] = stock[f"os_bytes_{k}"] / b if stock and b else None
        f = lambda x, fmt: format(x, fmt) if x is not None else "-"  # noqa: E731
        print(f"{r['method']:>14} {r['step_time_s'] * 1e3:>8.1f} {f(r['step_time_ratio_to_stock'], '.3f'):>9} "
              f"{f(r['os_bytes_training'] and r['os_bytes_training'] / 1e6, '.2f'):>12} "
              f"{f(r['bytes_ratio_training'], '.1f'):>7} {f(r['os_bytes_run'] and r['os_bytes_run'] / 1e6, '.2f'):>8} "
              f"{f(r['bytes_ratio_run'], '.1f'):>7}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"nproc": args.nproc, "steps": args.steps, "parameters": params,
                                               "rounds": args.rounds, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
