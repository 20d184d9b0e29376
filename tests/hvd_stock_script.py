"""A stock Horovod training script: it imports horovod.torch and torch only, and wraps its optimizer with
hvd.DistributedOptimizer. Under `dsq-horovodrun --dsq-compressor ...` DoubleSqueeze takes over through the import
hook (dsq_autohook); under plain horovodrun it is stock Horovod. Each rank writes OUT/rank{r}.pt: per step its
local gradient and the update, by parameter name; the residuals and counters when DoubleSqueeze ran.

    --process-set 0,1   register that process set at hvd.init and average over it only
"""
import argparse
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

from workload import batch, build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--model", default="single")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--process-set", default=None)
    args = ap.parse_args()

    torch.set_num_threads(1)
    process_set = None
    if args.process_set:
        process_set = hvd.ProcessSet([int(r) for r in args.process_set.split(",")])
        hvd.init(process_sets=[process_set])
    else:
        hvd.init()
    rank = hvd.rank()
    model = build_model(args.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    kwargs = {} if process_set is None else {"process_set": process_set}
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kwargs)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    records = []
    for step in range(args.steps):
        opt.zero_grad()
        x, y = batch(step, 0, rank, args.model)
        ((model(x) - y) ** 2).mean().backward()
        rec = {"g": {n: p.grad.detach().reshape(-1).clone() for n, p in model.named_parameters()}}
        opt.synchronize()
        rec["c"] = {n: p.grad.detach().reshape(-1).clone() for n, p in model.named_parameters()}
        records.append(rec)
        with opt.skip_synchronize():
            opt.step()
    dsq = getattr(opt, "doublesqueeze", None)
    result = {"records": records, "dsq": dsq is not None, "class_module": type(opt).__module__,
              "imported_horovod_ext_in_script": "horovod_ext" in sys.modules and dsq is None}
    if dsq is not None:
        result.update(worker_residual={k: v.clone() for k, v in dsq.worker_residuals().items()},
                      server_residual={k: dsq.expand_server_residual(k, v, dict(model.named_parameters())[k].numel())
                                       for k, v in dsq.server_residuals().items()},
                      totals=dsq.totals.as_dict(), config=dsq.config.to_dict(), world=dsq.world_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{rank}.pt")
    hvd.allreduce(torch.zeros(1), name="done")      # no rank leaves (and shuts Horovod down) while others work


if __name__ == "__main__":
    main()
