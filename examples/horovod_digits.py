"""Horovod on scikit-learn's digits data: a plain Horovod training script that DoubleSqueeze switches on by
the launcher flag alone (the script names no compressor).

Plain Horovod (allreduce):
    horovodrun -np 2 --gloo -H localhost:2 python examples/horovod_digits.py
DoubleSqueeze, 1-bit sign on both passes, TensorBoard metrics in runs/horovod:
    dsq-horovodrun --dsq-compressor sign --dsq-logdir runs/horovod -np 2 --gloo -H localhost:2 \\
        python examples/horovod_digits.py

Rank 0 prints the test accuracy, the MB each worker sent, and `final_accuracy=0.XXXX` as its last line;
--json writes the figures.
"""
import argparse
import json
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_ext
from digits_common import accuracy, digits, mlp, train_epochs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32, help="per rank")
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    hvd.init()
    rank, world = hvd.rank(), hvd.size()
    data = digits(args.seed)
    x_te, y_te = data[2], data[3]
    model = mlp(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    optimizer = horovod_ext.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(optimizer, root_rank=0)
    dsq = getattr(optimizer, "doublesqueeze", None)        # None: plain Horovod
    monitor = dsq.monitor if dsq else None

    run = train_epochs(model, model, optimizer, data, rank, world, args, monitor,
                       desc=dsq.config.compressor if dsq else "horovod")
    step, seconds = run["steps"], run["seconds"]
    acc = accuracy(model, x_te, y_te)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Plain Horovod: what a ring allreduce sends per rank, 2 (W - 1) / W of the gradients each step.
    sent = dsq.totals.bytes_sent if dsq else 2 * (world - 1) * grad_bytes * step // world
    if monitor:
        monitor.close()
    if rank == 0:
        method = f"doublesqueeze {dsq.config.compressor}" if dsq else "horovod allreduce"
        print(f"Horovod on digits, {world} ranks, {args.epochs} epochs, {method}: test accuracy {acc:.4f}, "
              f"{sent / 1e6:.3f} MB sent per worker, {seconds:.1f} s")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({
                "world_size": world, "doublesqueeze": dsq is not None,
                "config": dsq.config.to_dict() if dsq else None, "accuracy": acc, "steps": step,
                "mb_sent_per_worker": sent / 1e6, "seconds": seconds}, indent=2))
        print(f"final_accuracy={acc:.4f}")


if __name__ == "__main__":
    main()
