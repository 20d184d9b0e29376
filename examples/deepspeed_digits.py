"""DeepSpeed on scikit-learn's digits data, with DoubleSqueeze switched on by the "doublesqueeze" section of
the DeepSpeed config (examples/ds_config_doublesqueeze.json); the script only calls deepspeed_ext.initialize.

    deepspeed --num_accelerators 2 examples/deepspeed_digits.py --deepspeed_config examples/ds_config_doublesqueeze.json
    torchrun --standalone --nproc-per-node 2 examples/deepspeed_digits.py --deepspeed_config examples/ds_config_doublesqueeze.json

--compare-stock also trains stock DeepSpeed (the same config without the section, the same seeds) and prints
both. Rank 0 prints the test accuracy and MB sent per worker, `final_accuracy=0.XXXX` last; --json writes them.
"""
import argparse
import copy
import json
from pathlib import Path

import deepspeed
import torch

import deepspeed_ext
from digits_common import accuracy, digits, mlp, train_epochs


def train(config: dict, args, data, label: str) -> dict:
    model = mlp(args.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    engine, _, _, _ = deepspeed_ext.initialize(model=model, optimizer=optimizer, config=config)
    dsq = getattr(engine, "doublesqueeze", None)
    args.batch_size = engine.train_micro_batch_size_per_gpu()
    run = train_epochs(model, engine, engine, data, engine.global_rank, engine.world_size, args,
                       desc=label, backward=engine.backward)
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    w = engine.world_size
    # Stock DeepSpeed: what a ring all-reduce sends per rank, 2 (W - 1) / W of the gradients each step.
    sent = dsq.totals.bytes_sent if dsq else 2 * (w - 1) * grad_bytes * run["steps"] // w
    return {"accuracy": accuracy(model, data[2], data[3]), "final_loss": run["final_loss"], "steps": run["steps"],
            "seconds": run["seconds"], "mb_sent_per_worker": sent / 1e6, "zero_stage": engine.zero_optimization_stage(),
            "doublesqueeze": dsq.config.to_dict() if dsq else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-stock", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    deepspeed.add_config_arguments(ap)
    args = ap.parse_args()
    if not args.deepspeed_config:
        ap.error("--deepspeed_config is required (e.g. examples/ds_config_doublesqueeze.json)")
    config = json.loads(Path(args.deepspeed_config).read_text())
    deepspeed_ext.read_section(config)            # a bad section fails here, before anything starts

    torch.set_num_threads(1)
    deepspeed.init_distributed()
    data = digits(args.seed)
    results = {}
    if args.compare_stock:
        stock = copy.deepcopy(config)
        stock.pop(deepspeed_ext.SECTION, None)
        stock.pop("tensorboard", None)
        results["stock"] = train(stock, args, data, "stock")
    results["doublesqueeze" if deepspeed_ext.read_section(config) else "stock"] = train(config, args, data,
                                                                                        "doublesqueeze")
    if torch.distributed.get_rank() == 0:
        world = torch.distributed.get_world_size()
        print(f"\nDeepSpeed on digits, {world} ranks, {args.epochs} epochs")
        print(f"{'run':>14} {'ZeRO':>5} {'test acc':>9} {'final loss':>11} {'MB sent/worker':>15}")
        for name, r in results.items():
            print(f"{name:>14} {r['zero_stage']:>5} {r['accuracy']:>9.4f} {r['final_loss']:>11.4f} "
                  f"{r['mb_sent_per_worker']:>15.3f}")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(results, world_size=world), indent=2))
        print(f"final_accuracy={list(results.values())[-1]['accuracy']:.4f}")


if __name__ == "__main__":
    main()
