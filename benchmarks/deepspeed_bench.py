"""DeepSpeed: bytes on the wire (counted by the operating system) and step time, stock DeepSpeed against the
"doublesqueeze" config section, for ZeRO stages 0 to 3, side by side in one invocation.

Methods are METHOD-zSTAGE: `stock-z0`, `sign-z0`, ..., `stock-z3`, `sign-z3` (any compressor spec in place of sign;
ZeRO-2 runs with overlap_comm and contiguous_gradients on, as the Trainer's documented config; ZeRO-3's parameter
gathers are int8, the section's default `param_compressor`);
each is a fresh torchrun job (gloo), the same fp32 MLP, data and steps, compared with `stock-z<same stage>`.
As root each job runs in its own network namespace (see harness.py); without root, step times only.

    python benchmarks/deepspeed_bench.py --nproc 3 --json runs/bench/deepspeed.json
"""
import argparse
import sys
import time

from harness import add_arguments, lo_bytes, main_loop, report_counted


def parse(method: str):
    spec, _, stage = method.rpartition("-z")
    if not spec or stage not in ("0", "1", "2", "3"):
        sys.exit(f"bad method {method!r}: expected METHOD-z0 to -z3 (METHOD: stock or a compressor spec)")
    return spec, int(stage)


def worker(args):
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    import deepspeed_ext

    spec, stage = parse(args.method)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    h = args.hidden
    model = nn.Sequential(nn.Linear(256, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    config = {"train_micro_batch_size_per_gpu": 64, "gradient_clipping": 0.0, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    if stage == 2:
        config["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    if spec != "stock":
        config["doublesqueeze"] = {"enabled": True, "compressor": spec, "guard": 0}
    engine, _, _, _ = deepspeed_ext.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                                               config=config)
    gen = torch.Generator().manual_seed(engine.global_rank)

    def step():
        x, y = torch.randn(64, 256, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        engine.backward(nn.functional.cross_entropy(engine(x), y))
        engine.step()

    for _ in range(args.warmup):
        step()
    dist.barrier()
    start, times = lo_bytes(), []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    if engine.global_rank == 0:
        report_counted(lo_bytes() - start, times, getattr(engine, "doublesqueeze", None))


def command(args, method):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}", __file__,
            "--worker", "--method", method, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--hidden", str(args.hidden)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap, "stock-z0,sign-z0,stock-z1,sign-z1,stock-z2,sign-z2,stock-z3,sign-z3")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    for m in args.methods.split(","):
        parse(m.strip())
    main_loop(args, __file__, command, "DeepSpeed (gloo, fp32)",
              baseline=lambda m: f"stock-z{parse(m)[1]}")


if __name__ == "__main__":
    main()
