"""`horovod_ext.DistributedOptimizer`: Horovod's DistributedOptimizer, with gradients averaged by DoubleSqueeze.

As in Horovod, a hook on each parameter fires when its gradient has been accumulated during backward; when
every parameter of a bucket is ready, the hook hands the bucket to the core's `BucketPipeline`
(`dsq_plugins.engine.pipeline`) and returns: the worker pass (compression), `hvd.alltoall_async`, the server
pass, `hvd.allgather_async` and the decoding all run on its communication thread while backward goes on, one
bucket behind the other (bucket b's compression overlaps bucket b - 1's transfer). `synchronize()` (called by
`step()`) waits for the rest; the averages land in each `p.grad`. The math is `DoubleSqueezeCollective`'s, block
by block, with both residuals (docs/ARCHITECTURE.md section 1):

    worker i:  c_i = C_w(g_i + e_i),  e_i <- g_i + e_i - c_i     (uplink: each block to its owner)
    owner r:   c = C_s(mean_i c_i + e),  e <- ... - c            (downlink: all-gather of the owners' blocks)
    p.grad <- c

Only compressed bytes cross the wire. Residuals are keyed by parameter name, so `state_dict()` (which carries
them, for this rank) resumes exactly in a fresh process.
"""
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional

import horovod.torch as hvd
import torch
from horovod.common.util import split_list

from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.engine.collective import DoubleSqueezeCollective
from dsq_plugins.engine.policy import TensorInfo, roles_from_name, roles_from_shape
from dsq_plugins.engine.pipeline import BucketPipeline, grad_or_zeros, outputs_for, plan_buckets, write_back
from dsq_plugins.monitoring.monitor import TensorBoardMonitor

from .communicator import HorovodCommunicator
from .compression import DoubleSqueezeCompressor
from .flags import ENV_CONFIG, config_from_env, logdir_from_env

__all__ = ["DistributedOptimizer"]

_STATE_KEY = "doublesqueeze"


class _DoubleSqueezeOptimizer(torch.optim.Optimizer):
    # Methods copied into a class derived from the wrapped optimizer's class, as Horovod does; hence the
    # explicit `super(self.__class__, self)`.

    def __init__(self, params, named_parameters, config: DoubleSqueezeConfig, backward_passes_per_step: int,
                 op, gradient_predivide_factor: float, groups, sparse_as_dense: bool,
                 monitor: Optional[TensorBoardMonitor], process_set):
        super(self.__class__, self).__init__(params)
        all_params = [p for group in self.param_groups for p in group["params"]]
        self._named = named_parameters is not None
        if named_parameters is None:
            named_parameters = [(f"allreduce.noname.{i}.{j}", p) for i, group in enumerate(self.param_groups)
                                for j, p in enumerate(group["params"])]
        named_parameters = list(named_parameters)
        if any(not isinstance(x, tuple) or len(x) != 2 for x in named_parameters):
            raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced "
                             "by model.named_parameters().")
        names = [n for n, _ in named_parameters]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: {dups}")
        self._parameter_names: Dict[torch.Tensor, str] = {p: n for n, p in named_parameters}
        unnamed = [p for p in all_params if p not in self._parameter_names]
        if unnamed:
            raise ValueError(f"named_parameters was specified, but {len(unnamed)} of the optimizer's parameters "
                             f"were not named (shapes {[tuple(p.shape) for p in unnamed]}).")

        self.backward_passes_per_step = backward_passes_per_step
        self.op = op
        self.gradient_predivide_factor = gradient_predivide_factor
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self._infos = {n: (TensorInfo(n, tuple(p.shape), roles_from_name(n, p.shape)) if self._named else
                           TensorInfo(None, tuple(p.shape), roles_from_shape(p.shape), named=False))
                       for p, n in self._parameter_names.items()}
        self.doublesqueeze = (DoubleSqueezeCollective(config, HorovodCommunicator(process_set), monitor,
                                                      tensor_info=self._infos.get)
                              if process_set.included() else None)
        if self.doublesqueeze is not None:       # a policy that cannot apply fails here, before any step
            self.doublesqueeze.policy.check([self._infos[self._parameter_names[p]] for p in all_params
                                             if p.requires_grad], complete=self._named)

        # Buckets, fixed at construction and identical on every rank: in reverse parameter order (the order
        # in which backward tends to produce gradients), up to `bucket_mb`, unless `groups` says otherwise.
        trainable = [p for p in all_params if p.requires_grad]
        if isinstance(groups, list):
            grouped = [[p for p in g if p.requires_grad] for g in groups]
            seen = {p for g in grouped for p in g}
            buckets = [g for g in grouped if g] + [[p] for p in trainable if p not in seen]
        elif groups:
            buckets = [list(b) for b in split_list(trainable, groups) if b]
        else:
            order = list(reversed(trainable))
            buckets = [[order[i] for i in b] for b in plan_buckets([(None, p) for p in order], config.bucket_mb)]
        self._buckets: List[List[torch.Tensor]] = buckets
        self._bucket_of = {p: b for b, ps in enumerate(buckets) for p in ps}
        self._delay = {p: backward_passes_per_step for p in trainable}
        self._ready = [0] * len(buckets)
        self._launched: Dict[int, torch.futures.Future] = {}     # bucket -> its future in the pipeline
        self._outs: Dict[int, List[torch.Tensor]] = {}
        self._pipeline = BucketPipeline(self.doublesqueeze, "dsq-horovod") if self.doublesqueeze else None
        self._synchronized = False
        self._should_synchronize = True
        # As in Horovod, a rank outside the process set does not communicate: its step uses its own gradients.
        self._hooks = ([p.register_post_accumulate_grad_hook(self._grad_ready) for p in trainable]
                       if process_set.included() else [])

    # -- communication ---------------------------------------------------------------------------------------
    def _grad_ready(self, p: torch.Tensor) -> None:
        if self._delay[p] <= 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call "
                                 "to step(). Increase backward_passes_per_step to accumulate gradients locally.")
        self._delay[p] -= 1
        if self._delay[p] == 0:
            b = self._bucket_of[p]
            self._ready[b] += 1
            if self._ready[b] == len(self._buckets[b]):
                self._launch(b)

    def _flat_grad(self, p: torch.Tensor) -> torch.Tensor:
        g = grad_or_zeros(p)
        if g.is_sparse:
            if not self.sparse_as_dense:
                raise ValueError(f"parameter {self._parameter_names[p]!r} has a sparse gradient: DoubleSqueeze "
                                 f"compresses dense tensors; pass sparse_as_dense=True")
            g = g.to_dense()
        g = g.reshape(-1)
        if self.gradient_predivide_factor != 1.0:
            g = g / self.gradient_predivide_factor
        return g

    def _launch(self, b: int) -> None:
        """Issue bucket b in the pipeline (its averages go straight into the gradients where they can)."""
        params = self._buckets[b]
        items = [(self._parameter_names[p], self._flat_grad(p)) for p in params]
        self._outs[b] = outputs_for([p.grad for p in params])
        self._launched[b] = self._pipeline.issue(items, self._outs[b])

    def synchronize(self) -> None:
        """Finish every bucket's double pass and write the averages into the gradients. Buckets whose
        gradients were not all produced by backward (unused parameters) are sent now, with zeros for the
        missing ones, as Horovod does. Outside the process set it does nothing (as Horovod)."""
        if self.doublesqueeze is None:
            self._synchronized = True
            return
        for b in range(len(self._buckets)):
            if b not in self._launched:
                self._launch(b)
        closed = self._pipeline.end_step()
        scale = self.doublesqueeze.world_size if self.op == hvd.Sum else self.gradient_predivide_factor
        for b in range(len(self._buckets)):
            self._launched[b].wait()
            write_back([p.grad for p in self._buckets[b]], self._outs[b], scale)
        closed.wait()
        self._launched.clear()
        self._outs.clear()
        self._ready = [0] * len(self._buckets)
        for p in self._delay:
            self._delay[p] = self.backward_passes_per_step
        self._synchronized = True

    # -- Horovod's optimizer interface -----------------------------------------------------------------------
    @contextmanager
    def skip_synchronize(self):
        """Inside it, `step()` does not synchronize (after an explicit `synchronize()`, e.g. to clip)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to "
                              "consider using optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.")
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, *args, **kwargs):
        if self._launched:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                 "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                 "cause a race condition.")
        return super(self.__class__, self).zero_grad(*args, **kwargs)

    def set_backward_passes_per_step(self, passes: int) -> None:
        self.backward_passes_per_step = passes
        for p in self._delay:
            self._delay[p] = passes

    def state_dict(self):
        """The wrapped optimizer's state plus this rank's DoubleSqueeze state (residuals, step, counters)
        under the key ``"doublesqueeze"``. Each rank saves its own: residuals are per rank."""
        sd = super(self.__class__, self).state_dict()
        if self.doublesqueeze is not None:
            sd[_STATE_KEY] = self.doublesqueeze.state_dict()
        return sd

    def load_state_dict(self, state_dict):
        """Restores the wrapped optimizer and, if present, the DoubleSqueeze state (refused, with the reason,
        if saved under another world size, rank or config). A state without it keeps the current residuals."""
        state_dict = dict(state_dict)
        dsq_state = state_dict.pop(_STATE_KEY, None)
        if self._launched:
            raise AssertionError("load_state_dict() during a step: call it before backward or after step()")
        if self.doublesqueeze is None:
            dsq_state = None
        if dsq_state is not None:
            self.doublesqueeze.check_compatible(dsq_state)
        super(self.__class__, self).load_state_dict(state_dict)
        if dsq_state is not None:
            self.doublesqueeze.load_state_dict(dsq_state)
        self.set_backward_passes_per_step(self.backward_passes_per_step)
        self._synchronized = False


def _resolve_config(compression, config) -> Optional[DoubleSqueezeConfig]:
    """The config to run with, or None for plain Horovod (see `DistributedOptimizer`)."""
    if isinstance(config, dict):
        config = DoubleSqueezeConfig.from_dict(config)
    if config is not None and not isinstance(config, DoubleSqueezeConfig):
        raise TypeError(f"config must be a DoubleSqueezeConfig or a dict, got {type(config).__name__}")
    ours = isinstance(compression, DoubleSqueezeCompressor)
    if config is not None:
        if ours and compression.spec != config.compressor:
            raise ValueError(f"compression={compression!r} contradicts config.compressor={config.compressor!r}; "
                             f"give one of them")
        return config
    flagged = config_from_env()
    if flagged is not None:
        if ours and compression.spec != flagged.compressor:
            warnings.warn(f"{ENV_CONFIG} (dsq-horovodrun --dsq-compressor) selects {flagged.compressor!r}, "
                          f"which replaces compression={compression!r} given in the script")
        return flagged
    if ours:
        return DoubleSqueezeConfig(compressor=compression.spec)
    return None


def DistributedOptimizer(optimizer, named_parameters=None, compression=None, backward_passes_per_step=1,
                         op=hvd.Average, gradient_predivide_factor=1.0, num_groups=0, groups=None,
                         sparse_as_dense=False, process_set=hvd.global_process_set, config=None, monitor=None):
    """Horovod's `DistributedOptimizer` with DoubleSqueeze: same arguments, same behaviour, compressed bytes.

    DoubleSqueeze is on when any of these is given (first one wins):
      * ``config``: a `DoubleSqueezeConfig` (or its dict); ``compression`` must then agree with it or be None;
      * the ``dsq-horovodrun --dsq-*`` flags (environment variable ``DSQ_HOROVOD_CONFIG``); they replace a
        ``compression`` named in the script, so an unedited Horovod script is switched by the flag alone;
      * ``compression``: a `horovod_ext.Compression` compressor (``Compression.sign``, ``.topk(0.01)``...),
        used on both passes.
    Otherwise (no flag, and ``compression`` None or one of Horovod's own) this returns Horovod's own
    `hvd.DistributedOptimizer`, unchanged. Under the flag, a script that calls `hvd.DistributedOptimizer` and
    never imports this package gets this one too (`dsq_autohook`).

    Args beyond Horovod's:
        config: `DoubleSqueezeConfig` or dict (compressors, residual switches, warm-up, `bucket_mb`...).
        monitor: a `dsq_plugins.TensorBoardMonitor`; by default rank 0 writes to ``--dsq-logdir`` if given.
    Supported as in Horovod: ``op`` Average or Sum, ``gradient_predivide_factor`` (with Average),
    ``backward_passes_per_step``, ``groups`` (they become the buckets), ``sparse_as_dense``, ``process_set``
    (the double pass runs over the set's ranks, each block owned by one of them; ranks outside the set step on
    their own gradients, as in Horovod). Not supported with DoubleSqueeze (ValueError): Adasum.
    The result's ``.doublesqueeze`` is the `DoubleSqueezeCollective`: counters, residuals, monitor.
    """
    dsq_config = _resolve_config(compression, config)
    if dsq_config is None:
        return _stock()(optimizer, named_parameters=named_parameters, compression=(
            compression or hvd.Compression.none), backward_passes_per_step=backward_passes_per_step, op=op,
            gradient_predivide_factor=gradient_predivide_factor, num_groups=num_groups, groups=groups,
            sparse_as_dense=sparse_as_dense, process_set=process_set)
    if backward_passes_per_step <= 0:
        raise ValueError("backward_passes_per_step must be > 0")
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("DoubleSqueeze averages (op=hvd.Average) or sums (op=hvd.Sum); Adasum is not supported")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if groups is None and num_groups:
        groups = num_groups
    if groups is not None and not (isinstance(groups, list) or groups > 0):
        raise ValueError("groups should be a non-negative integer or a list of list of torch.Tensor.")
    if monitor is None and logdir_from_env() and process_set.included() and process_set.rank() == 0:
        monitor = TensorBoardMonitor(logdir_from_env())
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), dict(_DoubleSqueezeOptimizer.__dict__))
    # hvd.broadcast_optimizer_state initialises a fresh optimizer's state by calling the *wrapped* step (no
    # collective) when the optimizer's class lives in Horovod's optimizer module; say that ours does.
    cls.__module__ = _stock().__module__
    return cls(optimizer.param_groups, named_parameters, dsq_config, backward_passes_per_step, op,
               gradient_predivide_factor, groups, sparse_as_dense, monitor, process_set)


def _stock():
    """Horovod's own `DistributedOptimizer` (kept aside when dsq-horovodrun's flag replaced it: autopatch)."""
    return getattr(hvd, "_dsq_original_DistributedOptimizer", hvd.DistributedOptimizer)
