"""Runs under torchrun: DDP training with the DoubleSqueeze hook, recording what the tests check.

Each rank writes OUT/rank{r}.pt with, per step, its local gradient and the update DDP handed back (by parameter
name), and at the end its residuals by parameter name and the state's counters.
"""
import argparse
import pickle
from contextlib import nullcontext
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
    ap.add_argument("--model", default="multi")
    ap.add_argument("--compressor", default="sign",
                    help="a spec, or a comma list: one training run each, written to OUT/<spec>/ (one launch)")
    ap.add_argument("--server-compressor", default=None)
    ap.add_argument("--candidates", default=None, help="under --compressor auto: its candidates ('a;b')")
    ap.add_argument("--no-worker-ef", action="store_true")
    ap.add_argument("--no-server-ef", action="store_true")
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--min-numel", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--bucket-mb", type=float, default=0.01)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--first-step", type=int, default=0)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--nan-at", type=int, default=-1)
    ap.add_argument("--nan-rank", type=int, default=1)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--load", default=None)
    ap.add_argument("--expect-load-error", action="store_true")
    ap.add_argument("--pickled", action="store_true", help="resume from the pickled state, not state_dict()")
    ap.add_argument("--load-rank", type=int, default=-1, help="load this rank's checkpoint on every rank")
    ap.add_argument("--load-all", action="store_true", help="resume from every saved rank's state (load_resharded)")

    ap.add_argument("--policy", default=None, help="DoubleSqueezeConfig.policy, as text")
    ap.add_argument("--guard", type=float, default=0.1)
    ap.add_argument("--attach", action="store_true", help="name the parameters: DoubleSqueezeState(module=ddp)")
    ap.add_argument("--state-before-init", action="store_true",
                    help="build the DoubleSqueezeState before init_process_group (as Lightning does)")
    return ap


def main():
    torch.set_num_threads(1)
    run_cases(parser, run, dist.get_rank)      # --cases: many runs in one launch
    shut_down_and_exit()


def run(args) -> None:
    specs = args.compressor.split(",")
    early = None
    if args.state_before_init:
        assert not dist.is_initialized(), "--state-before-init needs a launch of its own"
        early = dsq.DoubleSqueezeState(make_config(args, specs[0]))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    if len(specs) == 1:
        train(args, specs[0], Path(args.out), early)
    else:
        for spec in specs:
            train(args, spec, Path(args.out) / spec.replace(":", "_"), None)


def train(args, spec, out: Path, early):
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model)
    names = {id(p): n for n, p in model.named_parameters()}
    ddp = DDP(model, bucket_cap_mb=args.bucket_mb)      # 0.01: ~2600 floats per bucket: several buckets, a rebuild
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=args.momentum)
    state = early or dsq.DoubleSqueezeState(make_config(args, spec))
    if args.attach:
        state.attach(ddp)

    if args.load:
        src = rank if args.load_rank < 0 else args.load_rank
        if args.load_all:
            every = [torch.load(f, weights_only=False) for f in sorted(Path(args.load).glob("ckpt_rank*.pt"))]
            ckpt = every[0]
        else:
            ckpt = torch.load(f"{args.load}/ckpt_rank{src}.pt", weights_only=False)
        try:
            if args.load_all:
                state.load_resharded([c["dsq"] for c in every])
            elif args.pickled:
                state = pickle.loads(ckpt["pickled"])
            else:
                state.load_state_dict(ckpt["dsq"])
        except ValueError as e:
            if args.expect_load_error:
                (out / f"error{rank}.txt").write_text(str(e))
                return
            raise
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])

    records = []

    buckets_seen = set()

    def recording_hook(st, bucket):
        params = bucket.parameters()
        buckets_seen.add(bucket.index())
        local = bucket.buffer().clone()
        fut = dsq.doublesqueeze_hook(st, bucket)
        rec = records[-1]
        for p, g in zip(params, local.split([p.numel() for p in params])):
            rec["g"][names[id(p)]] = g.clone()
        return fut

    ddp.register_comm_hook(state, recording_hook)

    def residuals():
        w, s = {}, {}
        for p, ew, es in state.parameter_residuals():
            if ew is not None:
                w[names[id(p)]] = ew.clone()
            if es is not None:
                s[names[id(p)]] = es.clone()
        return w, s

    snapshots = []
    for step in range(args.first_step, args.first_step + args.steps):
        records.append({"step": step, "g": {}, "c": {}})
        opt.zero_grad()
        for micro in range(args.accum):
            x, y = batch(step, micro, rank, args.model)
            ctx = ddp.no_sync() if micro < args.accum - 1 else nullcontext()
            with ctx:
                loss = ((ddp(x) - y) ** 2).mean()
                if step == args.nan_at and rank == args.nan_rank:
                    loss = loss * float("nan")
                loss.backward()
        for n, p in model.named_parameters():
            records[-1]["c"][n] = p.grad.detach().reshape(-1).clone()
        snapshots.append(residuals())
        if all(torch.isfinite(p.grad).all() for p in model.parameters()):
            opt.step()
        if step + 1 == args.save_at:
            torch.save({"dsq": state.state_dict(), "pickled": pickle.dumps(state), "model": model.state_dict(),
                        "opt": opt.state_dict()}, out / f"ckpt_rank{rank}.pt")

    w, s = residuals()
    torch.save({"records": records, "worker_residual": w, "server_residual": s, "snapshots": snapshots,
                "skipped_steps": state.skipped_steps, "step": state.step, "buckets_seen": len(buckets_seen),
                "totals": state.totals.as_dict(),
                "auto": None if state.auto is None else {"history": state.auto.history, "times": state.auto.times,
                                                         "switches": state.auto.switches, "flushes": state.flushes},
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                # the key each parameter's residuals and seeds go by in the hook: its number
                "keys": dict(zip((n for n, _ in model.named_parameters()),
                                 state.parameter_numbers([p for _, p in model.named_parameters()]))),
                "world": world, "policy": state.policy_report(),
                "guard": state.guard_report()}, out / f"rank{rank}.pt")
    state.drain()


def make_config(args, spec):
    candidates = None if args.candidates is None else args.candidates.replace(";", ",")
    return dsq.DoubleSqueezeConfig(compressor=spec, server_compressor=args.server_compressor, candidates=candidates,
                                   worker_ef=not args.no_worker_ef, server_ef=not args.no_server_ef,
                                   warmup_steps=args.warmup, min_numel=args.min_numel, block_size=args.block_size,
                                   policy=args.policy, guard=args.guard)


if __name__ == "__main__":
    main()
