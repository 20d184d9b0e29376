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
from ..monitoring.monitor import Monitor

__all__ = ["DoubleSqueezeCallback", "STATE_FILE"]

STATE_FILE = "doublesqueeze_rank_{rank:05d}.pt"         # as deepspeed_ext names its files


class DoubleSqueezeCallback(TrainerCallback):
    """Registers the DoubleSqueeze DDP hook on `trainer`'s model and keeps its residuals in the checkpoints.

    Args:
        trainer: the `transformers.Trainer` (its DDP model exists only once `train()` has prepared it).
        config: the `DoubleSqueezeConfig` (default: `DoubleSqueezeConfig()`, the README's default).
        monitor: optional `dsq_plugins.Monitor`.
        resume_from: a checkpoint folder to load the residuals from when training resumes (default: the
            Trainer's ``output_dir/checkpoint-{global_step}``).
    The state is `callback.state` (counters, residuals).
    """

    def __init__(self, trainer, config: Optional[DoubleSqueezeConfig] = None, monitor: Optional[Monitor] = None,
                 resume_from: Optional[str] = None):
        self.trainer = trainer
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
        ddp.register_comm_hook(self.state, doublesqueeze_hook)
        self._registered = True
        if state.global_step > 0:
            folder = self.resume_from or os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            path = os.path.join(folder, STATE_FILE.format(rank=args.process_index))
            every = sorted(glob.glob(os.path.join(folder, STATE_FILE.replace("{rank:05d}", "*"))))
            if not every:
                raise FileNotFoundError(f"resuming at step {state.global_step}, but {folder} holds no DoubleSqueeze "
                                        f"residuals ({os.path.basename(path)}...); pass resume_from= the checkpoint "
                                        f"folder")
            mine = torch.load(path, weights_only=False) if os.path.isfile(path) else None
            if mine is not None and mine.get("world_size") == args.world_size:
                self.state.load_state_dict(mine)
            else:                                  # saved by another number of ranks: all files, the mass kept
                self.state.load_resharded([torch.load(f, weights_only=False) for f in every])

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.state.state_dict(), os.path.join(folder, STATE_FILE.format(rank=args.process_index)))
