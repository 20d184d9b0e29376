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
import sys
import time
from pathlib import Path

from harness import add_arguments, lo_bytes, main_loop, report_counted


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
        report_counted(lo_bytes() - start, times, getattr(opt, "doublesqueeze", None))


def command(args, method):
    """The horovodrun (or dsq-horovodrun) command line of one job."""
    bin_dir = Path(sys.executable).parent
    flags = [] if method in ("stock", "dsq-none") else ["--dsq-compressor", method[len("dsq-"):]]
    launcher = "dsq-horovodrun" if flags else "horovodrun"
    return [str(bin_dir / launcher), *flags, "-np", str(args.nproc), "--gloo", "-H", f"localhost:{args.nproc}",
            sys.executable, __file__, "--worker", "--method", method, "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--hidden", str(args.hidden)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, "stock,dsq-none,dsq-sign")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    for m in args.methods.split(","):
        if m.strip() not in ("stock", "dsq-none") and not m.strip().startswith("dsq-"):
            sys.exit(f"unknown method {m!r}: stock, dsq-none or dsq-SPEC")
    main_loop(args, __file__, command, "Horovod (Gloo)", baseline="stock")


if __name__ == "__main__":
    main()
