"""What the integration benchmarks share: run a launcher job per method, count its bytes in a private network
namespace (root: `unshare --net`, loopback only, so the kernel's counters hold exactly that job's traffic),
interleave the methods over rounds, and print and write the comparison with a baseline method.

A benchmark script provides `command(args, method)` (the launcher command line of one job, whose rank 0 prints
``COUNTED {json}`` with at least `os_training_bytes` and `median_step_s`) and calls `main_loop`.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from ddp_bytes import lo_bytes

__all__ = ["add_arguments", "lo_bytes", "main_loop", "mlp_parameters", "report_counted"]


def add_arguments(ap: argparse.ArgumentParser, methods: str) -> None:
    ap.add_argument("--nproc", type=int, default=3)
    ap.add_argument("--methods", default=methods)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians are reported")
    ap.add_argument("--hidden", type=int, default=1024, help="MLP width (1024: about 1.3M parameters)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)


def mlp_parameters(hidden: int) -> int:
    """Parameters of the benchmarks' MLP 256 -> hidden -> hidden -> 10."""
    return 256 * hidden + hidden + hidden * hidden + hidden + hidden * 10 + 10


def report_counted(training_bytes: int, step_times, collective=None) -> None:
    """Rank 0 of a job: print what the harness reads."""
    print("COUNTED", json.dumps({"os_training_bytes": training_bytes, "median_step_s": statistics.median(step_times),
                                 "counted": collective.totals.as_dict() if collective else None}), flush=True)


def _job(cmd):
    before = lo_bytes()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = next((l.split("COUNTED ", 1)[1] for l in proc.stdout.splitlines() if "COUNTED " in l), None)
    if proc.returncode or line is None:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return dict(json.loads(line), os_run_bytes=lo_bytes() - before)


def _forwarded(args):
    return ["--nproc", str(args.nproc), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--hidden", str(args.hidden)]


def main_loop(args, script: str, command, title: str, baseline) -> None:
    """Runs every method `args.rounds` times (interleaved), then prints and writes (`--json`) medians of step
    time and bytes, with ratios to `baseline` (a method, or a function giving each method its baseline).
    Inside the namespace (`--in-namespace`), runs one job."""
    if args.in_namespace:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        print("RESULT", json.dumps(_job(command(args, args.method))))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    isolated = os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("ip"))
    if not isolated:
        print("not root (or no unshare/ip): step times only, no byte counts", file=sys.stderr)
    runs = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            if isolated:
                cmd = ["unshare", "--net", sys.executable, script, "--in-namespace", "--method", m, *_forwarded(args)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
                if proc.returncode or line is None:
                    sys.exit(f"{m} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
                runs[m].append(json.loads(line.split(" ", 1)[1]))
            else:
                runs[m].append(dict(_job(command(args, m)), os_training_bytes=None, os_run_bytes=None))
            print(f"round {r + 1}/{args.rounds} {m}: {runs[m][-1]['median_step_s'] * 1e3:.1f} ms/step", flush=True)

    rows = []
    for m in methods:
        med = lambda k: statistics.median(x[k] for x in runs[m]) if runs[m][0][k] is not None else None  # noqa
        rows.append({"method": m, "step_time_s": med("median_step_s"), "os_bytes_training": med("os_training_bytes"),
                     "os_bytes_run": med("os_run_bytes"), "step_times_s": [x["median_step_s"] for x in runs[m]],
                     "counted_rank0": runs[m][0]["counted"]})
    base_of = baseline if callable(baseline) else (lambda m: baseline)
    by_method = {r["method"]: r for r in rows}
    print(f"\n{title}, {args.nproc} ranks, {mlp_parameters(args.hidden)} parameters, {args.steps} steps after "
          f"{args.warmup} warm-up, median of {args.rounds} interleaved rounds; bytes counted by the kernel")
    print(f"{'method':>16} {'ms/step':>8} {'vs base':>8} {'MB training':>12} {'fewer':>7} {'MB run':>8} "
          f"{'fewer':>7}  (base)")
    f = lambda x, fmt: format(x, fmt) if x is not None else "-"  # noqa: E731
    for r in rows:
        r["baseline"] = base_of(r["method"])
        base = by_method.get(r["baseline"])
        r["step_time_ratio_to_baseline"] = r["step_time_s"] / base["step_time_s"] if base else None
        for k in ("training", "run"):
            b = r[f"os_bytes_{k}"]
            r[f"bytes_ratio_{k}"] = base[f"os_bytes_{k}"] / b if base and b else None
        print(f"{r['method']:>16} {r['step_time_s'] * 1e3:>8.1f} {f(r['step_time_ratio_to_baseline'], '.3f'):>8} "
              f"{f(r['os_bytes_training'] and r['os_bytes_training'] / 1e6, '.2f'):>12} "
              f"{f(r['bytes_ratio_training'], '.1f'):>7} {f(r['os_bytes_run'] and r['os_bytes_run'] / 1e6, '.2f'):>8} "
              f"{f(r['bytes_ratio_run'], '.1f'):>7}  ({r['baseline']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"title": title, "nproc": args.nproc, "steps": args.steps,
                                               "parameters": mlp_parameters(args.hidden), "rounds": args.rounds,
                                               "rows": rows}, indent=2))
