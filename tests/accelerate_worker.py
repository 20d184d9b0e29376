"""Runs under torchrun: Accelerate on CPU ranks (gloo). `accelerator.prepare` builds the DDP model, then the script
registers the DoubleSqueeze hook on it, the documented way (Accelerate's DistributedDataParallelKwargs(comm_hook=)
takes only its built-in hooks). Each rank writes OUT/rank{r}.pt: per step its local gradient (a tensor hook,
before DDP's reduction) and the gradient the optimizer got, by name, and its residuals."""
import argparse
from pathlib import Path

import torch
from accelerate import Accelerator

import dsq_plugins as dsq
from checks import shut_down_and_exit
from workload import batch, build_model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    model = build_model("single")
    local = {}
    model.weight.register_hook(lambda g: local.__setitem__("weight", g.detach().reshape(-1).clone()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ddp, optimizer = accelerator.prepare(model, optimizer)
    state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="topk:0.1", min_numel=16, block_size=256))
    ddp.register_comm_hook(state, dsq.doublesqueeze_hook)
    rank = accelerator.process_index
    records = []
    for step in range(args.steps):
        optimizer.zero_grad()
        x, y = batch(step, 0, rank, "single")
        accelerator.backward(((ddp(x) - y) ** 2).mean())
        records.append({"g": dict(local), "c": {"weight": model.weight.grad.detach().reshape(-1).clone()}})
        optimizer.step()
    w, s = state.worker_residuals(), state.server_residuals()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"records": records, "distributed_type": str(accelerator.distributed_type), "step": state.step,
                "worker_residual": {"weight": w[0]},
                "server_residual": {"weight": state.expand_server_residual(0, s[0], 2000)} if 0 in s else {}},
               out / f"rank{rank}.pt")
    shut_down_and_exit()


if __name__ == "__main__":
    main()
