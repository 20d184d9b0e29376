"""The engine's costs, side by side in one run: per-rank CPU time of the DDP hook against plain DDP over tensors
and ranks, the stages of one sign round against `clone`, and the persistent memory against the gradient.

1. ``ddp`` (real torchrun + gloo, one job per world size W): a model of P tensors of the same total size (default
   1M fp32 elements; P = 4, 64, 256, 1024), batch 1; each rank times ``time.process_time()`` (every thread of the
   process: gloo's, the hook's communication thread) per step over ``--steps`` steps, plain DDP and DDP with
   ``doublesqueeze_hook`` (sign) alternating in the same job. Printed: seconds per step and the hook's ratio to
   plain DDP; and for each P the hook's time at W=8 over W=2 (the growth with ranks).
2. ``round`` (one process, one thread): one full sign round of 25M elements as rank 0 of W ranks sees it: the
   worker pass (every block), the server pass (the 1/W of blocks it owns, decoding W messages), the downlink decode
   (every block), each as a ratio to ``clone`` of the 25M elements, interleaved with it. The other ranks' messages
   are stand-ins the right size (copies of this rank's own; zeros for the other owners' downlinks): what the stages
   compute does not depend on the bytes.
3. ``memory``: the persistent tensors of one rank (residuals, wire buffers, tail tables, per-thread scratch) for a
   25M-element gradient in 25 MB buckets, at W = 4 and 64, as a multiple of the gradient's size.

Targets (issue "Engine v2"): at W=4 with 256 tensors the hook's CPU per step <= 4x plain DDP's; W=8 over W=2 at
256 tensors <= 1.5x; a full sign round <= 2.5x clone; extra memory <= 1.1x the gradient.

    .venv/bin/python benchmarks/engine.py                         # all three, about 4 minutes here
    .venv/bin/python benchmarks/engine.py --parts round,memory --json runs/bench/engine.json
    .venv/bin/python benchmarks/engine.py --quick                 # smaller and shorter
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dsq_plugins as dsq  # noqa: E402
from dsq_plugins.engine.collective import DoubleSqueezeCollective  # noqa: E402
from dsq_plugins.engine.communicator import Communicator, Pending  # noqa: E402


# ------------------------------------------------------------------------------------------------ 1. DDP jobs
def ddp_worker(args) -> None:
    import torch.distributed as dist
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for p_count in [int(p) for p in args.tensors.split(",")]:
        size = args.numel // p_count

        class Model(nn.Module):
            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.ps = nn.ParameterList([nn.Parameter(torch.randn(size, generator=g)) for _ in range(p_count)])

            def forward(self, w):
                return sum((p * w[i]).sum() for i, p in enumerate(self.ps))

        runs = {}
        for method in ("dense", "dsq-sign"):
            model = Model()
            ddp = DDP(model)
            if method != "dense":
                state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="sign"))
                ddp.register_comm_hook(state, dsq.doublesqueeze_hook)
            opt = torch.optim.SGD(ddp.parameters(), lr=1e-3)
            w = torch.randn(p_count, generator=torch.Generator().manual_seed(rank))
            runs[method] = (ddp, opt, w)
        times = {m: [] for m in runs}
        for step in range(args.warmup + args.steps):
            for method, (ddp, opt, w) in runs.items():          # alternating: both see the same machine
                dist.barrier()
                t0 = time.process_time()
                opt.zero_grad()
                ddp(w).backward()
                opt.step()
                t = time.process_time() - t0
                if step >= args.warmup:
                    times[method].append(t)
        result[p_count] = {m: statistics.median(v) for m, v in times.items()}
        del runs
    if rank == 0:
        print("RESULT", json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def run_ddp(args) -> dict:
    out = {}
    for w in [int(x) for x in args.worlds.split(",")]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={w}", __file__,
               "--ddp-worker", "--tensors", args.tensors, "--numel", str(args.numel), "--steps", str(args.steps),
               "--warmup", str(args.warmup)]
        print(f"  ddp: W={w} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              cwd=ROOT, timeout=3600)
        line = next((l.split("RESULT ", 1)[1] for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out[w] = {int(p): v for p, v in json.loads(line).items()}
    return out


# --------------------------------------------------------------------------------------------- 2. one round
class StandIn(Communicator):
    """Rank `rank` of `size` with no peers: every rank's uplink message to this one is a copy of this rank's own,
    and the other owners' downlink messages are zeros of the right size (valid sign payloads)."""

    def __init__(self, size: int, rank: int = 0):
        self.size, self.rank = size, rank

    def all_to_all_async(self, send, send_sizes, recv_sizes, out=None, name=None):
        start = sum(send_sizes[:self.rank])
        mine = send[start:start + send_sizes[self.rank]]
        out = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=send.device) if out is None else out
        out.view(self.size, -1).copy_(mine)
        return Pending.done(out)

    def all_gather_async(self, send, sizes, out=None, name=None):
        out = torch.zeros(sum(sizes), dtype=torch.uint8, device=send.device) if out is None else out.zero_()
        start = sum(sizes[:self.rank])
        out[start:start + sizes[self.rank]] = send
        return Pending.done(out)

    def all_reduce_sum_async(self, tensor, name=None):
        return Pending.done(tensor.mul_(self.size))


def run_round(args) -> dict:
    torch.set_num_threads(1)
    n, w, device = args.round_numel, args.round_world, torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now():
        sync()
        return time.perf_counter()
    out_doc = {"numel": n, "world": w, "device": str(device), "by_spec": {}}
    for spec in args.round_specs.split(","):
        g = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device)
        col = DoubleSqueezeCollective(dsq.DoubleSqueezeConfig(compressor=spec), StandIn(w))
        items, out = [("weight", g)], [torch.empty(n, device=device)]
        col.reduce(items, out)                              # plans, buffers and scratch are made once
        col.finish_step()
        stages = {"clone": [], "worker_pass": [], "server_pass": [], "downlink_decode": []}
        for _ in range(args.repeats):
            t0 = now()
            g.clone()
            t1 = now()
            ex = col.begin(items)
            t2 = now()
            col.serve(ex)                                   # the residual update, then the server pass
            t3 = now()
            col.end(ex, out)
            t4 = now()
            col.finish_step()
            for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                stages[k].append(v)
        med = {k: statistics.median(v) for k, v in stages.items()}
        clone = med.pop("clone")
        total = sum(med.values())
        out_doc["by_spec"][spec] = {"clone_s": clone, "stages_s": med, "ratios": {k: v / clone for k, v in med.items()},
                                    "total_s": total, "total_ratio": total / clone}
        del col, g, out
    return out_doc


# ----------------------------------------------------------------------------------------------- 3. memory
def run_memory(args) -> dict:
    out = {}
    n, bucket = args.round_numel, 25 * 2 ** 20 // 4
    for w in (4, 64):
        col = DoubleSqueezeCollective(dsq.DoubleSqueezeConfig(compressor="sign"), StandIn(w))
        g = torch.randn(n, device=args.device)
        pieces = list(g.split(bucket))
        for i, piece in enumerate(pieces):
            col.reduce([(f"t{i}", piece)], [torch.empty_like(piece)])
        report = col.memory_report()
        grad = n * 4
        out[w] = {"gradient_bytes": grad, **report, "extra_ratio": report["total"] / grad}
    return out


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="ddp,round,memory")
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--tensors", default="4,64,256,1024")
    ap.add_argument("--numel", type=int, default=1 << 20, help="elements of the DDP model (all tensors)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--round-numel", type=int, default=25_000_000)
    ap.add_argument("--round-world", type=int, default=4)
    ap.add_argument("--round-specs", default="sign", help="compressors of part 2 (comma list)")
    ap.add_argument("--device", default="cpu", help="device of parts 2 and 3 (cuda: the GPU's stages)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="W=2,4; P=4,256; 8 steps; 4M-element round")
    ap.add_argument("--json", default=None)
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args)
        return 0
    if args.quick:
        args.worlds, args.tensors, args.steps, args.warmup = "2,4", "4,256", 8, 2
        args.round_numel, args.repeats = 4_000_000, 3
    parts = set(args.parts.split(","))
    doc = {"torch": torch.__version__, "cpus": os.cpu_count()}
    if "ddp" in parts:
        doc["ddp"] = ddp = run_ddp(args)
        print(f"\n1. DDP per-rank CPU seconds per step ({args.numel} fp32 elements in P tensors, batch 1, gloo):")
        print(f"{'P':>6} " + " ".join(f"{'W=' + str(w) + ' dense':>12} {'hook':>8} {'x':>6}" for w in ddp))
        for p in ddp[next(iter(ddp))]:
            row = []
            for w in ddp:
                d, h = ddp[w][p]["dense"], ddp[w][p]["dsq-sign"]
                row.append(f"{d:>12.4f} {h:>8.4f} {h / d:>6.2f}")
            print(f"{p:>6} " + " ".join(row))
        ws = sorted(ddp)
        if len(ws) > 1:
            growth = {p: ddp[ws[-1]][p]["dsq-sign"] / ddp[ws[0]][p]["dsq-sign"] for p in ddp[ws[0]]}
            doc["hook_growth"] = {"from": ws[0], "to": ws[-1], "ratio": growth}
            print(f"hook W={ws[-1]} over W={ws[0]}: " + ", ".join(f"P={p} {r:.2f}x" for p, r in growth.items()))
    if "round" in parts:
        doc["round"] = rd = run_round(args)
        for spec, r in rd["by_spec"].items():
            print(f"\n2. one {spec} round, {rd['numel']} elements, rank 0 of W={rd['world']} on {rd['device']}"
                  f"{', one thread' if rd['device'] == 'cpu' else ''} (clone {r['clone_s'] * 1e3:.2f} ms):")
            for k, v in r["stages_s"].items():
                print(f"  {k:>16} {v * 1e3:8.2f} ms  {r['ratios'][k]:5.2f}x clone")
            target = "  (target <= 2.5x)" if spec == "sign" else ""
            print(f"  {'total':>16} {r['total_s'] * 1e3:8.2f} ms  {r['total_ratio']:5.2f}x clone{target}")
    if "memory" in parts:
        doc["memory"] = m = run_memory(args)
        print(f"\n3. persistent memory of one rank, {args.round_numel} fp32 gradient elements in 25 MB buckets:")
        for w, rep in m.items():
            parts_txt = ", ".join(f"{k} {v / rep['gradient_bytes']:.3f}x" for k, v in rep.items()
                                  if k not in ("gradient_bytes", "total", "extra_ratio"))
            print(f"  W={w:<3} {rep['extra_ratio']:.3f}x the gradient ({parts_txt})  (target <= 1.1x)")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
