"""DoubleSqueeze as a PyTorch DDP communication hook, overlapped with backward.

Example::

    state = dsq.DoubleSqueezeState(dsq.DoubleSqueezeConfig(compressor="sign"))   # before or after init_process_group
    ddp_model.register_comm_hook(state, dsq.doublesqueeze_hook)
    ...
    torch.save(state.state_dict(), f"dsq_rank{rank}.pt")    # every rank saves its own residuals

The hook replaces DDP's all-reduce of a gradient bucket by the double pass of `DoubleSqueezeCollective` over the
bucket's parameters, block by block: ``C_w(g_i + e_i)`` goes up to each block's owner, the owners average and send
down ``C_s(mean + e)``, and DDP receives the result as the averaged gradient (docs/ARCHITECTURE.md sections 1 and 6).

Overlap: the hook runs the worker pass and issues the uplink (on the process group), then returns a future at
once; the state's `BucketPipeline` serves the buckets on its communication thread in the order they were issued
(server pass, downlink on a second process group), decodes each one's downlink once the next one has been served,
and completes each future, while backward goes on (a bucket sent dense, in warm-up or auto's dense mode, is one
all-reduce, averaged as soon as it arrives). The state
binds its process group at the first hook call, so it can be built before ``init_process_group`` (Lightning's
``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` and Accelerate do that), as `PowerSGDState` can.

Compression and residuals are per parameter and block, so DDP's bucket layout (which it rebuilds after the first
iteration, and which a resumed process starts afresh) does not change the result. Parameters are numbered in the
order the hook first sees them (DDP's initial bucket order: the same in every process for the same model and DDP
arguments); residuals, seeds and `state_dict` use that number.
"""
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config import DoubleSqueezeConfig
from ..engine.collective import DoubleSqueezeCollective
from ..engine.communicator import TorchDistributedCommunicator
from ..engine.pipeline import BucketPipeline
from ..engine.policy import TensorInfo, infer_roles, roles_from_shape, unwrap
from ..engine.reshard import reshard_state_dicts
from ..monitoring.monitor import Monitor, RoundStats

__all__ = ["DoubleSqueezeState", "doublesqueeze_hook"]

_FORMAT = "dsq-ddp-2"


class DoubleSqueezeState:
    """State of the DDP hook: a `DoubleSqueezeCollective` on a `torch.distributed` process group, the parameter
    numbers, and the `BucketPipeline` that runs the buckets. Picklable, and can be built before the process
    group exists (it binds at the first hook call), as `PowerSGDState`.

    Args:
        config: a `DoubleSqueezeConfig` (default: ``DoubleSqueezeConfig()``).
        process_group: the group to communicate in (default: the world), taken at the first hook call.
        monitor: optional `Monitor` (e.g. `TensorBoardMonitor`).
        module: the model (plain or DDP-wrapped; or later, `attach`): gives the parameters their names, in
            warnings, TensorBoard tags and the config's `policy` (name patterns, and the roles ``embedding`` and
            ``head``, need it; without it the policy knows each parameter by its shape).

    Attributes:
        collective: the `DoubleSqueezeCollective` (residuals, counters, policies).
    """

    def __init__(self, config: Optional[DoubleSqueezeConfig] = None, process_group=None,
                 monitor: Optional[Monitor] = None, *, module: Optional[torch.nn.Module] = None):
        self.collective = DoubleSqueezeCollective(config or DoubleSqueezeConfig(), None, monitor,
                                                  key_names=self.describe_key, tensor_info=self.tensor_info)
        self.process_group = process_group
        self.pipeline = BucketPipeline(self.collective, "dsq-ddp", begin_on_thread=False)
        self._numbers: Dict[int, int] = {}       # id(param) -> parameter number
        self._params: List[torch.Tensor] = []     # by number; keeps them alive so that ids stay unique
        self._pending_sd: Optional[dict] = None
        self._named: Dict[int, Tuple[str, frozenset]] = {}     # id(param) -> (qualified name, roles)
        self._module_infos: Optional[List[TensorInfo]] = None
        self._policy_checked = False
        if module is not None:
            self.attach(module)

    def attach(self, module: torch.nn.Module) -> None:
        """Name the parameters after `module` (the model, or its DDP / torch.compile wrapper): their roles come
        from their modules (`dsq_plugins.engine.policy.infer_roles`). Call before the first backward; the
        config's policy is checked against the model's parameters at the first hook call."""
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"attach takes the model (a torch.nn.Module), got {type(module).__name__}")
        if self._params:
            raise RuntimeError("attach the model before the first backward: the hook has numbered its parameters")
        roles = infer_roles(unwrap(module))
        self._named = {id(p): (name, r) for name, (p, r) in roles.items()}
        self._module_infos = [TensorInfo(name, tuple(p.shape), r) for name, (p, r) in roles.items()
                              if p.requires_grad]

    def tensor_info(self, key) -> Optional[TensorInfo]:
        """What the policy knows of parameter number `key`: its name and roles from the attached model, else
        its shape and the roles a shape shows."""
        if not isinstance(key, int) or key >= len(self._params):
            return None
        p = self._params[key]
        named = self._named.get(id(p))
        if named is not None:
            return TensorInfo(named[0], tuple(p.shape), named[1])
        return TensorInfo(None, tuple(p.shape), roles_from_shape(p.shape), named=False)

    def _check_policy(self, numbers: List[int]) -> None:
        """At the first hook call, before anything is compressed: the policy against the model's parameters (all
        of them, with a model attached; else those of the first bucket, by shape)."""
        if self._policy_checked or not self.collective.policy:
            return
        self._policy_checked = True
        unnamed = [i for i in map(self.tensor_info, numbers) if i is not None and not i.named]
        if unnamed or self._module_infos is None:
            self.collective.policy.check(unnamed, complete=False)
        else:
            self.collective.policy.check(self._module_infos, complete=True)

    # -- the process groups --------------------------------------------------------------------------------
    def bind_process_group(self) -> None:
        """Take the process group (and make the downlink's twin group) if not done yet. Called by the hook;
        every rank of the group reaches it at its first hook call."""
        if self.collective.bound:
            return
        up = TorchDistributedCommunicator(self.process_group)
        ranks = dist.get_process_group_ranks(self.process_group or dist.group.WORLD)
        backend = dist.get_backend(self.process_group)
        down_group = dist.new_group(ranks, backend=backend, use_local_synchronization=True) if up.size > 1 else None
        self.collective.bind(up, TorchDistributedCommunicator(down_group) if down_group is not None else None)
        if self._pending_sd is not None:
            sd, self._pending_sd = self._pending_sd, None
            self.collective.load_state_dict(sd)

    def __getstate__(self):
        """Pickles like PowerSGD's state: the config and this rank's state, without the process group, the
        monitor, the thread or the parameter objects (renumbered, in the same order, by the first backward)."""
        sd = self._pending_sd if not self.bound else dict(self.state_dict())
        return {"config": self.config, "process_group": None, "sd": sd, "chunk_elements": self.chunk_elements}

    def __setstate__(self, state):
        self.__init__(state["config"])
        self.chunk_elements = state["chunk_elements"]
        if state["sd"] is not None:
            self.load_state_dict(state["sd"])

    def __del__(self):
        if getattr(self, "pipeline", None) is not None:
            self.pipeline.stop()

    # -- what the collective holds ---------------------------------------------------------------------------
    @property
    def config(self) -> DoubleSqueezeConfig:
        return self.collective.config

    @property
    def monitor(self) -> Optional[Monitor]:
        return self.collective.monitor

    @monitor.setter
    def monitor(self, monitor: Optional[Monitor]) -> None:
        self.collective.monitor = monitor

    @property
    def bound(self) -> bool:
        return self.collective.bound

    @property
    def rank(self) -> int:
        return self.collective.rank

    @property
    def world_size(self) -> int:
        return self.collective.world_size

    @property
    def step(self) -> int:
        """The current step: backward passes begun so far (the next buckets belong to it)."""
        return self.collective.step

    @property
    def chunk_elements(self) -> Optional[int]:
        return self.collective.chunk_elements

    @chunk_elements.setter
    def chunk_elements(self, value: Optional[int]) -> None:
        self.collective.chunk_elements = value

    @property
    def auto(self):
        """The `auto` policy, or None."""
        return self.collective.auto

    @property
    def guard(self):
        """The quality guard, or None."""
        return self.collective.guard

    @property
    def flushes(self) -> int:
        return self.collective.flushes

    @property
    def totals(self) -> RoundStats:
        """Counters summed over the closed steps (waits for the communication thread)."""
        self.drain()
        return self.collective.totals

    @property
    def skipped_steps(self) -> int:
        self.drain()
        return self.collective.skipped_steps

    def worker_residuals(self) -> Dict[Hashable, torch.Tensor]:
        return self.collective.worker_residuals()

    def server_residuals(self) -> Dict[Hashable, torch.Tensor]:
        return self.collective.server_residuals()

    def expand_server_residual(self, key: Hashable, compact: torch.Tensor, numel: int) -> torch.Tensor:
        return self.collective.expand_server_residual(key, compact, numel)

    def residual_norms(self):
        return self.collective.residual_norms()

    def memory_report(self) -> Dict[str, int]:
        return self.collective.memory_report()

    def guard_report(self) -> dict:
        return self.collective.guard_report()

    def reset_residuals(self) -> None:
        self.collective.reset_residuals()

    # -- parameters ----------------------------------------------------------------------------------------
    def parameter_numbers(self, params) -> List[int]:
        numbers = []
        for p in params:
            n = self._numbers.get(id(p))
            if n is None:
                n = self._numbers[id(p)] = len(self._params)
                self._params.append(p)
            numbers.append(n)
        return numbers

    def number_of(self, param) -> Optional[int]:
        """The key of `param` in this state (the order the hook first saw it), or None if the hook has not."""
        return self._numbers.get(id(param))

    def describe_key(self, key) -> str:
        """A parameter's name (with a model attached), else its number and shape, for warnings and TensorBoard
        tags (DDP's hook sees no names)."""
        if isinstance(key, int) and key < len(self._params):
            named = self._named.get(id(self._params[key]))
            if named is not None:
                return named[0]
            return f"param{key}{list(self._params[key].shape)}".replace(" ", "")
        return str(key)

    def policy_report(self) -> dict:
        """The policy's rules and each tensor's compressor they decided ({} of tensors without a policy)."""
        return self.collective.policy_report()

    def parameter_residuals(self):
        """[(parameter, worker residual or None, server residual or None), ...], flat, of the parameter's
        size. The server residual holds this rank's owned blocks (zero elsewhere): summed over ranks it is `e`."""
        worker, server = self.worker_residuals(), self.server_residuals()
        result = []
        for n, p in enumerate(self._params):
            s = server.get(n)
            result.append((p, worker.get(n), None if s is None else self.expand_server_residual(n, s, p.numel())))
        return result

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Residuals (by parameter number) + step + counters + config, for this rank."""
        if not self.bound:
            if self._pending_sd is not None:
                return self._pending_sd
            self.bind_process_group()
        self.drain()
        return dict(self.collective.state_dict(), format=_FORMAT)

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a DoubleSqueezeState.state_dict() of this version (format {sd.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        if not self.bound:
            if not dist.is_available() or not dist.is_initialized():
                self._pending_sd = sd            # checked and applied when the process group is bound
                return
            self.bind_process_group()
        self.drain()
        self.collective.load_state_dict(sd)

    def load_resharded(self, state_dicts: Sequence[dict]) -> None:
        """Resume from the `state_dict()` of every rank of a run on any number of ranks: this rank's own, exactly,
        if that run had as many ranks as this process group; else with the residuals redistributed so that their
        mass is kept (every rank's worker residual is the old mean, each block's server residual goes to its new
        owner: `dsq_plugins.engine.reshard`). Call it once the process group exists, on every rank."""
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("load_resharded needs the process group (it resumes this rank of it); for a state "
                               "saved by as many ranks, load_state_dict works before it exists")
        for sd in state_dicts:
            if sd.get("format") != _FORMAT:
                raise ValueError(f"not a DoubleSqueezeState.state_dict() of this version (format "
                                 f"{sd.get('format')!r}, expected {_FORMAT!r})")
        world, rank = dist.get_world_size(self.process_group), dist.get_rank(self.process_group)
        self.load_state_dict(reshard_state_dicts(list(state_dicts), world, rank))

    def drain(self) -> None:
        """Wait until every bucket handed to the communication thread is done."""
        self.pipeline.drain()


def doublesqueeze_hook(state: DoubleSqueezeState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's gradients -> their DoubleSqueeze average over the process group.

    Math (per block, see `DoubleSqueezeCollective`): returns ``C_s(mean_i C_w(g_i + e_i) + e)`` of every block and
    updates ``e_i`` and ``e``, so nothing the compressors drop is lost. The step advances after the last bucket of
    each backward pass. The hook itself only compresses and issues the uplink; the state's pipeline serves the
    bucket (server pass, downlink issued) as soon as its uplink has arrived and, once the next bucket has been
    served too, decodes the downlink into the bucket (the averages overwrite it, as all-reduce does) and completes
    the future: a bucket's downlink travels while the next bucket's uplink does.
    """
    state.bind_process_group()
    params = bucket.parameters()
    flat = bucket.buffer()
    numbers = state.parameter_numbers(params)
    state._check_policy(numbers)
    items = list(zip(numbers, flat.split([p.numel() for p in params])))
    future = state.pipeline.issue(items, flat=flat, result=flat)
    if bucket.is_last():
        state.pipeline.end_step()
    return future
