"""DoubleSqueeze in the Hugging Face Trainer's DDP mode (no DeepSpeed): a `TrainerCallback`.

    from dsq_plugins.frontends.hf_trainer import DoubleSqueezeCallback

    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.add_callback(DoubleSqueezeCallback(trainer, dsq.DoubleSqueezeConfig(compressor="sign")))
    trainer.train()                                    # or trainer.train(resume_from_checkpoint=True)

At the start of training the callback registers `doublesqueeze_hook` on the Trainer's DDP model (which Accelerate
builds inside `train()`, hence the trainer reference); every checkpoint the Trainer saves gets this rank's state
as ``doublesqueeze_rank_XXXXX.pt`` beside the model, and a resumed run (``global_step`` > 0 at the start) loads it back
from ``output_dir/checkpoint-{global_step}`` (or `resume_from`), so the residuals continue exactly. Resumed on another
number of processes, every rank reads every rank's file and the residuals are redistributed with their mass kept
(`DoubleSqueezeState.load_resharded`).

`dsq.DoubleSqueezeAdamW` as the Trainer's optimizer (``Trainer(..., optimizers=(opt, scheduler))``): the same
callback, without a config, attaches the optimizer to the Trainer's DDP model (`DoubleSqueezeAdamW.attach_ddp`: its
warm-up's gradients through the DDP hook, then the momentum in `step()`), and keeps every rank's optimizer state in
the checkpoints (``doublesqueeze_adamw_rank_XXXXX.pt``; the Trainer's own ``optimizer.pt`` is rank 0's only):

    opt = dsq.DoubleSqueezeAdamW(model.parameters(), lr=3e-3, warmup_steps=200)
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
    trainer.add_callback(DoubleSqueezeCallback(trainer))

The Trainer clips gradients (``max_grad_norm``, 1.0 by default) before the optimizer step; once the variance is
frozen the gradients are each rank's own there, so each rank clips its own, as under DeepSpeed. fp16 with the
Trainer's loss scaler is refused (the scaler would decide each rank's skip alone); bf16 and fp32 run.

With DeepSpeed (``TrainingArguments(deepspeed=...)``) use the config's "doublesqueeze" section instead: it needs no
callback (see `deepspeed_ext`), and this callback refuses to run beside it.
"""
import glob
import os
from typing import Optional

import torch
from transformers import TrainerCallback

from ..config import DoubleSqueezeConfig
from .ddp_hook import DoubleSqueezeState, doublesqueeze_hook
from .optim import DoubleSqueezeAdamW
from ..monitoring.monitor import Monitor

__all__ = ["DoubleSqueezeCallback", "STATE_FILE", "OPTIMIZER_FILE"]

STATE_FILE = "doublesqueeze_rank_{rank:05d}.pt"         # as deepspeed_ext names its files
OPTIMIZER_FILE = "doublesqueeze_adamw_rank_{rank:05d}.pt"


class DoubleSqueezeCallback(TrainerCallback):
    """Registers the DoubleSqueeze DDP hook on `trainer`'s model and keeps its residuals in the checkpoints.

    Args:
        trainer: the `transformers.Trainer` (its DDP model exists only once `train()` has prepared it).
        config: the `DoubleSqueezeConfig` (default: `DoubleSqueezeConfig()`, the README's default). None with a
            `DoubleSqueezeAdamW` as the Trainer's optimizer: the optimizer's own configs say how it compresses.
        monitor: optional `dsq_plugins.Monitor`.
        resume_from: a checkpoint folder to load the residuals from when training resumes (default: the
            Trainer's ``output_dir/checkpoint-{global_step}``).
    The state is `callback.state` (counters, residuals); with a `DoubleSqueezeAdamW`, `callback.optimizer`.
    """

    def __init__(self, trainer, config: Optional[DoubleSqueezeConfig] = None, monitor: Optional[Monitor] = None,
                 resume_from: Optional[str] = None):
        self.trainer = trainer
        self.config, self.monitor = config, monitor
        self.state: Optional[DoubleSqueezeState] = None
        self.optimizer: Optional[DoubleSqueezeAdamW] = None
        if not isinstance(_inner(getattr(trainer, "optimizer", None)), DoubleSqueezeAdamW):
            self.state = DoubleSqueezeState(config or DoubleSqueezeConfig(), monitor=monitor)
        self.resume_from = resume_from
        self._registered = False

    def on_train_begin(self, args, state, control, **kwargs):
        if self._registered:
            return
        if getattr(self.trainer, "is_deepspeed_enabled", False):
            raise RuntimeError("DoubleSqueezeCallback registers a DDP hook; with DeepSpeed put a \"doublesqueeze\" "
                               "section in the DeepSpeed config instead (no callback needed)")
        ddp = self.trainer.model_wrapped
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(f"DoubleSqueezeCallback needs the Trainer to train with DDP (launch it with torchrun "
                               f"or accelerate launch on several processes); its model is a {type(ddp).__name__}")
        opt = _inner(self.trainer.optimizer)
        if isinstance(opt, DoubleSqueezeAdamW):
            if self.config is not None:
                raise ValueError("the Trainer's optimizer is a DoubleSqueezeAdamW, which compresses the momentum "
                                 "with its own configs, and DoubleSqueezeCallback was given a config for the "
                                 "gradients: choose one (DoubleSqueezeCallback(trainer) for the optimizer)")
            if getattr(getattr(self.trainer, "accelerator", None), "scaler", None) is not None:
                raise ValueError("DoubleSqueezeAdamW under the Trainer's fp16 loss scaler: once the variance is "
                                 "frozen each rank's gradient is its own, the scaler could skip the step on one "
                                 "rank and not on another, and the momentum's exchange would wait forever; train "
                                 "in bf16 or fp32")
            if self.monitor is not None and opt.monitor is None:
                opt.monitor = self.monitor
            opt._pending_sd = None    # the Trainer's resume loaded rank 0's optimizer.pt on every rank: _resume loads
            opt.attach_ddp(ddp)
            self.optimizer, self.state = opt, None
        else:
            ddp.register_comm_hook(self.state, doublesqueeze_hook)
        self._registered = True
        if state.global_step > 0:
            self._resume(args, state)

    def _resume(self, args, state) -> None:
        """Load this rank's saved state (the Trainer loaded the model, and rank 0's optimizer.pt, before)."""
        folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        name = OPTIMIZER_FILE if self.optimizer is not None else STATE_FILE
        path = os.path.join(folder, name.format(rank=args.process_index))
        every = sorted(glob.glob(os.path.join(folder, name.replace("{rank:05d}", "*"))))
        if not every:
            raise FileNotFoundError(f"resuming at step {state.global_step}, but {folder} holds no DoubleSqueeze "
                                    f"residuals ({os.path.basename(path)}...); pass resume_from= the checkpoint "
                                    f"folder")
        mine = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
        target = self.optimizer if self.optimizer is not None else self.state
        if mine is not None and mine.get("world_size") == args.world_size:
            target.load_state_dict(mine["optimizer"] if self.optimizer is not None else mine)
        else:                                  # saved by another number of ranks: all files, the mass kept
            saved = [torch.load(f, map_location="cpu", weights_only=False) for f in every]
            target.load_resharded([sd["optimizer"] for sd in saved] if self.optimizer is not None else saved)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        if self.optimizer is not None:
            torch.save({"world_size": args.world_size, "optimizer": self.optimizer.state_dict()},
                       os.path.join(folder, OPTIMIZER_FILE.format(rank=args.process_index)))
        else:
            torch.save(self.state.state_dict(), os.path.join(folder, STATE_FILE.format(rank=args.process_index)))


def _inner(optimizer):
    """The optimizer under Accelerate's `AcceleratedOptimizer` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)
