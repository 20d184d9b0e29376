"""Runs under the deepspeed launcher (or torchrun): stock `deepspeed.initialize` with a `dsq.DoubleSqueezeAdamW` as
its optimizer and no "doublesqueeze" section, recording what tests/test_optim.py checks (as tests/adamw_worker.py
does under DDP): per step the parameters after it; at the end the momentum's bytes. --refuse-with
builds an engine the optimizer cannot run in and records the error."""
import argparse
import json
import os
from pathlib import Path

import deepspeed
import torch

import dsq_plugins as dsq
from checks import run_cases, shut_down_and_exit
from workload import batch, build_model


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compressor", default="sign")
    ap.add_argument("--warmup-compressor", default="int4:128")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--load", default=None)
    ap.add_argument("--refuse-with", default=None,
                    help="a JSON list of dicts, each merged into the DeepSpeed config in turn: the errors are recorded")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return ap


def main():
    torch.set_num_threads(1)
    run_cases(parser, run, lambda: int(os.environ.get("RANK", "0")))   # --cases: many runs in one launch
    shut_down_and_exit()


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("multi")
    names = [n for n, _ in model.named_parameters()]
    cfg = dsq.DoubleSqueezeConfig(compressor=args.compressor, block_size=256, min_numel=16, guard=0.0)
    wcfg = dsq.DoubleSqueezeConfig(compressor=args.warmup_compressor, block_size=256, min_numel=16)
    opt = dsq.DoubleSqueezeAdamW(model.parameters(), lr=args.lr, weight_decay=0.1, warmup_steps=args.warmup,
                                 config=cfg, warmup_config=wcfg)
    ds_config = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 6, "gradient_clipping": 0.0, "zero_optimization": {"stage": 0}}
    if args.refuse_with:
        errors = []
        for extra in json.loads(args.refuse_with):
            opt = dsq.DoubleSqueezeAdamW(model.parameters(), lr=args.lr, warmup_steps=args.warmup)
            try:
                deepspeed.initialize(model=model, optimizer=opt, config=dict(ds_config, **extra))
                errors.append(None)
            except (NotImplementedError, ValueError) as e:
                errors.append(f"{type(e).__name__}: {e}")
        (out / f"refused{os.environ.get('RANK', '0')}.json").write_text(json.dumps(errors))
        return
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    rank = engine.global_rank
    first = 0
    if args.load:
        engine.load_checkpoint(args.load, tag="ckpt")
        first = opt.steps
        if opt.momentum is not None:       # created by a resharded load (on as many ranks: at the first step)
            torch.save(_momentum_residuals(opt, model, names), out / f"loaded{rank}.pt")
    records = []
    for step in range(first, args.steps):
        x, y = batch(step, 0, rank, "multi")
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
        records.append({"param": {n: p.detach().clone() for n, p in zip(names, model.parameters())}})
        if step + 1 == args.save_at:
            engine.save_checkpoint(str(out), tag="ckpt")
            torch.save(_momentum_residuals(opt, model, names), out / f"held{rank}.pt")     # this run's own record
    torch.save({"records": records, "allreduce": engine.enable_backward_allreduce,
                "momentum_bytes": opt.momentum.totals.bytes_sent}, out / f"rank{rank}.pt")


def _momentum_residuals(opt, model, names) -> dict:
    """The momentum collective's worker residual and owned server blocks (in place, zeros elsewhere) by name."""
    m = opt.momentum
    return {"worker": {names[k]: v.clone() for k, v in m.worker_residuals().items()},
            "server": {names[k]: m.expand_server_residual(k, v, model.get_parameter(names[k]).numel()).clone()
                       for k, v in m.server_residuals().items()}, "steps": opt.steps}


if __name__ == "__main__":
    main()
