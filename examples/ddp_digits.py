"""PyTorch DDP on scikit-learn's bundled digits data: plain all-reduce against the DoubleSqueeze hook.

Run under torchrun (this is what `make demo` does)::

    torchrun --standalone --nproc-per-node 2 examples/ddp_digits.py --methods dense,sign --logdir runs/demo

Every method trains the same MLP from the same initial weights on the same data order. Rank 0 prints a table of
test accuracy, final training loss and MB sent per worker, writes TensorBoard logs to LOGDIR/METHOD (loss,
accuracy, and the hook's bytes, residuals and compression error), and with --json writes the figures.
"""
import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dsq_plugins as dsq
from digits_common import accuracy, digits, mlp, ring_allreduce_hook, train_epochs


def train(method: str, args, data, rank: int, world: int) -> dict:
    _, _, x_te, y_te = data
    model = mlp(args.seed)
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    logdir = Path(args.logdir) / method.replace(":", "_") if args.logdir else None
    monitor = dsq.TensorBoardMonitor(str(logdir)) if logdir and rank == 0 else None
    if method == "dense":
        counter = {"bytes": 0}
        ddp.register_comm_hook(counter, ring_allreduce_hook)
    else:
        state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor=method, seed=args.seed), monitor=monitor)
        ddp.register_comm_hook(state, dsq.doublesqueeze_hook)
    run = train_epochs(model, ddp, opt, data, rank, world, args, monitor, desc=f"{method:>10}")
    sent = counter["bytes"] if method == "dense" else state.totals.bytes_sent
    if monitor:
        monitor.close()
    out = {"method": method, "accuracy": accuracy(model, x_te, y_te), "final_loss": run["final_loss"],
           "mb_sent_per_worker": sent / 1e6, "steps": run["steps"], "seconds": run["seconds"],
           "parameters": sum(p.numel() for p in model.parameters())}
    if method != "dense" and state.auto is not None:
        out["auto"] = {"history": state.auto.history, "times": state.auto.times, "final_mode": state.auto.mode}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="dense,sign",
                    help="comma list: 'dense' and/or compressor specs, or 'auto' (chosen from measured step times)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--logdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m != "dense":
            dsq.DoubleSqueezeConfig(compressor=m)      # a bad spec fails here, before any training

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = digits(args.seed)
    results = [train(m, args, data, rank, world) for m in methods]
    if rank == 0:
        dense = next((r for r in results if r["method"] == "dense"), None)
        print(f"\nDDP on digits, {world} ranks, {args.epochs} epochs, {results[0]['parameters']} parameters")
        print(f"{'method':>12} {'test acc':>9} {'final loss':>11} {'MB sent/worker':>15} {'vs dense':>9}")
        for r in results:
            ratio = f"{dense['mb_sent_per_worker'] / r['mb_sent_per_worker']:.1f}x" if dense else "-"
            print(f"{r['method']:>12} {r['accuracy']:>9.4f} {r['final_loss']:>11.4f} "
                  f"{r['mb_sent_per_worker']:>15.3f} {ratio:>9}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"world_size": world, "epochs": args.epochs,
                                                   "results": results}, indent=2))
        if args.logdir:
            print(f"TensorBoard logs: tensorboard --logdir {args.logdir}")
    dist.barrier()          # no rank tears down its connections while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
