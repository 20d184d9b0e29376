"""Runs under torchrun or the deepspeed launcher: stock `deepspeed.initialize` with ZeRO-3 and, unless --compressor
stock, the "doublesqueeze" section (switched on by the import hook; nothing of ours imported). Each rank writes
OUT/rank{r}.pt with, per optimizer step: the exact parameters before and after it (gathered by
`deepspeed.zero.GatheredParameters`, outside the engine's calls: DeepSpeed's own exact gather), the parameters the
engine's forward computed with (seen by a forward pre-hook registered after DeepSpeed's), and this rank's gradient
computed by plain torch on a copy of the model holding those (the independent reference); at the end the residual
and the counters.
"""
import argparse
import copy
import json
import os
from pathlib import Path

import deepspeed
import torch

from checks import run_cases, shut_down_and_exit
from workload import batch, build_model

LR = 0.5


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compressor", default="sign")
    ap.add_argument("--dsq", default="{}", help="more keys of the doublesqueeze section, as JSON")
    ap.add_argument("--model", default="single")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--first-step", type=int, default=0)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--load", default=None)
    ap.add_argument("--universal", action="store_true", help="--load a universal checkpoint (its latest_universal)")
    ap.add_argument("--adam", action="store_true", help="torch's Adam instead of SGD (what ds_to_universal converts)")
    ap.add_argument("--nan-at", type=int, default=-1, help="rank 1's loss is NaN at this step")
    ap.add_argument("--nan-param", default=None, help="with --nan-at: only this parameter's gradient is made Inf")
    ap.add_argument("--fp16", action="store_true", help="DeepSpeed's fp16 with its dynamic loss scaler")
    ap.add_argument("--scale-window", type=int, default=1000, help="fp16.loss_scale_window")
    ap.add_argument("--persist", type=int, default=0, help="stage3_param_persistence_threshold (elements)")
    ap.add_argument("--local_rank", type=int, default=-1)
    return ap


def main():
    torch.set_num_threads(1)
    run_cases(parser, run, lambda: int(os.environ.get("RANK", "0")))   # --cases: many runs in one launch
    shut_down_and_exit()


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model)
    reference = copy.deepcopy(model)
    cfg = {"train_micro_batch_size_per_gpu": 8, "steps_per_print": 10 ** 6, "gradient_clipping": 0.0,
           "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": args.persist,
                                 "reduce_bucket_size": 300, "stage3_prefetch_bucket_size": 0}}
    if args.fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": args.scale_window,
                       "hysteresis": 1}
        # as in ds_worker.py: answer DeepSpeed's CPU fp16 capability query as an fp16-capable CPU does
        from deepspeed.accelerator import get_accelerator
        accelerator = type(get_accelerator())
        accelerator.is_fp16_supported = lambda self: True
        accelerator.supported_dtypes = lambda self: [torch.float32, torch.bfloat16, torch.float16]
    if args.universal:
        cfg["checkpoint"] = {"load_universal": True}
    if args.compressor != "stock":
        cfg["doublesqueeze"] = {"enabled": True, "compressor": args.compressor, "block_size": 256, "guard": 0,
                                **json.loads(args.dsq)}
    try:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if args.adam else \
            torch.optim.SGD(model.parameters(), lr=LR)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    except (NotImplementedError, ValueError) as e:
        (out / f"refused{os.environ.get('RANK', '0')}.txt").write_text(str(e))
        raise
    rank = engine.global_rank
    dsq = getattr(engine, "doublesqueeze", None)
    params = dict(engine.module.named_parameters())

    def exact():
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().reshape(-1).clone() for n, p in params.items()}

    loaded = None
    if args.load:
        engine.load_checkpoint(args.load)
        if dsq is not None:       # what the resume starts from
            loaded = {"params": exact(), "residual": dsq.residual.clone(), "step": dsq.step}
    seen = {}

    def see(module, inputs):
        for name, p in module.named_parameters(recurse=False):
            seen[module_names[module] + name] = p.detach().clone()
    module_names = {m: (n + "." if n else "") for n, m in engine.module.named_modules()}
    for m in engine.module.modules():
        if list(m.parameters(recurse=False)):
            m.register_forward_pre_hook(see)

    records = []
    for step in range(args.first_step, args.first_step + args.steps):
        before = exact()
        x, y = batch(step, 0, rank, args.model, size=8)
        hook = None
        if step == args.nan_at and rank == 1:
            if args.nan_param:                    # one parameter's gradient becomes Inf on this rank
                hook = params[args.nan_param].register_hook(lambda g: g * float("inf"))
            else:
                y[0, 0] = float("nan")            # this rank's gradients become NaN at this step
        scale = float(engine.optimizer.loss_scale) if args.fp16 else 1.0
        dtype = next(engine.module.parameters()).dtype
        loss = ((engine(x.to(dtype)) - y.to(dtype)).float() ** 2).mean()
        engine.backward(loss)
        engine.step()
        if hook is not None:
            hook.remove()
        reference.load_state_dict({n: v.float() for n, v in seen.items()})
        reference.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        records.append({"before": before, "after": exact(), "seen": {n: v.reshape(-1) for n, v in seen.items()},
                        "g": {n: p.grad.reshape(-1).clone() for n, p in reference.named_parameters()},
                        "loss": loss.item(), "residual": None if dsq is None else dsq.residual.clone(),
                        "skipped_steps": None if dsq is None else dsq.skipped_steps,
                        "uplink": None if dsq is None else dsq.uplink_mode})
        if args.fp16:
            records[-1].update(scale=scale, scale_after=float(engine.optimizer.loss_scale),
                               ds_skipped=engine.skipped_steps)
        if step + 1 == args.save_at:
            engine.save_checkpoint(str(out / "ckpt"), tag=f"step{step + 1}")
    result = {"records": records, "world": engine.world_size, "dsq": dsq is not None, "loaded": loaded,
              "persistent": sorted(n for n, p in params.items() if getattr(p, "ds_persist", False))}
    if dsq is not None:
        result.update(residual=dsq.residual.clone(), step=dsq.step, totals=dsq.totals.as_dict(),
                      gathers=dsq.gathers, gathered_elements=dsq.gathered_elements, memory=dsq.memory_report(),
                      auto_history=None if dsq.auto is None else [list(h) for h in dsq.auto.history])
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
