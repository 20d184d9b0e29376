"""Runs under torchrun: DDP training with `dsq.DoubleSqueezeAdamW`, recording what tests/test_optim.py checks.

Each rank writes OUT/rank{r}.pt: per step its local gradient (before the optimizer's exchange, by parameter name),
the parameters after the step, and, once the variance is frozen, the whitened momentum and the denominators; at
the freeze and each refresh of the variance, the warm-up collective's residuals; at the end the momentum collective's residuals and the bytes sent.
"""
import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dsq_plugins as dsq
from checks import run_cases, shut_down_and_exit
from workload import batch, build_model


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compressor", default="sign")
    ap.add_argument("--warmup-compressor", default="int4:128")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--refresh", type=int, default=0)
    ap.add_argument("--no-ddp", action="store_true", help="a plain model: the optimizer averages the gradients")
    ap.add_argument("--save-at", type=int, nargs="*", default=[], help="steps after which to save a checkpoint")
    ap.add_argument("--load-step", type=int, default=0, help="with --load: the checkpoint of that step")
    ap.add_argument("--load", default=None)
    ap.add_argument("--load-ranks", type=int, default=0,
                    help="with --load: load every one of that many saved ranks' states (load_resharded)")
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--extra-param", action="store_true", help="the optimizer also gets a parameter DDP does not hold")
    ap.add_argument("--attach-late", action="store_true",
                    help="attach_ddp after loading the checkpoint, instead of ddp= (as the HF Trainer's order)")
    return ap


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run_cases(parser, run, dist.get_rank)      # --cases: many runs in one launch
    shut_down_and_exit()


def run(args) -> None:
    rank = dist.get_rank()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model("multi")
    names = [n for n, _ in model.named_parameters()]
    ddp = model if args.no_ddp else DDP(model)
    cfg = dsq.DoubleSqueezeConfig(compressor=args.compressor, block_size=256, min_numel=16, guard=0.0)
    wcfg = dsq.DoubleSqueezeConfig(compressor=args.warmup_compressor, block_size=256, min_numel=16)
    params = [*ddp.parameters(), *([torch.nn.Parameter(torch.zeros(3))] if args.extra_param else [])]
    opt = dsq.DoubleSqueezeAdamW(params, lr=args.lr, betas=(0.9, args.beta2), weight_decay=0.1,
                                 warmup_steps=args.warmup, variance_refresh=args.refresh, config=cfg,
                                 warmup_config=wcfg, ddp=None if args.no_ddp or args.attach_late else ddp,
                                 module=model)
    first = 0
    if args.load:
        ckpt = torch.load(f"{args.load}/ckpt{args.load_step}_rank{0 if args.load_ranks else rank}.pt",
                          weights_only=False)
        model.load_state_dict(ckpt["model"])
        if args.load_ranks:
            opt.load_resharded([torch.load(f"{args.load}/ckpt{args.load_step}_rank{r}.pt", weights_only=False)["opt"]
                                for r in range(args.load_ranks)])
            torch.save(_residuals(opt, model), out / f"loaded{rank}.pt")
        else:
            opt.load_state_dict(ckpt["opt"])
        first = ckpt["step"]
    if args.attach_late:
        opt.attach_ddp(ddp)
    records = []
    for step in range(first, args.steps):
        x, y = batch(step, 0, rank, "multi")
        if step == args.nan_at and rank == 1:
            x = x.clone()
            x[0, 0] = float("nan")
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        rec = {"grad": {n: p.grad.detach().clone() for n, p in zip(names, model.parameters())}, "frozen": opt.frozen,
               "refresh": opt.refreshing}
        opt.step()
        rec["param"] = {n: p.detach().clone() for n, p in zip(names, model.parameters())}
        if opt.frozen:
            rec["m"] = {n: opt.state[p]["exp_avg"].clone() for n, p in zip(names, model.parameters())}
            rec["denom"] = {n: opt.state[p]["denom"].clone() for n, p in zip(names, model.parameters())}
        if step + 1 == args.warmup or rec["refresh"]:   # what the warm-up's residuals hold at a freeze or refresh
            rec.update(_warmup_residuals(opt, model))
        records.append(rec)
        if step + 1 in args.save_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1},
                       out / f"ckpt{step + 1}_rank{rank}.pt")
            torch.save(_residuals(opt, model), out / f"held{step + 1}_rank{rank}.pt")   # this run's own record
    momentum = opt.momentum
    torch.save({"records": records, "first": first, "names": names,
                "worker_residual": {names[k]: v for k, v in momentum.worker_residuals().items()},
                "server_residual": {names[k]: momentum.expand_server_residual(k, v, model.get_parameter(
                    names[k]).numel()) for k, v in momentum.server_residuals().items()},
                "after": _warmup_residuals(opt, model),
                "momentum_bytes": momentum.totals.bytes_sent, "momentum_steps": momentum.step,
                "bytes_sent": opt.bytes_sent(), "skipped": momentum.skipped_steps}, out / f"rank{rank}.pt")


def _residuals(opt, model) -> dict:
    """Both collectives' residuals by parameter name (the momentum's as `m_worker` and `m_server`, the server's in
    place, zeros elsewhere), and AdamW's state."""
    names = [n for n, _ in model.named_parameters()]
    out = _warmup_residuals(opt, model)
    if opt.momentum is not None:
        m = opt.momentum
        out["m_worker"] = {names[k]: v.clone() for k, v in m.worker_residuals().items()}
        out["m_server"] = {names[k]: m.expand_server_residual(k, v, model.get_parameter(names[k]).numel()).clone()
                           for k, v in m.server_residuals().items()}
    out["state"] = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()
                    if p in opt.state}
    warm = getattr(opt.grads, "collective", opt.grads)       # by key: a resumed DDP hook has not numbered them yet
    if warm is not None:
        out["warm_worker_raw"] = {k: v.clone() for k, v in warm.worker_residuals().items()}
        out["warm_server_raw"] = {k: v.clone() for k, v in warm.server_residuals().items()}
        if hasattr(opt.grads, "number_of"):      # the element counts by key, where the hook has numbered them
            out["warm_numels"] = {opt.grads.number_of(p): p.numel() for p in model.parameters()
                                  if opt.grads.number_of(p) is not None}
    return out


def _warmup_residuals(opt, model) -> dict:
    """The warm-up collective's residuals by parameter name: this rank's worker residual and its owned blocks of
    the server residual (in place, zeros elsewhere). DDP's state numbers parameters in the order its hook first saw
    them (a run resumed after the freeze never numbered them: what it loaded is left out)."""
    state = opt.grads
    if hasattr(state, "collective"):       # DDP's state
        coll = state.collective
        key_name = {state.number_of(p): n for n, p in model.named_parameters() if state.number_of(p) is not None}
        numel = {state.number_of(p): p.numel() for p in model.parameters()}
    else:                                  # the optimizer's own collective: parameters by their number
        coll = state
        key_name = dict(enumerate(n for n, _ in model.named_parameters()))
        numel = dict(enumerate(p.numel() for p in model.parameters()))
    return {"warm_worker": {key_name[k]: v.clone() for k, v in coll.worker_residuals().items() if k in key_name},
            "warm_server": {key_name[k]: coll.expand_server_residual(k, v, numel[k]).clone()
                            for k, v in coll.server_residuals().items() if k in key_name}}


if __name__ == "__main__":
    main()
