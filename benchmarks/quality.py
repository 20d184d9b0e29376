"""The quality yardstick: DoubleSqueeze's compressors against dense DDP on real models, side by side at equal steps.

One `torchrun` launch (2 ranks, gloo) trains the same model from the same initial weights on the same batches once
per method, and reports for each the validation loss, its gap to dense (relative and absolute), and the bytes a
rank sends per step against dense DDP's (a ring all-reduce sends 2 (W - 1) / W of the gradients per step).

Tasks (`benchmarks/real_models.py`): ``lm`` (a byte-level transformer on the Python standard library's sources),
``digits`` (an MLP), ``cnn`` (a small CNN on the digits). Optimisers: ``adamw`` (linear warm-up, cosine decay,
weight decay 0.01, torch's default betas) and ``sgd`` (momentum 0.9, the same schedule).

Methods (each one word):

    dense               plain DDP
    default             DoubleSqueezeConfig() with nothing passed: the README's one line
    auto                DoubleSqueezeConfig(compressor="auto")
    adamw:SPEC[@warmup=N][@warmup_compressor=S][@refresh=R]
                        `dsq.DoubleSqueezeAdamW` (AdamW only): AdamW on DoubleSqueeze-averaged gradients (S, default
                        int4:128) for N steps (default a fifth of the run), then Adam's variance frozen and the
                        momentum compressed with SPEC; the variance refreshed every R steps (default never)
    fsdp                plain FSDP2 (`fully_shard` on every block, then the model; parameters kept after forward)
    fsdp:SPEC[@downlink=D][@reshard=True][@residual_dtype=T][@K=V...]
                        FSDP2 with `dsq_plugins.fsdp.install` (D: delta, quantized or dense; reshard: the blocks
                        reshard after forward, as ZeRO-3; T: the worker residuals' dtype, e.g. bfloat16)
    hsdp:SPEC[@residual_dtype=T][@K=V...]
                        HSDP (--nproc 4 or more, even): 2-rank "nodes", FSDP2 on each node's 1-D mesh and
                        `install(replicate_group=...)`: the replicas' all-reduce of each shard is the double pass
                        (T: both residuals' dtype, e.g. bfloat16); its bytes are the replicas' exchange alone
    zeroN               stock DeepSpeed ZeRO stage N (2 or 3; `overlap_comm`, `contiguous_gradients`), fp32
    zeroN:SPEC[@residual_dtype=T][@param_compressor=P][@K=V...]
                        the same with the config's "doublesqueeze" section (T: fp32 or bf16, the worker residual's
                        storage; P: ZeRO-3's parameter gathers, default int8)
    powersgd[:R]        torch's PowerSGD hook, rank R (default 2), 10 dense warm-up steps, the whole model in one DDP
                        bucket (with more than one it deadlocks or aborts on gloo)
    SPEC[@K=V...]       DoubleSqueezeConfig(compressor=SPEC, K=V...): ``sign``, ``sign@noef`` (no residual on either
                        pass), ``int4@block_size=256``, ``sign@policy=role:embedding=int8,role:head=int8`` (the
                        policy as text: rules ``selector=spec`` separated by commas)...

Examples::

    python benchmarks/quality.py --task lm --opt adamw --methods dense default sign sign@noef int4 powersgd auto
    python benchmarks/quality.py --suite quick --json runs/bench/quality.json --png docs/img/quality.png

Writes JSON (`--json`) with every run's curve, and a PNG of validation loss against steps and against MB sent.
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SUITES = {
    # task, optimiser, lr, steps, methods
    "lm-adamw": ("lm", "adamw", 2e-3, 300, ["dense", "default", "int4:128@noef", "sign@guard=0", "sign@noef",
                                            "sign", "adamw:sign", "adamw:sign@noef", "adamw:sign@warmup=40",
                                            "powersgd", "auto"]),
    "lm-sgd": ("lm", "sgd", 0.3, 300, ["dense", "default", "int4:128@noef", "sign@guard=0", "sign@noef", "sign",
                                       "powersgd", "auto"]),
    "digits-sgd": ("digits", "sgd", 0.05, 300, ["dense", "default", "int4:128@noef", "sign", "sign@noef",
                                                "powersgd", "auto"]),
    "cnn-adamw": ("cnn", "adamw", 2e-3, 300, ["dense", "default", "int4:128@noef", "sign", "sign@noef",
                                              "adamw:sign", "powersgd", "auto"]),
}


# -- one method on one rank ------------------------------------------------------------------------------------
def parse_method(method: str):
    """`method` -> (kind, options): ("dense", {}), ("powersgd", {"rank": 2}), ("dsq", config kwargs)."""
    if method == "dense":
        return "dense", {}
    if method.startswith("powersgd"):
        return "powersgd", {"rank": int(method.split(":")[1]) if ":" in method else 2}
    if method == "default":
        return "dsq", {}
    if method == "auto":
        return "dsq", {"compressor": "auto"}
    if method == "fsdp":
        return "fsdp", {}
    if method.startswith("fsdp:"):
        return "fsdp", _options(*method[len("fsdp:"):].split("@"))
    if method.startswith("hsdp:"):
        return "hsdp", _options(*method[len("hsdp:"):].split("@"))
    for stage in ("zero2", "zero3"):
        if method == stage:
            return stage, {}
        if method.startswith(stage + ":"):
            return stage, _options(*method[len(stage) + 1:].split("@"))
    if method.startswith("adamw:"):          # DoubleSqueezeAdamW: adamw:SPEC[@warmup=N][@K=V...]
        return "adamw", _options(*method[len("adamw:"):].split("@"))
    return "dsq", _options(*method.split("@"))


_TEXT_OPTIONS = ("server_compressor", "candidates", "fallback", "warmup_compressor", "downlink", "residual_dtype",
                 "policy", "param_compressor")


def _options(spec: str, *opts: str) -> dict:
    """``SPEC@K=V@noef...`` -> keyword arguments: the compressor, ``noef`` (no residual on either pass), and
    ``K=V`` pairs (numbers, True / False, or text for the spec-valued keys)."""
    kw = {"compressor": spec}
    for o in opts:
        if o == "noef":
            kw.update(worker_ef=False, server_ef=False)
            continue
        k, v = o.split("=", 1)
        kw[k] = v if k in _TEXT_OPTIONS else (
            v == "True" if v in ("True", "False") else float(v) if "." in v else int(v))
    return kw


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def run_method(args, method: str, task, world: int, rank: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import dsq_plugins as dsq

    kind, opts = parse_method(method)
    model = task.model().to(getattr(torch, args.dtype))
    numel = sum(p.numel() for p in model.parameters())
    # torch's PowerSGD hook deadlocks or aborts on gloo when a model has more than one DDP bucket (its
    # collectives are issued from future callbacks in an order that differs between ranks): it runs here with
    # the whole model in one bucket, the only layout where it works on gloo.
    state = fsdp_state = None
    counted = {"bytes": 0}
    if kind in ("fsdp", "hsdp"):
        from torch.distributed.fsdp import fully_shard
        import dsq_plugins.fsdp as dsq_fsdp
        opts = dict(opts)
        downlink, reshard = opts.pop("downlink", None), bool(opts.pop("reshard", False))
        residual_dtype = opts.pop("residual_dtype", None)
        residual_dtype = getattr(torch, residual_dtype) if residual_dtype else None
        mesh = replicate = None
        if kind == "hsdp":               # nodes of 2 ranks: shard inside a node, the double pass across nodes
            from torch.distributed.device_mesh import init_device_mesh
            if world < 4 or world % 2:
                raise ValueError("hsdp: methods need --nproc 4 or more, even (nodes of 2 ranks, at least two)")
            both = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("replicate", "shard"))
            mesh, replicate = both["shard"], both["replicate"].get_group()
        for blk in getattr(model, "blocks", []):
            fully_shard(blk, reshard_after_forward=reshard, mesh=mesh)
        fully_shard(model, reshard_after_forward=False, mesh=mesh)
        ddp = model
        if opts:
            opts.setdefault("guard", 0.0)
            fsdp_state = dsq_fsdp.install(model, dsq.DoubleSqueezeConfig(**opts), downlink=downlink,
                                          residual_dtype=residual_dtype, replicate_group=replicate)
    else:
        ddp = DDP(model, bucket_cap_mb=1024) if kind == "powersgd" else DDP(model)
    if kind == "dsq":
        state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(**opts), module=model)    # names: the policy's
        ddp.register_comm_hook(state, dsq.doublesqueeze_hook)
    elif kind == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ps
        ps_state = ps.PowerSGDState(process_group=None, matrix_approximation_rank=opts["rank"],
                                    start_powerSGD_iter=10, min_compression_rate=2, use_error_feedback=True,
                                    warm_start=True)
        ddp.register_comm_hook(ps_state, ps.powerSGD_hook)
        counted = _count_all_reduce_bytes(world)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}]
    if kind == "adamw":
        if args.opt != "adamw":
            raise ValueError("adamw:SPEC methods are DoubleSqueezeAdamW: run them with --opt adamw")
        o = dict(opts)
        warm = int(o.pop("warmup", max(1, args.steps // 5)))
        wspec = o.pop("warmup_compressor", "int4:128")
        refresh = int(o.pop("refresh", 0))
        opt = dsq.DoubleSqueezeAdamW(groups, lr=args.lr, weight_decay=args.wd, warmup_steps=warm,
                                     variance_refresh=refresh,
                                     config=dsq.DoubleSqueezeConfig(guard=0.0, **o),
                                     warmup_config=dsq.DoubleSqueezeConfig(compressor=wspec), ddp=ddp)
    elif args.opt == "adamw":
        opt = torch.optim.AdamW(groups, lr=args.lr)
    else:
        opt = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    engine = None
    if kind in ("zero2", "zero3"):
        engine = _deepspeed_engine(args, kind, opts, model, opt)
        ddp = engine
    evaluate = task.evaluate
    if kind == "zero3":                  # the parameters are partitioned: gather them whole to evaluate
        import deepspeed

        def evaluate(m):
            with deepspeed.zero.GatheredParameters(list(m.parameters())):
                return task.evaluate(m)
    curve, diverged, t0 = [], False, time.perf_counter()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = task.batch_for(step, rank)
        loss = task.loss(ddp, x, y)
        if engine is not None:           # DeepSpeed: its backward and step (clipping: its config)
            engine.backward(loss)
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            opt.step()
        if not math.isfinite(float(loss.detach())):
            diverged = True
            break
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, evaluate(model)["val_loss"]))
    seconds = time.perf_counter() - t0
    final = evaluate(model) if not diverged else {"val_loss": float("nan")}
    steps_done = step + 1
    itemsize = next(model.parameters()).element_size()
    dense_bytes = 2 * (world - 1) / world * numel * itemsize   # a ring all-reduce, per rank per step
    dsq_zero = getattr(engine, "doublesqueeze", None)
    if kind == "dense" or (kind == "fsdp" and fsdp_state is None) or (kind == "zero2" and dsq_zero is None):
        sent = dense_bytes * steps_done     # FSDP2 and ZeRO-2: a reduce-scatter and an all-gather, the same bytes
    elif kind == "zero3" and dsq_zero is None:
        sent = 1.5 * dense_bytes * steps_done         # a reduce-scatter, and all-gathers in forward and backward
    elif dsq_zero is not None:
        sent = dsq_zero.totals.bytes_sent
    elif kind in ("fsdp", "hsdp"):
        sent = fsdp_state.totals.bytes_sent
    elif kind == "dsq":
        state.drain()
        sent = state.totals.bytes_sent
    elif kind == "adamw":
        sent = opt.bytes_sent()
    else:
        sent = counted["bytes"]
    sent_all = [0.0] * world
    t = torch.tensor([float(sent)], dtype=torch.float64)
    gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(gathered, t)
    sent_all = [float(g) for g in gathered]
    out = dict(method=method, kind=kind, options=opts, val_loss=final["val_loss"], accuracy=final.get("accuracy"),
               diverged=diverged or not math.isfinite(final["val_loss"]), steps=steps_done, seconds=seconds,
               bytes_per_step=max(sent_all) / steps_done, dense_bytes_per_step=dense_bytes, curve=curve)
    if dsq_zero is not None:
        out["config"] = dsq_zero.config.to_dict()
        out["memory"] = dsq_zero.memory_report()
    if fsdp_state is not None:
        out["config"] = fsdp_state.config.to_dict()
        out["downlink"] = fsdp_state.downlink.value
        out["memory"] = fsdp_state.memory_report()
    if state is not None:
        out["config"] = state.config.to_dict()
        out.update(_dsq_report(state))
        if not out["diverged"]:
            # the worker residual against this rank's gradient at the end: error feedback's health
            with ddp.no_sync():
                opt.zero_grad(set_to_none=True)
                task.loss(ddp, x, y).backward()
            g = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in model.parameters() if p.grad is not None))
            out["residual_ratio"] = state.residual_norms()[0] / max(g, 1e-30)
    if counted.get("restore"):
        counted["restore"]()
    return out


def _deepspeed_engine(args, kind: str, opts: dict, model, optimizer):
    """A DeepSpeed engine at ZeRO stage 2 or 3 (fp32, `overlap_comm` and `contiguous_gradients` as the Trainer's
    documented configs; ZeRO-3 keeps no parameter whole), with the "doublesqueeze" section when `opts` name a
    compressor."""
    import deepspeed
    cfg = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 10 ** 9, "gradient_clipping": args.clip,
           "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": int(kind[-1]), "overlap_comm": True, "contiguous_gradients": True}}
    if kind == "zero3":     # every parameter partitioned and gathered (none kept whole, whose gathers go uncounted)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    if opts:
        cfg["doublesqueeze"] = dict(opts, enabled=True, guard=opts.get("guard", 0.0))
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    return engine


def _dsq_report(state) -> dict:
    """What the engine decided, for the record: modes and switches of the guard and of auto."""
    rep = {}
    for name in ("guard_report", "policy_report"):
        fn = getattr(state, name, None)
        if fn is not None:
            rep[name] = fn()
    if state.auto is not None:
        rep["auto_history"] = [list(h) for h in state.auto.history]
    return rep


def _count_all_reduce_bytes(world: int) -> dict:
    """Counts what `torch.distributed.all_reduce` moves (PowerSGD's hook calls it by that name): a ring's
    2 (W - 1) / W of each tensor per rank."""
    import torch.distributed as dist
    counted = {"bytes": 0}
    original = dist.all_reduce

    def all_reduce(tensor, *a, **kw):
        counted["bytes"] += 2 * (world - 1) / world * tensor.numel() * tensor.element_size()
        return original(tensor, *a, **kw)
    dist.all_reduce = all_reduce

    def restore():
        dist.all_reduce = original
    counted["restore"] = restore
    return counted


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from real_models import Task

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for seed, method in _seed_method_pairs(args):
        task = Task(args.task, seed=seed)
        try:
            r = run_method(args, method, task, world, rank)
            r["seed"] = seed
        except Exception as e:           # a method that cannot run here is reported, not hidden
            r = dict(method=method, error=f"{type(e).__name__}: {e}"[:400])
            if rank == 0:
                print(f"[{method}] failed: {r['error']}", flush=True)
            if "gloo" in str(e).lower() or "collective" in str(e).lower():
                results.append(r)
                break              # a failed collective leaves the group unusable
        results.append(r)
        r.setdefault("seed", seed)
        if rank == 0 and "error" not in r:
            print(f"[{method} seed {seed}] val {r['val_loss']:.4f}  {r['bytes_per_step'] / 1e3:.1f} KB/step  "
                  f"{r['seconds']:.0f} s", flush=True)
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def _seed_method_pairs(args) -> list:
    """Every method on every seed of --seeds, seed by seed; --first-seed-only methods on the first seed alone."""
    seeds = args.seeds or [args.seed]
    pairs = [(s, m) for s in seeds for m in args.methods]
    return [(s, m) for s, m in pairs if s == seeds[0] or m not in (args.first_seed_only or [])]


# -- the driver ------------------------------------------------------------------------------------------------
def launch(args, task, opt, lr, steps, methods, out_json: Path) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           str(Path(__file__).resolve()), "--worker-out", str(out_json), "--task", task, "--opt", opt,
           "--lr", str(lr), "--steps", str(steps), "--warmup", str(args.warmup or max(1, steps // 10)),
           "--wd", str(args.wd), "--clip", str(args.clip), "--eval-every", str(args.eval_every),
           "--seed", str(args.seed), "--dtype", args.dtype, "--methods", *methods]
    if args.seeds:
        cmd += ["--seeds", *map(str, args.seeds)]
    if args.first_seed_only:
        cmd += ["--first-seed-only", *args.first_seed_only]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, env=env, cwd=ROOT)
    if proc.returncode != 0 and not out_json.exists():
        raise SystemExit(f"the yardstick's workers failed (exit {proc.returncode})")
    return json.loads(out_json.read_text())


def table(rows: list, title: str) -> str:
    """One line per run; a run's gap is to dense on the same seed."""
    dense_of = {r.get("seed"): r for r in rows if r.get("method") == "dense" and "error" not in r}
    lines = [title, f"{'method':>34} {'seed':>4} {'val loss':>9} {'gap':>8} {'KB/step':>9} {'fewer':>8} "
                    f"{'|e|/|g|':>8}"]
    for r in rows:
        dense = dense_of.get(r.get("seed"))
        if "error" in r:
            lines.append(f"{r['method']:>34}  failed: {r['error'][:80]}")
            continue
        gap = (r["val_loss"] / dense["val_loss"] - 1) * 100 if dense else float("nan")
        fewer = r["dense_bytes_per_step"] / r["bytes_per_step"] if r["bytes_per_step"] else float("inf")
        v = "diverged" if r["diverged"] else f"{r['val_loss']:.4f}"
        ratio = f"{r['residual_ratio']:.2f}" if r.get("residual_ratio") is not None else ""
        lines.append(f"{r['method']:>34} {r.get('seed', ''):>4} {v:>9} {gap:>+7.2f}% {r['bytes_per_step'] / 1e3:>9.1f} {fewer:>7.1f}x "
                     f"{ratio:>8}")
    return "\n".join(lines)


def plot(runs: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.6 * len(runs)), squeeze=False)
    for (name, rows), (a, b) in zip(runs.items(), axes):
        seeded = len({r.get("seed") for r in rows}) > 1
        for r in rows:
            if "error" in r or not r["curve"]:
                continue
            s, v = zip(*r["curve"])
            label = f"{r['method']} (seed {r['seed']})" if seeded else r["method"]
            a.plot(s, v, label=label)
            b.plot([x * r["bytes_per_step"] / 1e6 for x in s], v, label=label)
        a.set(title=f"{name}: validation loss", xlabel="step", ylabel="val loss")
        b.set(title=f"{name}: against MB sent per rank", xlabel="MB", xscale="log")
        lo = min((min(v for _, v in r["curve"]) for r in rows if "error" not in r and r["curve"]), default=0)
        a.set_ylim(lo * 0.97, lo * 1.6)
        b.set_ylim(lo * 0.97, lo * 1.6)
        a.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default=None, help=f"a named set of runs ({', '.join(SUITES)}, or 'all')")
    ap.add_argument("--task", default="lm", choices=["lm", "digits", "cnn"])
    ap.add_argument("--opt", default="adamw", choices=["adamw", "sgd"])
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=0, help="learning-rate warm-up steps (default: steps / 10)")
    ap.add_argument("--wd", type=float, default=0.01)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="the parameters' (and so the gradients') dtype: bfloat16 trains in bf16 throughout, as "
                         "Lightning's \"bf16-true\"")
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="run every method on each of these seeds (of the model's initialisation and the batches), "
                         "in one launch; each run's gap is to dense on its own seed")
    ap.add_argument("--first-seed-only", nargs="+", default=None, metavar="METHOD",
                    help="methods of --methods to run on the first of --seeds only")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_out:
        return worker(args)

    if args.suite:
        names = list(SUITES) if args.suite == "all" else args.suite.split(",")
        plan = {n: SUITES[n] for n in names}
    else:
        lr = args.lr or (2e-3 if args.opt == "adamw" else 0.3)
        plan = {f"{args.task}-{args.opt}": (args.task, args.opt, lr, args.steps,
                                            args.methods or ["dense", "default", "sign", "sign@noef"])}
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"dsq-quality-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    runs, t0 = {}, time.time()
    for name, (task, opt, lr, steps, methods) in plan.items():
        if args.methods and args.suite:
            methods = args.methods
        rows = launch(args, task, opt, lr, steps, methods, tmp / f"{name}.json")
        runs[name] = rows
        print(table(rows, f"\n{name} ({task}, {opt}, lr {lr}, {steps} steps, {args.nproc} ranks, {args.dtype})"),
              flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(runs=runs, seconds=time.time() - t0, machine=platform.node(),
                                                   date=time.strftime("%Y-%m-%d"), nproc=args.nproc,
                                                   dtype=args.dtype), indent=1))
    if args.png:
        plot(runs, Path(args.png))


if __name__ == "__main__":
    main()
