"""DoubleSqueeze in Lightning: the DDP hook through `DDPStrategy`, the residuals through Lightning's checkpoints.

    import dsq_plugins as dsq
    from dsq_plugins.frontends.lightning_callback import DoubleSqueezeCallback
    from lightning.pytorch.strategies import DDPStrategy

    state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="sign"))   # before the process group exists
    trainer = L.Trainer(strategy=DDPStrategy(ddp_comm_state=state, ddp_comm_hook=dsq.doublesqueeze_hook),
                        callbacks=[DoubleSqueezeCallback(state)], ...)
    trainer.fit(model, ckpt_path=...)                                             # resumes the residuals exactly

The callback does two things Lightning does not:
- Lightning's DDPStrategy registers communication hooks on CUDA only (on the CPU it drops them without a word, so
  a gloo run would train dense): the callback registers the hook on the strategy's DDP model wherever Lightning did
  not (the `DDPStrategy` arguments may then be left out);
- Lightning writes a checkpoint from rank 0 only, and residuals are per rank: the callback gathers every rank's
  `state_dict()` into the checkpoint (key ``"doublesqueeze"``, a list by global rank) and each rank loads its own on
  resume. A checkpoint from another number of ranks is resumed with the residuals redistributed, their mass kept
  (`DoubleSqueezeState.load_resharded`); under ModelParallelStrategy it is refused with the reason.
Under Lightning's ModelParallelStrategy (FSDP2, `fully_shard` in ``configure_model``), `FSDPDoubleSqueezeCallback`
installs `dsq_plugins.fsdp` on the LightningModule once the strategy has set it up, and saves and restores the
residuals the same way (into the checkpoint's metadata file, beside the distributed checkpoint)::

    trainer = L.Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                        callbacks=[FSDPDoubleSqueezeCallback(dsq.DoubleSqueezeConfig())], ...)

Lightning's DeepSpeedStrategy needs no callback: the DeepSpeed config's "doublesqueeze" section switches it on
(`deepspeed_ext`), and its residuals go into DeepSpeed's checkpoint folders.
"""
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.nn.parallel import DistributedDataParallel

from .ddp_hook import DoubleSqueezeState, doublesqueeze_hook

__all__ = ["DoubleSqueezeCallback", "FSDPDoubleSqueezeCallback", "CHECKPOINT_KEY"]

CHECKPOINT_KEY = "doublesqueeze"


class _RanksInCheckpoint(Callback):
    """Every rank's `state.state_dict()` into Lightning's checkpoint (a list by global rank), this rank's back."""

    state = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        mine = self.state.state_dict()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)          # every rank builds the checkpoint; rank 0 writes it
        else:
            every = [mine]
        checkpoint[CHECKPOINT_KEY] = every

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        every = checkpoint.get(CHECKPOINT_KEY)
        if every is None:
            return                                        # a checkpoint from a run without DoubleSqueeze
        if isinstance(self.state, DoubleSqueezeState):
            self.state.load_resharded(every)             # its own state if the run had as many ranks
            return
        if len(every) != trainer.world_size:
            raise ValueError(f"this checkpoint holds DoubleSqueeze residuals of {len(every)} ranks, the run has "
                             f"{trainer.world_size}: residuals are per rank and per owned block")
        self.state.load_state_dict(every[trainer.global_rank])


class DoubleSqueezeCallback(_RanksInCheckpoint):
    """Makes sure the DoubleSqueeze hook is registered on the strategy's DDP model, saves every rank's state in
    Lightning's checkpoints and restores this rank's from them."""

    def __init__(self, state: DoubleSqueezeState):
        self.state = state

    def on_fit_start(self, trainer, pl_module) -> None:
        model = trainer.strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise RuntimeError(f"DoubleSqueezeCallback needs Lightning's DDPStrategy (the model is a "
                               f"{type(model).__name__}); with DeepSpeedStrategy use the config's \"doublesqueeze\" "
                               f"section instead")
        hooks = getattr(model, "_comm_hooks", [])
        if not any(state is self.state for _, state in hooks):
            model.register_comm_hook(self.state, doublesqueeze_hook)


class FSDPDoubleSqueezeCallback(_RanksInCheckpoint):
    """DoubleSqueeze under `ModelParallelStrategy`: `dsq_plugins.fsdp.install` on the LightningModule at
    ``on_fit_start`` (after ``configure_model`` has called `fully_shard`), residuals in Lightning's checkpoints.

    Args:
        config: a `DoubleSqueezeConfig` (default: ``DoubleSqueezeConfig()``).
        **install_kwargs: passed to `dsq_plugins.fsdp.install` (``downlink``, ``monitor``, ``replicate_group``...).

    Attributes:
        state: the `FSDPDoubleSqueezeState`, once fitting has started.
    """

    def __init__(self, config=None, **install_kwargs):
        self.config, self.install_kwargs = config, install_kwargs
        self.state = None

    def on_fit_start(self, trainer, pl_module) -> None:
        from .fsdp import install
        if type(trainer.strategy).__name__ != "ModelParallelStrategy":
            raise RuntimeError(f"FSDPDoubleSqueezeCallback needs Lightning's ModelParallelStrategy (got "
                               f"{type(trainer.strategy).__name__}); with DDPStrategy use DoubleSqueezeCallback")
        if self.state is None:
            self.state = install(pl_module, self.config, **self.install_kwargs)
