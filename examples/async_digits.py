"""The asynchronous parameter server on scikit-learn's bundled digits data: an MLP, one data shard per worker.

Run it under the launcher (3 workers, 1-bit sign compression both ways, staleness bound 8)::

    dsq-async-ps --num-workers 3 --compressor sign --max-staleness 8 --logdir runs/async -- \\
        python examples/async_digits.py --epochs 30

Every worker trains on its shard (``DSQ_PS_WORKER`` modulo ``DSQ_PS_NUM_WORKERS``) and pushes each step's
update; when all are done, worker 0 pulls the server's final model and prints ``final_accuracy=0.XXXX`` on the
test split as the job's last line. The training-loop part is the four lines marked ``# async_ps``.
"""
import argparse
import os
import time

import torch
import torch.nn as nn
from digits_common import accuracy, digits, mlp

import async_ps


def shard_index(worker_id: str, n: int) -> int:
    digits_only = "".join(ch for ch in worker_id.rsplit("-", 1)[-1] if ch.isdigit())
    return int(digits_only or 0) % n


def tally(sums: dict, worker) -> None:
    """Fold the worker's push records into sums by (server, server incarnation, checkpoint number, status): of
    ``scale * c``, of ``c`` and of the raw update ``u`` (per parameter), and drop the records."""
    for r in worker.records:
        if r["kind"] != "push":
            continue
        for part in r["parts"]:
            key = (part["server"], part["epoch"], part["ck"], part["status"])
            acc = sums.setdefault(key, {"scaled": [torch.zeros_like(c, dtype=torch.float64) for c in r["sent"]],
                                        "sent": [torch.zeros_like(c) for c in r["sent"]],
                                        "update": [torch.zeros_like(u) for u in r["update"]]})
            for i, (c, u) in enumerate(zip(r["sent"], r["update"])):
                acc["scaled"][i] += part["scale"] * c.double()
                acc["sent"][i] += c
                acc["update"][i] += u
    worker.records.clear()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0, help="extra seconds per step (simulate a slow worker)")
    p.add_argument("--record-dir", default=None,
                   help="write every push (sent and raw update, each server's outcome) and the final residuals to "
                        "DIR/worker-ID.pt, for checking the conservation laws (the tests do)")
    args = p.parse_args()
    torch.set_num_threads(1)
    n = int(os.environ.get("DSQ_PS_NUM_WORKERS", "1"))
    wid = os.environ.get("DSQ_PS_WORKER", "0")
    rank = shard_index(wid, n)
    x_tr, y_tr, x_te, y_te = digits(args.seed)
    x_tr, y_tr = x_tr[rank::n], y_tr[rank::n]

    model = mlp(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    worker = async_ps.Worker.from_env(model, optimizer, record=bool(args.record_dir))   # async_ps: join, pull
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    loss_fn = nn.CrossEntropyLoss()
    sums = {}
    for epoch in range(args.epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i:i + args.batch]
            optimizer.zero_grad()
            loss = loss_fn(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            if args.sleep:
                time.sleep(args.sleep)
            worker.step(loss=loss.item())                                 # async_ps: push, pull
            if args.record_dir:
                tally(sums, worker)
    if rank == 0:
        worker.finish()                                                   # async_ps: wait for all, exact pull
        print(f"worker {wid}: {worker.accepted} pushes applied, {worker.rejected} rejected, "
              f"{worker.rejoins} rejoins", flush=True)
        print(f"final_accuracy={accuracy(model, x_te, y_te):.4f}", flush=True)
    else:
        worker.finish(wait=False)
    if args.record_dir:
        torch.save({"sums": sums, "residuals": worker.residuals(),
                    "params": [p.detach().clone() for p in model.parameters()], "keys": worker.keys,
                    "recovered": worker.recovered}, os.path.join(args.record_dir, f"worker-{wid}.pt"))
    worker.close()                                                        # async_ps: leave


if __name__ == "__main__":
    main()
