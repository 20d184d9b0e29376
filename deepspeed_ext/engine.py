"""DoubleSqueeze in a DeepSpeed engine's gradient communication.

DeepSpeed has no communication-hook API, so `install` replaces the one method through which the engine reduces
the gradients of an accumulation boundary, on this engine instance only (nothing in DeepSpeed is patched):

* ZeRO stage 0 (and DeepSpeed's BF16_Optimizer): `engine.buffered_allreduce_fallback`, which stock DeepSpeed
  calls from `allreduce_gradients` at each boundary (so `no_sync`, `enable_backward_allreduce` and gradient
  accumulation keep their meaning);
* ZeRO stage 1: `optimizer.reduce_gradients`. Ours averages the full gradients, then runs the optimizer's
  own epilogue, which finds its buckets empty and copies this rank's partition (no communication).

Either way each parameter's gradient goes through the core's `BucketPipeline` (`engine.doublesqueeze_pipeline`,
over `engine.doublesqueeze`: block by block, one all_to_all up and one all_gather down per bucket, compressed bytes
only), keyed by its name in the model; the buckets are pipelined (each one compresses while the one before it
travels). DeepSpeed's `overlap_comm` (reducing
inside backward hooks) is not used: at stage 0 DeepSpeed itself reduces only after backward, and at stage 1
DoubleSqueeze replaces the reduction that `overlap_comm` would run in those hooks, so it is refused there. DeepSpeed's
averaging settings keep their math: the collective receives ``g * pre`` and the gradient becomes
``W * post * mean``, with (pre, post) = (1, 1) for `"gradient_allreduce_op": "sum"` (no averaging),
(1/f, f/W) by default (f = `gradient_predivide_factor`), (1/W, 1) with `prescale_gradients`; so residuals
live in units of ``g * pre``. Clipping and the optimizer step run after, on the averaged gradient, as in stock
DeepSpeed.

fp16 (ZeRO 1; ZeRO 2 and 3 in `zero_state.py`): DeepSpeed's loss scaler multiplies the gradients by its scale,
and the residuals are kept in those units (`loss_scale.py`: rescaled by new / old when the scale changes). Before
anything is compressed the ranks agree whether some gradient overflowed (one all-reduce of a flag); if so every
gradient becomes Inf, DeepSpeed skips the step on every rank, and no residual changes. ZeRO 0 under fp16 is refused:
DeepSpeed does not scale the loss there (deepspeedai/DeepSpeed#8393).

Checkpoints: `engine.save_checkpoint` also writes ``doublesqueeze_rank_XXXXX.pt`` per rank in the tag's
folder (before DeepSpeed writes `latest`), and `engine.load_checkpoint` reads it back. A checkpoint from another
world size (DeepSpeed loads one at ZeRO 0, and at every stage a universal checkpoint, ``"checkpoint":
{"load_universal": true}``, made by ``ds_to_universal`` with the files copied beside it) is resumed from every
rank's file with the residuals' mass kept (`dsq_plugins.engine.reshard` at ZeRO 0/1,
`ShardedZeroState.load_resharded` at ZeRO-2/3); one without the files starts the residuals from zero with a
warning; one from another DoubleSqueeze config is refused.
"""
import functools
import glob
import os
import types
import warnings
from typing import List, Optional, Tuple

import deepspeed.comm as ds_dist
import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import groups

from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.engine.collective import DoubleSqueezeCollective
from dsq_plugins.engine.communicator import TorchDistributedCommunicator
from dsq_plugins.engine.pipeline import BucketPipeline, grad_or_zeros, outputs_for, plan_buckets, write_back
from dsq_plugins.engine.policy import TensorInfo, infer_roles
from dsq_plugins.engine.reshard import reshard_state_dicts
from dsq_plugins.monitoring.monitor import Monitor

from . import zero2, zero3
from .config import DoubleSqueezeSection
from .loss_scale import LossScaleUnits, agree_on_overflow

__all__ = ["DeepSpeedMonitor", "install"]

_FILE = "doublesqueeze_rank_{:05d}.pt"


class DeepSpeedMonitor(Monitor):
    """Writes the metrics through the engine's own monitor (its "tensorboard", "csv_monitor"... sections), so
    they appear beside DeepSpeed's, on its x-axis: the samples seen once this step is taken (the reduction
    runs before `engine.step()` adds the step's `train_batch_size`). Only global rank 0 writes."""

    def __init__(self, engine, every: int = 1, prefix: str = "dsq/"):
        super().__init__(every, prefix)
        self.engine = engine

    def log_scalar(self, tag: str, value: float, step: int) -> None:
        samples = self.engine.global_samples + self.engine.train_batch_size()
        self.engine.monitor.write_events([(tag, float(value), samples)])


def _refuse_unsupported(engine, config: DoubleSqueezeConfig) -> None:
    stage = engine.zero_optimization_stage()
    if getattr(engine, "pipeline_parallelism", False):
        raise NotImplementedError("DoubleSqueeze does not support DeepSpeed pipeline parallelism yet")
    if stage > 3:
        raise NotImplementedError(f"DoubleSqueeze supports ZeRO stages 0 to 3, not {stage}")
    reasons = {
        "fp16 at ZeRO stage 0 (DeepSpeed does not scale the loss there, deepspeedai/DeepSpeed#8393, so the "
        "gradients are not in the units of its loss scaler; use ZeRO stage 1 to 3 or bf16)":
            stage == 0 and engine.fp16_enabled(),
        "mixture-of-experts layers": getattr(engine, "has_moe_layers", False),
        "sequence parallelism": getattr(engine, "sequence_parallel_size", 1) > 1,
        "ZeRO CPU offload": bool(engine.zero_cpu_offload()),
        "DeepCompile": engine.is_deepcompile_active() if hasattr(engine, "is_deepcompile_active") else False,
        "ZenFlow": bool(getattr(engine, "zenflow", False)),
    }
    if stage == 1 and not isinstance(engine.optimizer, BF16_Optimizer):
        reasons["zero_optimization.overlap_comm (it reduces inside backward hooks)"] = bool(engine.zero_overlap_comm())
    if stage == 2:
        reasons.update({f"{what} under ZeRO-2": True for what in zero2.refusals(config)})
    if stage == 3:
        reasons.update({f"{what} under ZeRO-3": True for what in zero3.refusals(config)})
        reasons["ZeRO++'s quantized weights or gradients (zero_quantized_weights, zero_quantized_gradients: the "
                "section compresses both)"] = bool(
            getattr(engine._config.zero_config, "zero_quantized_weights", False)
            or getattr(engine._config.zero_config, "zero_quantized_gradients", False))
        reasons["ZeRO++'s hierarchical partitioning (zero_hpz_partition_size > 1)"] = \
            getattr(engine._config.zero_config, "zero_hpz_partition_size", 1) > 1
        reasons["ZeRO-2 with the bf16 optimizer"] = isinstance(engine.optimizer, BF16_Optimizer)
    bad = [what for what, on in reasons.items() if on]
    if bad:
        raise NotImplementedError(f"DoubleSqueeze does not support {', '.join(bad)} yet; disable it or the "
                                  f"\"doublesqueeze\" section")


def _scaling(engine, world: int) -> Tuple[float, float]:
    """(pre, post) of DeepSpeed's averaging settings: stock reduces to ``post * sum_i(pre * g_i)``."""
    if not engine.gradient_average:
        return 1.0, 1.0
    if engine.postscale_gradients():
        f = engine.gradient_predivide_factor()
        return 1.0 / f, f / world
    return 1.0 / world, 1.0


def _average(engine, named: List[Tuple[str, torch.Tensor]]) -> None:
    """Replace each gradient in `named` by its DoubleSqueeze average over the data-parallel group, in place:
    buckets of `bucket_mb` (one dtype each) through the engine's `BucketPipeline`."""
    dsq: DoubleSqueezeCollective = engine.doublesqueeze
    pipeline: BucketPipeline = engine.doublesqueeze_pipeline
    pre, post = _scaling(engine, dsq.world_size)
    issued = []
    for bucket in plan_buckets(named, dsq.config.bucket_mb):
        grads = [named[i][1] for i in bucket]
        items = [(named[i][0], g.reshape(-1) * pre if pre != 1.0 else g.reshape(-1)) for i, g in zip(bucket, grads)]
        outs = outputs_for(grads)
        issued.append((grads, outs, pipeline.issue(items, outs)))
    closed = pipeline.end_step()
    for grads, outs, done in issued:
        done.wait()
        write_back(grads, outs, dsq.world_size * post)
    closed.wait()


def _skipped_for_overflow(engine, grads: List[torch.Tensor]) -> bool:
    """Under fp16 (`loss_scale.py`), before anything is compressed: whether some rank's gradients overflowed (then
    every rank's become Inf, DeepSpeed skips the step and the collective counts it, no residual changes); else the
    residuals are put in this step's loss-scale units. False without fp16."""
    units: Optional[LossScaleUnits] = engine.doublesqueeze_loss_scale
    if units is None:
        return False
    if agree_on_overflow(grads, groups._get_data_parallel_group()):
        engine.doublesqueeze.skip_step()
        return True
    units.follow(engine.optimizer, engine.doublesqueeze.scale_residuals)
    return False


def _stage0_reduce(self, grads=None, elements_per_buffer=500000000):
    """`engine.buffered_allreduce_fallback`, with DoubleSqueeze in place of the all-reduce."""
    if grads is not None:
        raise NotImplementedError("DoubleSqueeze reduces the engine's own gradients (grads=None)")
    names = self.param_names
    if isinstance(self.optimizer, BF16_Optimizer):
        named = [(names[p], self.optimizer.fp32_groups_gradients[i][j])
                 for i, group in enumerate(self.optimizer.bf16_groups) for j, p in enumerate(group)]
    else:
        named = []
        for name, p in self.module.named_parameters():
            if not p.requires_grad or p.numel() == 0:
                continue
            if grad_or_zeros(p).is_sparse:
                raise NotImplementedError(f"parameter {name!r} has a sparse gradient; DoubleSqueeze compresses "
                                          f"dense gradients")
            named.append((name, p.grad))
    if not _skipped_for_overflow(self, [g for _, g in named]):
        _average(self, named)


def _stage1_reduce(self, pipeline_parallel=False, *, engine):
    """`DeepSpeedZeroOptimizer.reduce_gradients` for stage 1: average every gradient with DoubleSqueeze, then
    the optimizer's own epilogue (its buckets are empty, so it only copies this rank's partition)."""
    named = []
    for group in self.bit16_groups:
        for p in group:
            g = self.get_gradient_for_reduction(p)
            if g is None:
                g = torch.zeros_like(p, dtype=self._gradient_reduction_buffer_dtype())
                if self.use_grad_accum_attribute:
                    p.grad_accum = g
                else:
                    p.grad = g
            named.append((engine.param_names[p], g))
    if not _skipped_for_overflow(engine, [g for _, g in named]):
        _average(engine, named)
    if self.contiguous_gradients:
        self.setup_buckets()
    self.overlapping_partition_gradients_reduce_epilogue()


def _refuse_coalesced(self, *args, **kwargs):
    raise NotImplementedError("engine.coalesce_grad_reduction() bypasses DoubleSqueeze's gradient reduction")


def _checkpoint_file(folder: str, rank: int) -> str:
    return os.path.join(folder, _FILE.format(rank))


def save_rank_files(engine, write) -> None:
    """Wrap `engine.save_checkpoint` so that every rank first calls ``write(folder)`` (its own file in the tag's
    folder), all of them before DeepSpeed writes `latest`."""
    save = engine.save_checkpoint

    def save_checkpoint(save_dir, tag=None, client_state={}, save_latest=True, **kwargs):
        tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
        folder = os.path.join(save_dir, tag)
        os.makedirs(folder, exist_ok=True)
        write(folder)
        ds_dist.barrier()        # every rank's file exists before DeepSpeed writes `latest`
        return save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest, **kwargs)

    save_checkpoint.__doc__ = save.__doc__
    engine.save_checkpoint = save_checkpoint


def _wrap_checkpoints(engine) -> None:
    dsq = engine.doublesqueeze
    units: Optional[LossScaleUnits] = engine.doublesqueeze_loss_scale

    def write(folder):
        sd = dsq.state_dict()
        if units is not None:
            sd["loss_scale_units"] = units.scale         # the scale the saved residuals are in units of
        torch.save(sd, _checkpoint_file(folder, dsq.rank))

    save_rank_files(engine, write)
    load = engine.load_checkpoint

    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        load_path, client_state = load(load_dir, tag, *args, **kwargs)
        if load_path is None:
            return load_path, client_state
        folder = os.path.dirname(load_path)
        path = _checkpoint_file(folder, dsq.rank)
        sd = torch.load(path, map_location="cpu", weights_only=False) if os.path.isfile(path) else None
        every = sorted(glob.glob(os.path.join(folder, _FILE.replace("{:05d}", "*"))))
        if sd is not None and sd.get("world_size") == dsq.world_size:
            dsq.load_state_dict(sd)      # refuses another config, naming the differing keys
        elif every:
            # another number of ranks (DeepSpeed loads one at ZeRO 0, and at any stage from a universal
            # checkpoint): every rank's file, the residuals' mass kept
            def saved():            # on the CPU, one at a time (files sorted by rank)
                return (torch.load(f, map_location="cpu", weights_only=False) for f in every)
            if isinstance(dsq, DoubleSqueezeCollective):
                sd = reshard_state_dicts(list(saved()), dsq.world_size, dsq.rank)
                dsq.load_state_dict(sd)
            else:
                sd = dsq.load_resharded(saved())
        else:
            warnings.warn(f"checkpoint {folder} has no DoubleSqueeze state for this rank ({dsq.rank} of "
                          f"{dsq.world_size}): DoubleSqueeze residuals start from zero (a universal checkpoint made "
                          f"by ds_to_universal: copy the {_FILE.replace('{:05d}', '*')} files of the checkpoint it "
                          f"was converted from into {folder})")
            dsq.reset_residuals()
            return load_path, client_state
        if units is not None:
            units.scale = sd.get("loss_scale_units")
        return load_path, client_state

    load_checkpoint.__doc__ = load.__doc__
    engine.load_checkpoint = load_checkpoint


def install(engine, config, monitor: Optional[Monitor] = None):
    """Install DoubleSqueeze in `engine`'s gradient communication; returns the engine.

    Args:
        engine: a `DeepSpeedEngine` (ZeRO stage 0 to 3; stages 2 and 3: `zero2.py`, `zero3.py`).
        config: a `DoubleSqueezeConfig`, a `DoubleSqueezeSection`, or the section as a dict.
        monitor: where the metrics go; default: the engine's own monitor, when its config enables one.
    The collective is `engine.doublesqueeze` (residuals, counters, `state_dict`); the pipeline that runs its
    buckets, `engine.doublesqueeze_pipeline`.
    """
    if getattr(engine, "doublesqueeze", None) is not None:
        raise RuntimeError("DoubleSqueeze is already installed in this engine")
    if isinstance(config, dict):
        config = DoubleSqueezeSection(**dict(config, enabled=True))
    param_compressor = DoubleSqueezeSection.model_fields["param_compressor"].default
    residual_dtype = DoubleSqueezeSection.model_fields["residual_dtype"].default
    if isinstance(config, DoubleSqueezeSection):
        param_compressor, residual_dtype = config.param_compressor, config.residual_dtype
        config = config.to_config()
    if not isinstance(config, DoubleSqueezeConfig):
        raise TypeError(f"config must be a DoubleSqueezeConfig, a DoubleSqueezeSection or a dict, got "
                        f"{type(config).__name__}")
    _refuse_unsupported(engine, config)
    if monitor is None and getattr(getattr(engine, "monitor", None), "enabled", False):
        monitor = DeepSpeedMonitor(engine)
    optimizer = engine.optimizer
    stage = engine.zero_optimization_stage()
    if stage != 3 and param_compressor != DoubleSqueezeSection.model_fields["param_compressor"].default:
        raise ValueError(f"\"param_compressor\" compresses ZeRO-3's parameter gathers; this engine runs ZeRO "
                         f"stage {stage}: leave it out")
    if stage < 2 and residual_dtype != DoubleSqueezeSection.model_fields["residual_dtype"].default:
        raise ValueError(f"\"residual_dtype\" stores ZeRO-2/3's worker residual; this engine runs ZeRO stage "
                         f"{stage}, whose residuals are float32 (for 16-bit gradients too): leave it out")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[residual_dtype]
    engine.doublesqueeze_loss_scale = LossScaleUnits() if engine.fp16_enabled() else None
    if stage == 3:
        engine.doublesqueeze = zero3.ZeroThreeState(optimizer, config, param_compressor, monitor,
                                                    engine.doublesqueeze_loss_scale, dtype)
        zero3.attach(engine, engine.doublesqueeze)
        engine.coalesce_grad_reduction = types.MethodType(_refuse_coalesced, engine)
        _wrap_checkpoints(engine)
        return engine
    if stage == 2:
        engine.doublesqueeze = zero2.ZeroTwoState(optimizer, config, monitor, engine.doublesqueeze_loss_scale,
                                                  dtype)
        zero2.attach(optimizer, engine.doublesqueeze)
        engine.coalesce_grad_reduction = types.MethodType(_refuse_coalesced, engine)
        _wrap_checkpoints(engine)
        return engine
    group = groups._get_data_parallel_group()
    infos = {name: TensorInfo(name, tuple(p.shape), roles) for name, (p, roles) in infer_roles(engine.module).items()}
    engine.doublesqueeze = DoubleSqueezeCollective(config, TorchDistributedCommunicator(group), monitor,
                                                   tensor_info=infos.get)
    engine.doublesqueeze.policy.check([i for n, i in infos.items() if engine.module.get_parameter(n).requires_grad])
    engine.doublesqueeze_pipeline = BucketPipeline(engine.doublesqueeze, "dsq-deepspeed")

    if engine.zero_optimization_stage() == 0 or isinstance(optimizer, BF16_Optimizer):
        engine.buffered_allreduce_fallback = types.MethodType(_stage0_reduce, engine)
    elif isinstance(optimizer, DeepSpeedZeroOptimizer):
        if optimizer.cpu_offload:
            raise NotImplementedError("DoubleSqueeze does not support ZeRO CPU offload yet")
        optimizer.reduce_gradients = types.MethodType(functools.partial(_stage1_reduce, engine=engine), optimizer)
    else:
        raise NotImplementedError(f"DoubleSqueeze cannot hook ZeRO stage {engine.zero_optimization_stage()} "
                                  f"with optimizer {type(optimizer).__name__}")
    engine.coalesce_grad_reduction = types.MethodType(_refuse_coalesced, engine)
    _wrap_checkpoints(engine)
    return engine
