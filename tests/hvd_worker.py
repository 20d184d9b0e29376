"""Runs under real horovodrun (Gloo): training with horovod_ext.DistributedOptimizer, recording what the tests
check. Each rank writes OUT/rank{r}.pt: per step its local (accumulated) gradient and the averaged update the
optimizer produced, by parameter name; at the end its residuals (server residual: this rank's blocks, zero
elsewhere) and the collective's counters. Blocks of 256 elements unless --block-size says otherwise.

Modes: `explicit` passes compression=Compression.from_spec(--compressor); `flag` names no compressor (the
dsq-horovodrun flag, if any, decides); `stock` hands the compressor to Horovod's own hvd.DistributedOptimizer.
"""
import argparse
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_ext
from checks import residuals_by_name, run_cases
from workload import batch, build_model
from dsq_plugins.config import DoubleSqueezeConfig


def residuals(opt, model):
    return residuals_by_name(opt.doublesqueeze, [(n, p.numel()) for n, p in model.named_parameters()])


def run(args, spec, out: Path, tag: str):
    rank = hvd.rank()
    model = build_model(args.model)
    base = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    kwargs = dict(named_parameters=model.named_parameters(), backward_passes_per_step=args.accum,
                  op=hvd.Sum if args.op == "sum" else hvd.Average, gradient_predivide_factor=args.predivide)
    if args.mode == "stock":
        opt = hvd.DistributedOptimizer(base, compression=horovod_ext.Compression.from_spec(spec), **kwargs)
    elif args.mode == "flag":
        opt = horovod_ext.DistributedOptimizer(base, **kwargs)
    else:
        cfg = DoubleSqueezeConfig(compressor=spec, server_compressor=args.server_compressor,
                                  worker_ef=not args.no_worker_ef, server_ef=not args.no_server_ef,
                                  warmup_steps=args.warmup, min_numel=args.min_numel, bucket_mb=args.bucket_mb,
                                  block_size=args.block_size, **({"policy": args.policy, "guard": 0.0}
                                                                 if args.policy else {}))
        opt = horovod_ext.DistributedOptimizer(base, config=cfg, **kwargs)
    dsq = getattr(opt, "doublesqueeze", None)

    if args.load:
        ckpt = torch.load(f"{args.load}/ckpt_{tag}_rank{rank}.pt", weights_only=False)
        try:
            opt.load_state_dict(ckpt["opt"])
        except ValueError as e:
            (out / f"error{rank}.txt").write_text(str(e))
            return
        model.load_state_dict(ckpt["model"])
    # What every Horovod script does: rank 0's weights and optimizer state everywhere.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    step_after_broadcast = dsq.step if dsq else None

    records, snapshots, zero_grad_error = [], [], None
    for step in range(args.first_step, args.first_step + args.steps):
        opt.zero_grad()
        named = list(model.named_parameters())
        local = {n: torch.zeros(p.numel(), dtype=p.dtype) for n, p in named}
        for micro in range(args.accum):
            x, y = batch(step, micro, rank, args.model)
            loss = ((model(x) - y) ** 2).mean()
            if step == args.nan_at and rank == args.nan_rank:
                loss = loss * float("nan")
            # The local gradient, taken apart from p.grad: Horovod's own hooks all-reduce p.grad in place on
            # its background thread while backward runs, so a copy of p.grad after backward may be averaged.
            for (n, _), g in zip(named, torch.autograd.grad(loss, [p for _, p in named], retain_graph=True)):
                local[n] += g.reshape(-1)
            loss.backward()
        if dsq and step == args.first_step:
            try:
                opt.zero_grad()
            except AssertionError as e:     # as in Horovod: not between backward and step
                zero_grad_error = str(e)
        rec = {"step": step, "g": local}
        opt.synchronize()
        rec["c"] = {n: p.grad.detach().reshape(-1).clone() for n, p in model.named_parameters()}
        records.append(rec)
        if dsq:
            snapshots.append(residuals(opt, model))
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            with opt.skip_synchronize():
                opt.step()
        if step + 1 == args.save_at:
            torch.save({"opt": opt.state_dict(), "model": model.state_dict()}, out / f"ckpt_{tag}_rank{rank}.pt")

    result = {"records": records, "world": hvd.size(), "class_module": type(opt).__module__,
              "zero_grad_error": zero_grad_error,
              "dsq": dsq is not None, "step_after_broadcast": step_after_broadcast,
              "params": {n: p.detach().clone() for n, p in model.named_parameters()}}
    if dsq:
        w, s = residuals(opt, model)
        result.update(worker_residual=w, server_residual=s, snapshots=snapshots, step=dsq.step,
                      skipped_steps=dsq.skipped_steps, totals=dsq.totals.as_dict(), config=dsq.config.to_dict(),
                      auto=None if dsq.auto is None else {"history": dsq.auto.history, "flushes": dsq.flushes},
                      buckets=len(opt._buckets))
        if dsq.monitor is not None:
            dsq.monitor.close()
    torch.save(result, out / f"{tag}_rank{rank}.pt")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mode", choices=["explicit", "flag", "stock"], default="explicit")
    ap.add_argument("--model", default="multi")
    ap.add_argument("--compressors", default="sign", help="comma list: one training run each")
    ap.add_argument("--server-compressor", default=None)
    ap.add_argument("--no-worker-ef", action="store_true")
    ap.add_argument("--no-server-ef", action="store_true")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--policy", default=None, help="DoubleSqueezeConfig.policy as text (the guard then off)")
    ap.add_argument("--min-numel", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--first-step", type=int, default=0)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--op", choices=["average", "sum"], default="average")
    ap.add_argument("--predivide", type=float, default=1.0)
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--nan-rank", type=int, default=1)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--load", default=None)
    return ap


def main():
    torch.set_num_threads(1)
    hvd.init()
    run_cases(parser, every_compressor, hvd.rank)      # --cases: many runs in one launch


def every_compressor(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"started{hvd.rank()}").touch()
    for spec in args.compressors.split(","):
        run(args, spec, out, spec.replace(":", "_"))


if __name__ == "__main__":
    main()
