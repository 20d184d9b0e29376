"""Runs under torchrun or the deepspeed launcher: a DeepSpeed training script that calls `deepspeed.initialize` and
imports nothing of ours (the "doublesqueeze" section switches DoubleSqueeze on through the import hook,
dsq_autohook; with --explicit it calls `deepspeed_ext.initialize`), recording what the tests check. Each rank
writes OUT/rank{r}.pt with, per optimizer step, its local gradient computed by plain torch
on a copy of the model (the independent reference) and the update DeepSpeed applied, recovered from the weights
(SGD without momentum: c = (w_before - w_after) / lr), by parameter name; at the end its residuals.
"""
import argparse
import copy
import json
import os
from pathlib import Path

import torch

from checks import residuals_by_name, run_cases, shut_down_and_exit
from workload import batch, build_model

LR = 0.5          # a power of two: (w_before - w_after) / LR recovers the update up to the weights' rounding


def ds_config(args) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": args.accum, "steps_per_print": 10 ** 6,
           "gradient_clipping": args.clip, "zero_optimization": {"stage": args.stage},
           "zero_allow_untested_optimizer": True}
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    if args.fp16:
        cfg["fp16"] = {"enabled": True, "initial_scale_power": args.scale_power,
                       "loss_scale_window": args.scale_window, "hysteresis": 1}
    if args.overlap_comm:
        cfg["zero_optimization"]["overlap_comm"] = True
    if args.no_contiguous:
        cfg["zero_optimization"]["contiguous_gradients"] = False
    if args.fp32_accum:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
    if args.bucket:
        cfg["zero_optimization"]["reduce_bucket_size"] = args.bucket
    if args.predivide != 1.0:
        cfg["gradient_predivide_factor"] = args.predivide
    if args.prescale:
        cfg["prescale_gradients"] = True
    if args.sum:
        cfg["gradient_allreduce_op"] = "sum"
    if args.universal:
        cfg["checkpoint"] = {"load_universal": True}
    if args.round_robin:
        cfg["zero_optimization"]["round_robin_gradients"] = True
    if args.tensorboard:
        cfg["tensorboard"] = {"enabled": True, "output_path": args.tensorboard, "job_name": "job"}
    if args.compressor != "stock":
        cfg["doublesqueeze"] = {"enabled": True, "compressor": args.compressor, "min_numel": 16,
                                "block_size": 256, "bucket_mb": 0.01, **json.loads(args.dsq)}
    return cfg


def fp32_master(engine, stage):
    """The fp32 weights DeepSpeed's fp16 optimizer steps: the partition this rank owns (flat, its groups one after
    another)."""
    opt = engine.optimizer
    groups = opt.fp32_partitioned_groups_flat if stage == 3 else opt.single_partition_of_fp32_groups
    return torch.cat([p.detach().reshape(-1).clone() for p in groups])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compressor", default="sign", help="a spec, or 'stock' for no doublesqueeze section")
    ap.add_argument("--dsq", default="{}", help="more keys of the doublesqueeze section, as JSON")
    ap.add_argument("--model", default="multi")
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--fp16", action="store_true", help="DeepSpeed's fp16 with its dynamic loss scaler")
    ap.add_argument("--scale-power", type=int, default=8, help="fp16.initial_scale_power")
    ap.add_argument("--scale-window", type=int, default=1000, help="fp16.loss_scale_window")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--clip", type=float, default=0.0)
    ap.add_argument("--predivide", type=float, default=1.0)
    ap.add_argument("--prescale", action="store_true")
    ap.add_argument("--sum", action="store_true")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--first-step", type=int, default=0)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--load", default=None)
    ap.add_argument("--universal", action="store_true", help="--load a universal checkpoint (its latest_universal)")
    ap.add_argument("--round-robin", action="store_true", help="zero_optimization.round_robin_gradients")
    ap.add_argument("--adam", action="store_true", help="torch's Adam instead of SGD (what ds_to_universal converts)")
    ap.add_argument("--tensorboard", default=None)
    ap.add_argument("--config-file", action="store_true", help="pass the config as a JSON file path")
    ap.add_argument("--explicit", action="store_true", help="deepspeed_ext.initialize instead of deepspeed's")
    ap.add_argument("--overlap-comm", action="store_true", help="zero_optimization.overlap_comm")
    ap.add_argument("--no-contiguous", action="store_true", help="zero_optimization.contiguous_gradients false")
    ap.add_argument("--nan-at", type=int, default=-1, help="rank 1's loss is NaN at this step")
    ap.add_argument("--nan-param", default=None, help="with --nan-at: only this parameter's gradient is made Inf")
    ap.add_argument("--fp32-accum", action="store_true", help="data_types.grad_accum_dtype fp32")
    ap.add_argument("--bucket", type=int, default=0, help="zero_optimization.reduce_bucket_size (elements)")
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return ap


def main():
    torch.set_num_threads(1)
    run_cases(parser, run, lambda: int(os.environ.get("RANK", "0")))   # --cases: many runs in one launch
    shut_down_and_exit()


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.model)
    reference = copy.deepcopy(model).float()
    cfg = ds_config(args)
    if args.config_file:
        path = out / f"ds_config_{args.local_rank}.json"
        path.write_text(json.dumps(cfg))
        cfg = str(path)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3) if args.adam else \
        torch.optim.SGD(model.parameters(), lr=LR)
    if args.fp16:
        # DeepSpeed's CPU accelerator offers fp16 only where mkldnn has fp16 kernels (AVX512-FP16 / AMX-FP16 CPUs);
        # torch computes in fp16 on any CPU, so this answers the capability query as such a CPU does, and
        # DeepSpeed's own fp16 path runs: its fp16 optimizers, loss scaler and overflow checks.
        from deepspeed.accelerator import get_accelerator
        accelerator = type(get_accelerator())
        accelerator.is_fp16_supported = lambda self: True
        accelerator.supported_dtypes = lambda self: [torch.float32, torch.bfloat16, torch.float16]
    if args.explicit:
        import deepspeed_ext
        initialize = deepspeed_ext.initialize
    else:
        import deepspeed
        initialize = deepspeed.initialize
    try:
        engine, _, _, _ = initialize(model=model, optimizer=optimizer, config=cfg)
    except (NotImplementedError, ValueError) as e:      # a section this engine cannot honour: before any step
        (out / f"refused{os.environ.get('RANK', '0')}.txt").write_text(str(e))
        raise
    rank = engine.global_rank
    dsq = getattr(engine, "doublesqueeze", None)
    names = [(n, p.numel()) for n, p in engine.module.named_parameters()]
    loaded = None
    if args.load:
        engine.load_checkpoint(args.load)
        if dsq is not None:     # what the resume starts from
            loaded = {"params": {n: p.detach().float().clone() for n, p in engine.module.named_parameters()},
                      "step": dsq.step}
            if args.stage == 2:
                loaded["residual"] = dsq.residual.clone()
            else:
                loaded["worker_residual"], loaded["server_residual"] = residuals_by_name(dsq, names)

    records, losses = [], []
    master0 = fp32_master(engine, args.stage) if args.fp16 else None
    for step in range(args.first_step, args.first_step + args.steps):
        before = {n: p.detach().float().reshape(-1).clone() for n, p in engine.module.named_parameters()}
        reference.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
        reference.zero_grad()
        scale = float(engine.optimizer.loss_scale) if args.fp16 else 1.0
        for micro in range(args.accum):
            x, y = batch(step, micro, rank, args.model, size=8)
            hook = None
            if step == args.nan_at and rank == 1:
                if args.nan_param:                # one parameter's gradient becomes Inf on this rank
                    hook = engine.module.get_parameter(args.nan_param).register_hook(lambda g: g * float("inf"))
                else:
                    y[0, 0] = float("nan")        # this rank's gradients become NaN at this step
            (((reference(x) - y) ** 2).mean() / args.accum).backward()
            dtype = next(engine.module.parameters()).dtype
            loss = ((engine(x.to(dtype)) - y.to(dtype)).float() ** 2).mean()
            engine.backward(loss)
            if hook is not None:
                hook.remove()
            engine.step()
            losses.append(loss.item())
        after = {n: p.detach().float().reshape(-1) for n, p in engine.module.named_parameters()}
        records.append({"step": step, "g": {n: p.grad.reshape(-1).clone() for n, p in reference.named_parameters()},
                        "c": {n: (before[n] - after[n]) / LR for n in before}})
        if args.fp16:
            records[-1].update(scale=scale, scale_after=float(engine.optimizer.loss_scale),
                               ds_skipped=engine.skipped_steps)
        if args.stage in (2, 3) and dsq is not None:
            records[-1].update(residual=dsq.residual.clone(), skipped_steps=dsq.skipped_steps, uplink=dsq.uplink_mode)
        if args.fp16:
            records[-1]["master"] = fp32_master(engine, args.stage)
        if args.stage < 2 and args.fp16 and dsq is not None:
            w, s = residuals_by_name(dsq, names)
            records[-1].update(worker_residual=w, server_residual=s, skipped_steps=dsq.skipped_steps)
        if step + 1 == args.save_at:
            engine.save_checkpoint(str(out / "ckpt"), tag=f"step{step + 1}")

    result = {"master0": master0, "loaded": loaded, "records": records, "world": engine.world_size, "losses": losses, "dsq": dsq is not None,
              "optimizer": type(engine.optimizer).__name__,
              "params": {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}}
    if dsq is not None and args.stage == 2:
        result.update(residual=dsq.residual.clone(), server_residuals=dsq.server_residuals(), step=dsq.step,
                      skipped_steps=dsq.skipped_steps, totals=dsq.totals.as_dict(), config=dsq.config.to_dict(),
                      memory=dsq.memory_report(), replica_rows=[r.clone() for r in dsq.replica_rows],
                      guard_switches=[] if dsq.guard is None else [[s.step, s.to] for s in dsq.guard.switches],
                      auto_history=None if dsq.auto is None else [list(h) for h in dsq.auto.history],
                      partition_size=[int(n) for n in engine.optimizer.partition_size])
    elif dsq is not None:
        w, s = residuals_by_name(dsq, names)
        result.update(worker_residual=w, server_residual=s, step=dsq.step, skipped_steps=dsq.skipped_steps,
                      totals=dsq.totals.as_dict(), config=dsq.config.to_dict(),
                      auto=None if dsq.auto is None else {"history": dsq.auto.history, "flushes": dsq.flushes})
    torch.save(result, out / f"rank{rank}.pt")
    if engine.monitor.enabled:
        engine.monitor.write_events([])


if __name__ == "__main__":
    main()
