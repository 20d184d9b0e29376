"""Runs under torchrun: Lightning's Trainer with DDPStrategy(ddp_comm_state=DoubleSqueezeState(...),
ddp_comm_hook=doublesqueeze_hook), the state built before the process group exists, and DoubleSqueezeCallback.
Each rank writes OUT/rank{r}.pt: per step its local gradient (a tensor hook, before DDP's reduction) and the update
(recovered from the weights: plain SGD with lr 0.5), the final weights and residuals.

    --steps N   --save-every K (ModelCheckpoint every K steps)   --resume CKPT
"""
import argparse
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

import dsq_plugins as dsq
from dsq_plugins.frontends.lightning_callback import DoubleSqueezeCallback
from checks import shut_down_and_exit
from workload import batch, build_model

LR = 0.5


class Module(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = build_model("single")
        self.records = []
        self.net.weight.register_hook(self._local_grad)
        self._g = None

    def _local_grad(self, g):
        self._g = g.detach().reshape(-1).clone()

    def training_step(self, data, i):
        # the batch of (step, rank), as in the other integration tests: a resumed run sees the same ones
        x, y = batch(self.global_step, 0, self.global_rank, "single")
        self._before = self.net.weight.detach().reshape(-1).clone()
        return ((self.net(x) - y) ** 2).mean()

    def on_train_batch_end(self, outputs, data, i):
        c = (self._before - self.net.weight.detach().reshape(-1)) / LR
        self.records.append({"g": {"weight": self._g}, "c": {"weight": c}})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--devices", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="sign", min_numel=16, block_size=256))
    callbacks = [DoubleSqueezeCallback(state)]
    if args.save_every:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=args.save_every, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, max_steps=args.steps, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(args.save_every),
                        callbacks=callbacks,
                        strategy=DDPStrategy(process_group_backend="gloo", ddp_comm_state=state,
                                             ddp_comm_hook=dsq.doublesqueeze_hook))
    module = Module()
    rank = trainer.global_rank
    loader = torch.utils.data.DataLoader(torch.zeros(args.steps, 1), batch_size=1)      # steps; data: see above
    trainer.fit(module, train_dataloaders=loader, ckpt_path=args.resume)
    w, s = state.worker_residuals(), state.server_residuals()
    torch.save({"records": module.records, "step": state.step,
                "worker_residual": {"weight": w[0]} if 0 in w else {},
                "server_residual": {"weight": state.expand_server_residual(0, s[0], 2000)} if 0 in s else {},
                "params": {"weight": module.net.weight.detach().clone()}}, out / f"rank{rank}.pt")
    shut_down_and_exit()


if __name__ == "__main__":
    main()
