"""A worker process for the async_ps tests: a small model, gradients drawn from a seeded generator, `--steps`
steps (`--sleep` seconds each), configured by the launcher's environment (DSQ_PS_*). Prints one JSON line of its
counters at the end."""
import argparse
import json
import os
import sys
import time

import torch

import async_ps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--finish", action="store_true", help="wait for all workers, then pull the final model")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    worker = async_ps.Worker.from_env(model, opt, heartbeat_interval=0.2, server_timeout=3.0, reconnect_timeout=30.0)
    gen = torch.Generator().manual_seed(os.getpid())
    for _ in range(args.steps):
        for q in worker.params:
            q.grad = torch.randn(q.shape, generator=gen)
        worker.step()
        if args.sleep:
            time.sleep(args.sleep)
    worker.finish(wait=args.finish)
    # one write per line: the workers share the launcher's stdout, and print's two writes (line, then newline)
    # interleave between processes when it is unbuffered (PYTHONUNBUFFERED=1)
    sys.stdout.write(json.dumps({"worker": worker.worker_id, "accepted": worker.accepted, "rejected": worker.rejected,
                                 "rejoins": worker.rejoins, "version": worker.version}) + "\n")
    sys.stdout.flush()
    worker.close()


if __name__ == "__main__":
    main()
