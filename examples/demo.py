"""The main demo (`make demo`): DoubleSqueeze against dense SGD and two weaker baselines, on the digits data.

Run under torchrun (this is what `make demo` does, with 4 ranks)::

    torchrun --standalone --nproc-per-node 4 examples/demo.py --outdir runs/demo

In one run, with the same seeds, initial weights and data order, PyTorch DDP trains the same MLP five ways:

    dense            plain DDP all-reduce of fp32 gradients
    dsq-sign         DoubleSqueeze, 1-bit sign (with a scale) in both passes, both residuals
    dsq-topk:0.01    DoubleSqueeze, top-1% in both passes, both residuals
    sign-no-ef       sign in both passes without any error feedback (plain compressed SGD)
    sign-1pass-ef    worker-side error feedback, dense downlink (single-pass EF, MEM-SGD)

Rank 0 prints a table: test accuracy, final training loss (on the whole training set), MB sent per worker
(counted payload bytes; for dense, what a ring all-reduce sends: 2 (W - 1) / W of the gradients per step), and
the modelled time on 100 Mbit/s and 1 Gbit/s links: the run's measured time on this machine (forward,
backward, compression and the optimizer; the loopback wire is nearly free) plus the bytes sent per worker over
the bandwidth. It writes PNG plots (loss against steps, accuracy against MB sent, loss against modelled time),
TensorBoard logs (OUTDIR/tb/METHOD: loss, accuracy, and the hook's bytes, residuals and compression error) and
OUTDIR/results.json.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import dsq_plugins as dsq
from digits_common import accuracy, digits, mlp, ring_allreduce_hook, train_epochs

METHODS = {
    "dense": None,
    "dsq-sign": dict(compressor="sign"),
    "dsq-topk:0.01": dict(compressor="topk:0.01"),
    "sign-no-ef": dict(compressor="sign", worker_ef=False, server_ef=False),
    "sign-1pass-ef": dict(compressor="sign", server_compressor="none"),
}
LINKS = {"100 Mbit/s": 100e6, "1 Gbit/s": 1e9}      # bits per second


class Recorder(dsq.Monitor):
    """Rank 0's record of a run: after each step the loss, seconds since the start and bytes sent so far; after
    each epoch the test accuracy. Everything also goes to TensorBoard when `tb` is given."""

    def __init__(self, bytes_sent, tb=None):
        super().__init__()
        self.bytes_sent, self.tb = bytes_sent, tb
        self.t0 = time.perf_counter()
        self.steps, self.losses, self.seconds, self.bytes = [], [], [], []
        self.epochs = []              # (step, bytes sent, test accuracy)

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        if tag == "train/loss":
            self.steps.append(step + 1)
            self.losses.append(value)
            self.seconds.append(time.perf_counter() - self.t0)
            self.bytes.append(self.bytes_sent())
        elif tag == "test/accuracy":
            self.epochs.append((step, self.bytes_sent(), value))
        if self.tb:
            self.tb.log_scalar(tag, value, step)


def train(name: str, args, data, rank: int, world: int) -> dict:
    x_tr, y_tr, x_te, y_te = data
    model = mlp(args.seed, args.hidden)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    tb = dsq.TensorBoardMonitor(str(Path(args.outdir) / "tb" / name.replace(":", "_"))) if rank == 0 else None
    if METHODS[name] is None:
        counter = {"bytes": 0}
        ddp.register_comm_hook(counter, ring_allreduce_hook)
        sent = lambda: counter["bytes"]  # noqa: E731
    else:
        state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(seed=args.seed, block_size=args.block_size,
                                                               **METHODS[name]), monitor=tb)
        ddp.register_comm_hook(state, dsq.doublesqueeze_hook)
        sent = lambda: state.totals.bytes_sent  # noqa: E731
    rec = Recorder(sent, tb)
    run = train_epochs(model, ddp, opt, data, rank, world, args, rec if rank == 0 else None, desc=f"{name:>14}")
    if tb:
        tb.close()
    with torch.no_grad():
        final_loss = float(nn.functional.cross_entropy(model(x_tr), y_tr))
    # Each block has one owner, so ranks send different amounts; the busiest rank sets the pace on a shared link.
    busiest = torch.tensor([float(sent())], dtype=torch.float64)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX)
    most = float(busiest)
    return {"method": name, "config": METHODS[name], "accuracy": accuracy(model, x_te, y_te),
            "final_loss": final_loss, "mb_sent_per_worker": most / 1e6, "steps": run["steps"],
            "measured_seconds": run["seconds"],
            "modelled_seconds": {link: run["seconds"] + most * 8 / bps for link, bps in LINKS.items()},
            "curve": {"step": rec.steps, "loss": rec.losses, "seconds": rec.seconds, "bytes": rec.bytes},
            "epochs": [{"step": s, "bytes": b, "accuracy": a} for s, b, a in rec.epochs]}


def smooth(xs, beta=0.9):
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def plot(results, outdir: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(outdir / name, dpi=100)
        plt.close(fig)
        paths.append(outdir / name)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        ax.plot(r["curve"]["step"], smooth(r["curve"]["loss"]), label=r["method"])
    ax.set(xlabel="step", ylabel="training loss (rank 0, smoothed)", yscale="log", title="Loss against steps")
    ax.legend()
    save(fig, "loss_vs_steps.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        ax.plot([e["bytes"] / 1e6 for e in r["epochs"]], [e["accuracy"] for e in r["epochs"]], marker=".",
                label=r["method"])
    ax.set(xlabel="MB sent per worker (log)", ylabel="test accuracy", xscale="log", ylim=(0.5, 1.0),
           title="Accuracy against bytes sent")
    ax.legend()
    save(fig, "accuracy_vs_mb.png")

    fig, axes = plt.subplots(1, len(LINKS), figsize=(10, 4.2), sharey=True)
    for ax, (link, bps) in zip(axes, LINKS.items()):
        for r in results:
            c = r["curve"]
            ax.plot([s + b * 8 / bps for s, b in zip(c["seconds"], c["bytes"])], smooth(c["loss"]), label=r["method"])
        ax.set(xlabel="modelled seconds", yscale="log", title=f"{link} links")
    axes[0].set_ylabel("training loss (rank 0, smoothed)")
    fig.suptitle("Loss against modelled time: measured compute + bytes sent per worker / bandwidth")
    axes[0].legend()
    save(fig, "loss_vs_modelled_time.png")
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from: {', '.join(METHODS)}")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--hidden", type=int, default=1024, help="MLP width (1024: about 1.1M parameters)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=4096, help="elements per compressed block")
    ap.add_argument("--outdir", default="runs/demo")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = digits(args.seed)
    if rank == 0:
        params = sum(p.numel() for p in mlp(args.seed, args.hidden).parameters())
        print(f"DoubleSqueeze demo: digits ({data[0].shape[0]} training images), MLP with {params} parameters, "
              f"{world} DDP ranks (gloo), {args.epochs} epochs of {args.batch_size} images per rank per step")
    results = [train(m, args, data, rank, world) for m in methods]
    if rank == 0:
        outdir = Path(args.outdir)
        report(results, world, args)
        paths = plot(results, outdir)
        (outdir / "results.json").write_text(json.dumps({"world_size": world, "epochs": args.epochs,
                                                         "batch_size": args.batch_size, "lr": args.lr,
                                                         "links_bps": LINKS, "results": results}))
        print(f"\nplots: {', '.join(str(p) for p in paths)}")
        print(f"figures: {outdir / 'results.json'}")
        print(f"TensorBoard: tensorboard --logdir {outdir / 'tb'}")
    dist.barrier()          # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


def report(results, world: int, args) -> None:
    dense = next((r for r in results if r["method"] == "dense"), None)
    links = list(LINKS)
    print(f"\n{'method':>14} {'test acc':>9} {'final loss':>11} {'MB/worker':>10} {'fewer':>7} "
          + " ".join(f"{'s on ' + link:>16}" for link in links))
    for r in results:
        fewer = f"{dense['mb_sent_per_worker'] / r['mb_sent_per_worker']:.1f}x" if dense else "-"
        times = " ".join(f"{r['modelled_seconds'][link]:>16.2f}" for link in links)
        print(f"{r['method']:>14} {r['accuracy']:>9.4f} {r['final_loss']:>11.4f} {r['mb_sent_per_worker']:>10.2f} "
              f"{fewer:>7} {times}")
    measured = ", ".join(f"{r['method']} {r['measured_seconds']:.1f}s" for r in results)
    print(f"\n{world} ranks, {results[0]['steps']} steps each. MB/worker: what the busiest rank sent. Modelled time "
          f"= this run's measured time on this machine ({measured}) + MB/worker over the link.")


if __name__ == "__main__":
    main()
