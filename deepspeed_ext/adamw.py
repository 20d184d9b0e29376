"""`dsq.DoubleSqueezeAdamW` as a DeepSpeed engine's optimizer: 1-bit Adam's construction (a variance warm-up, then
the whitened momentum compressed with both residuals), with any compressor, under stock `deepspeed.initialize`.

    optimizer = dsq.DoubleSqueezeAdamW(model.parameters(), lr=2e-3, warmup_steps=60)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)

The optimizer moves every byte: during its warm-up it averages the gradients with its `warmup_config`
(``int4:128``), then it reduces the whitened momentum with its `config` (``sign``). So `install_optimizer` binds it
to the engine's data-parallel group and turns the engine's own gradient all-reduce off through DeepSpeed's
published switch, ``engine.enable_backward_allreduce = False`` (the one DeepSpeed's own 1-bit optimizers used); a
dense all-reduce of the gradients beside it would spend the bytes the optimizer saves.

What it cannot honour fails before the first step, with the reason:

* ZeRO stages 1-3: they partition the optimizer state, while every rank needs the whole momentum and frozen
  variance to whiten its gradient (DeepSpeed's 1-bit Adam refuses ZeRO for the same reason);
* fp16 and bf16: DeepSpeed then wraps the optimizer and hands it flat fp32 partitions;
* ``"gradient_allreduce_op": "sum"`` (no averaging: the optimizer averages), pipeline parallelism, MoE, sequence
  parallelism, CPU offload;
* a ``"doublesqueeze"`` section beside it: the section compresses the gradients, this optimizer the momentum;
  choose one (the optimizer's own `config` and `warmup_config` say how it compresses).

``gradient_clipping`` (DeepSpeed's default is 1.0) clips each rank's local gradient, since the engine clips before
the optimizer averages; stock DeepSpeed clips the average. A warning says so once.

Checkpoints: the residuals differ by rank, while DeepSpeed saves the optimizer of rank 0 only; so
`engine.save_checkpoint` also writes every rank's `state_dict()` (``doublesqueeze_adamw_rank_XXXXX.pt``) in the
tag's folder, and `engine.load_checkpoint` loads the model through DeepSpeed and the optimizer from that file. A
checkpoint from another number of ranks is resumed with the residuals redistributed, their mass kept
(`DoubleSqueezeAdamW.load_resharded`); one without every rank's file is refused.
"""
import os
import warnings
from typing import Tuple

import deepspeed.comm as ds_dist
import torch
from deepspeed.utils import groups

from dsq_plugins.engine.communicator import TorchDistributedCommunicator
from dsq_plugins.frontends.optim import DoubleSqueezeAdamW

from .engine import DeepSpeedMonitor, save_rank_files

__all__ = ["install_optimizer", "uses_doublesqueeze_adamw"]

_FILE = "doublesqueeze_adamw_rank_{:05d}.pt"


def uses_doublesqueeze_adamw(engine) -> bool:
    """Whether `engine`'s optimizer (the one the user passed, under DeepSpeed's wrappers) is a
    `DoubleSqueezeAdamW`."""
    return isinstance(getattr(engine, "basic_optimizer", None), DoubleSqueezeAdamW)


def _refuse_unsupported(engine) -> None:
    stage = engine.zero_optimization_stage()
    reasons = {
        f"ZeRO stage {stage} (it partitions the optimizer state; every rank needs the whole momentum and frozen "
        f"variance to whiten its gradient)": stage > 0,
        "fp16 training (DeepSpeed wraps the optimizer around flat fp32 partitions)": engine.fp16_enabled(),
        "bf16 training (DeepSpeed wraps the optimizer around flat fp32 partitions)": engine.bfloat16_enabled(),
        "\"gradient_allreduce_op\": \"sum\" (the optimizer averages the gradients)": not engine.gradient_average,
        "pipeline parallelism": getattr(engine, "pipeline_parallelism", False),
        "mixture-of-experts layers": getattr(engine, "has_moe_layers", False),
        "sequence parallelism": getattr(engine, "sequence_parallel_size", 1) > 1,
        "ZeRO CPU offload": bool(engine.zero_cpu_offload()),
    }
    bad = [what for what, on in reasons.items() if on]
    if bad:
        raise NotImplementedError(f"DoubleSqueezeAdamW under DeepSpeed runs at ZeRO stage 0 in fp32 only; this "
                                  f"config has {', '.join(bad)}. Use stage 0 in fp32, or a torch optimizer with "
                                  f"the \"doublesqueeze\" section (gradient compression, ZeRO 0/1, bf16)")


def install_optimizer(engine) -> DoubleSqueezeAdamW:
    """Let the engine's `DoubleSqueezeAdamW` move the bytes: bind it to the data-parallel group, switch the
    engine's gradient all-reduce off, keep every rank's optimizer state in checkpoints. Returns the optimizer,
    also kept as `engine.doublesqueeze_optimizer`."""
    opt = engine.basic_optimizer
    if not isinstance(opt, DoubleSqueezeAdamW):
        raise TypeError(f"the engine's optimizer is {type(opt).__name__}, not a DoubleSqueezeAdamW")
    _refuse_unsupported(engine)
    opt.bind(TorchDistributedCommunicator(groups._get_data_parallel_group()), module=engine.module)
    if opt.monitor is None and getattr(getattr(engine, "monitor", None), "enabled", False):
        opt.monitor = DeepSpeedMonitor(engine)
    if engine.gradient_clipping() > 0:
        warnings.warn(f"DoubleSqueezeAdamW under DeepSpeed: gradient_clipping={engine.gradient_clipping()} clips "
                      f"each rank's local gradient (the optimizer averages after the engine clips); stock DeepSpeed "
                      f"clips the average. Set \"gradient_clipping\": 0 to turn it off", stacklevel=2)
    engine.enable_backward_allreduce = False
    engine.doublesqueeze_optimizer = opt
    _wrap_checkpoints(engine, opt)
    return opt


def _saved_world_size(folder: str) -> Tuple[int, dict]:
    """The number of ranks that saved the DoubleSqueezeAdamW files in `folder`, and rank 0's file; raises if any
    file is missing."""
    first = os.path.join(folder, _FILE.format(0))
    if not os.path.isfile(first):
        raise FileNotFoundError(f"{first} is missing: a DoubleSqueezeAdamW checkpoint keeps every rank's residuals "
                                f"in its own file (saved by engine.save_checkpoint)")
    sd0 = torch.load(first, map_location="cpu", weights_only=False)
    saved_world = sd0.get("world_size")
    if not isinstance(saved_world, int) or saved_world < 1:
        raise ValueError(f"{first} does not say how many ranks saved it (no 'world_size'): not a file "
                         f"engine.save_checkpoint wrote")
    missing = [_FILE.format(r) for r in range(saved_world) if not os.path.isfile(os.path.join(folder, _FILE.format(r)))]
    if missing:
        raise FileNotFoundError(f"the checkpoint in {folder} was saved by {saved_world} ranks, but "
                                f"{', '.join(missing)} are missing: every rank's residuals are needed to resume")
    return saved_world, sd0


def _wrap_checkpoints(engine, opt: DoubleSqueezeAdamW) -> None:
    rank, world = ds_dist.get_rank(group=groups._get_data_parallel_group()), engine.dp_world_size
    save_rank_files(engine, lambda folder: torch.save({"world_size": world, "optimizer": opt.state_dict()},
                                                      os.path.join(folder, _FILE.format(rank))))
    load = engine.load_checkpoint

    def load_checkpoint(load_dir, tag=None, load_module_strict=True, load_optimizer_states=True, *args, **kwargs):
        load_path, client_state = load(load_dir, tag, load_module_strict, False, *args, **kwargs)
        if load_path is None or not load_optimizer_states:
            return load_path, client_state
        folder = os.path.dirname(load_path)
        path = os.path.join(folder, _FILE.format(rank))
        saved_world, sd0 = _saved_world_size(folder)
        if saved_world == world:
            opt.load_state_dict((sd0 if rank == 0 else torch.load(path, map_location="cpu", weights_only=False))
                                ["optimizer"])
        else:                  # every saved rank's state, the residuals redistributed with their mass kept
            opt.load_resharded([sd0["optimizer"]] + [torch.load(os.path.join(folder, _FILE.format(r)),
                               map_location="cpu", weights_only=False)["optimizer"] for r in range(1, saved_world)])
        return load_path, client_state

    load_checkpoint.__doc__ = load.__doc__
    engine.load_checkpoint = load_checkpoint
