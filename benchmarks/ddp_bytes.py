"""Bytes on the wire of DDP training, as counted by the operating system: plain DDP against the DoubleSqueeze hook.

Each method runs in a fresh network namespace (`unshare --net`, needs root) whose only interface is loopback, so
the kernel's counters in /proc/net/dev hold exactly the traffic of that run: the ranks' gradients, plus
torchrun's rendezvous and Gloo's connection set-up (TCP/IP headers and acknowledgements included). The same
model, data and steps for every method; the ratio to dense is printed and written with --json.

    python benchmarks/ddp_bytes.py --nproc 3 --methods dense,sign,topk:0.01 --json runs/bench/ddp_bytes.json
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def net_bytes(ifname: str):
    """(sent, received) bytes of interface `ifname` of this network namespace, from /proc/net/dev."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == ifname:
            f = rest.split()
            return int(f[8]), int(f[0])
    raise RuntimeError(f"no {ifname} in /proc/net/dev")


def lo_bytes() -> int:
    """Bytes sent on loopback (on loopback, equal to those received)."""
    return net_bytes("lo")[0]


def worker(args):
    """One rank (under torchrun): train an MLP on synthetic data for --steps steps."""
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dsq_plugins as dsq

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    h = args.hidden
    model = nn.Sequential(nn.Linear(256, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    ddp = DDP(model)
    if args.method != "dense":
        state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor=args.method))
        ddp.register_comm_hook(state, dsq.doublesqueeze_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    dist.barrier()                    # DDP's initial broadcast of the parameters is done: count from here
    start = lo_bytes()
    for _ in range(args.steps):
        x, y = torch.randn(64, 256, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    dist.barrier()
    if rank == 0:
        counted = state.totals.as_dict() if args.method != "dense" else {}
        print("COUNTED", json.dumps(dict(counted, os_training_bytes=lo_bytes() - start)))
    dist.destroy_process_group()


def in_namespace(args):
    """Inside a fresh network namespace: bring loopback up, run torchrun, report the kernel's byte count."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    before = lo_bytes()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           __file__, "--worker", "--method", args.method, "--steps", str(args.steps), "--hidden", str(args.hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if proc.returncode:
        sys.exit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    counted = next((json.loads(l.split(" ", 1)[1]) for l in proc.stdout.splitlines() if l.startswith("COUNTED")), None)
    print("RESULT", json.dumps({"os_bytes": lo_bytes() - before, "counted": counted}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=3)
    ap.add_argument("--methods", default="dense,sign,topk:0.01")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=1024, help="MLP width (1024: about 1.3M parameters)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-namespace", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="dense", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.in_namespace:
        return in_namespace(args)
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        sys.exit("ddp_bytes.py needs root, unshare and ip: it counts bytes in a private network namespace")

    params = 256 * args.hidden + args.hidden + args.hidden * args.hidden + args.hidden + args.hidden * 10 + 10
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        cmd = ["unshare", "--net", sys.executable, __file__, "--in-namespace", "--method", method,
               "--nproc", str(args.nproc), "--steps", str(args.steps), "--hidden", str(args.hidden)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
        if proc.returncode or line is None:
            sys.exit(f"{method} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        res = json.loads(line.split(" ", 1)[1])
        training = res["counted"]["os_training_bytes"]
        rows.append({"method": method, "os_bytes_total": res["os_bytes"], "os_bytes_training": training,
                     "os_bytes_per_rank_per_step": training / args.nproc / args.steps,
                     "counted_bytes_sent_rank0": res["counted"].get("bytes_sent")})
        print(f"{method}: {res['os_bytes'] / 1e6:.2f} MB on loopback", flush=True)
    dense = next((r for r in rows if r["method"] == "dense"), None)
    print(f"\nDDP, {args.nproc} ranks, {params} parameters, {args.steps} steps; bytes counted by the kernel")
    print("(training: from after DDP's initial parameter broadcast to the end; run: everything, rendezvous included)")
    print(f"{'method':>12} {'MB run':>9} {'MB training':>12} {'KB/rank/step':>13} {'fewer (run)':>12} "
          f"{'fewer (training)':>17}")
    for r in rows:
        r["ratio_to_dense"] = dense["os_bytes_total"] / r["os_bytes_total"] if dense else None
        r["ratio_to_dense_training"] = dense["os_bytes_training"] / r["os_bytes_training"] if dense else None
        fmt = lambda x: f"{x:.1f}x" if x else "-"  # noqa: E731
        print(f"{r['method']:>12} {r['os_bytes_total'] / 1e6:>9.2f} {r['os_bytes_training'] / 1e6:>12.2f} "
              f"{r['os_bytes_per_rank_per_step'] / 1e3:>13.1f} {fmt(r['ratio_to_dense']):>12} "
              f"{fmt(r['ratio_to_dense_training']):>17}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"nproc": args.nproc, "steps": args.steps, "parameters": params,
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
