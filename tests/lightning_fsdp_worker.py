"""Runs under torchrun: Lightning's Trainer with ModelParallelStrategy (FSDP2: `fully_shard` in configure_model on
the data-parallel mesh) and FSDPDoubleSqueezeCallback, on fsdp_worker.py's closed-form model, plain SGD. Each rank
writes OUT/rank{r}.pt: per step the full parameters and the worker residuals (as fsdp_worker.py).

    --steps N   --save-every K (ModelCheckpoint every K steps)   --resume CKPT
"""
import argparse
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

import dsq_plugins as dsq
from dsq_plugins.lightning_callback import FSDPDoubleSqueezeCallback
from checks import shut_down_and_exit
from fsdp_worker import LR, SHAPES, Root, coefficients


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.root = Root()
        self.records = []

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for unit in (self.root.a, self.root.b, self.root):
            fully_shard(unit, mesh=mesh, reshard_after_forward=False)

    def training_step(self, data, i):
        cs = {n: coefficients(self.global_rank, self.global_step, n) for n in SHAPES}
        return self.root(cs)

    def on_train_batch_end(self, outputs, data, i):
        state = self.trainer.callbacks[0].state
        self.records.append({"step": self.global_step - 1,
                             "params": {n: p.full_tensor().detach().clone() for n, p in self.root.named_parameters()},
                             "worker": {k: v.clone() for k, v in state.worker_residuals().items()},
                             "replicas": {k: v.clone() for k, v in state.replicas().items()}})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dsq.DoubleSqueezeConfig(compressor="sign", block_size=16, min_numel=0, guard=0.0)
    callbacks = [FSDPDoubleSqueezeCallback(config, downlink="delta")]
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.save_every, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", devices=2, max_steps=args.steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=bool(args.save_every), callbacks=callbacks,
                        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                       process_group_backend="gloo"))
    module = Module()
    loader = torch.utils.data.DataLoader(torch.zeros(args.steps, 1), batch_size=1)
    trainer.fit(module, train_dataloaders=loader, ckpt_path=args.resume)
    torch.save({"records": module.records, "step": callbacks[0].state.step}, out / f"rank{trainer.global_rank}.pt")
    shut_down_and_exit()


if __name__ == "__main__":
    main()
