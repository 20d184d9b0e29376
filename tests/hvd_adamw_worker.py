"""Runs under horovodrun: `dsq.DoubleSqueezeAdamW` on Horovod (its communicator, a plain model: no
hvd.DistributedOptimizer), recording per step the parameters, as tests/adamw_worker.py does under torchrun."""
import argparse
from pathlib import Path

import horovod.torch as hvd
import torch

import dsq_plugins as dsq
from checks import run_cases
from horovod_ext.communicator import HorovodCommunicator
from workload import batch, build_model


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compressor", default="sign")
    ap.add_argument("--warmup-compressor", default="int4:128")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    return ap


def main():
    torch.set_num_threads(1)
    hvd.init()
    run_cases(parser, run, hvd.rank)      # --cases: many runs in one launch
    hvd.allreduce(torch.zeros(1), name="done")


def run(args) -> None:
    model = build_model("multi")
    names = [n for n, _ in model.named_parameters()]
    cfg = dsq.DoubleSqueezeConfig(compressor=args.compressor, block_size=256, min_numel=16, guard=0.0)
    wcfg = dsq.DoubleSqueezeConfig(compressor=args.warmup_compressor, block_size=256, min_numel=16)
    opt = dsq.DoubleSqueezeAdamW(model.parameters(), lr=args.lr, weight_decay=0.1, warmup_steps=args.warmup,
                                 config=cfg, warmup_config=wcfg, communicator=HorovodCommunicator())
    records = []
    for step in range(args.steps):
        x, y = batch(step, 0, hvd.rank(), "multi")
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        records.append({"param": {n: p.detach().clone() for n, p in zip(names, model.parameters())}})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"records": records, "bytes_sent": opt.bytes_sent()}, out / f"rank{hvd.rank()}.pt")


if __name__ == "__main__":
    main()
