"""DoubleSqueeze under DeepSpeed ZeRO stage 3: compressed gradient reduce-scatter, compressed parameter gathers.

ZeRO-3 partitions each parameter on its own: rank ``r`` holds elements ``[r * s, (r + 1) * s)`` of its flat form,
``s = ceil(numel / W)`` (`param.ds_tensor`), steps them in fp32, and gathers whole parameters when a module needs
them, in forward and again in backward, freeing them after use. Its collectives become:

Uplink, each bucket of gradients DeepSpeed reduce-scatters (its optimizer's `__avg_scatter_grads`): the worker pass
of `dsq_plugins.engine.sharded.IndexedReduceScatter`, every rank sending each owner ``C_w(g_i + e_i)`` of the
elements it owns, with the float32 worker residual ``e_i`` laid out as the parameters' flat forms one after another
(as large as the unsharded gradients). The owner averages.

Downlink, each parameter all-gather inside the engine's forward and backward: there is no copy that persists
between steps to keep a residual against, so, as ZeRO++ quantizes its weight gathers, every rank sends ``Q(x[r])``
of its partition (`param_compressor`, ``int8`` per block by default: `sharded.QuantizedAllGather`) and every rank,
the owner included, computes with ``Q(x)``; the owner's exact partition, which the optimizer updates, is untouched.
Each parameter is gathered on its own (blocks start at its partition), so ``Q(x)`` does not depend on how
DeepSpeed's prefetcher groups parameters.
The parameters DeepSpeed keeps whole between forward and backward (``ds_persist``: those under
``stage3_param_persistence_threshold``) go the same way: DeepSpeed re-gathers them exactly after each optimizer step
and after each checkpoint save or load, to hold them until the next; with DoubleSqueeze installed those re-gathers
are left out (`_without_persistent`), so the next forward gathers them with the others, ``Q(x)`` on a compressed
step, once a step (they stay gathered through backward). Every parameter then computes with what its step's mode
says, and a resumed run with what the run it continues computed with.
Gathers outside those calls stay DeepSpeed's own and exact: `deepspeed.zero.GatheredParameters` in the user's code
and checkpoint consolidation; so does everything during warm-up steps and auto's dense steps (whose first gather, in
forward, is where a step's mode is decided; the residual then goes along with the gradients,
`ShardedZeroState.flush_into`).

DeepSpeed has no communication-hook API. The reduce-scatter is replaced on the optimizer instance. The gathers go
through `partition_parameters._dist_allgather_fn`, a module function every non-quantized parameter gather calls
with (this rank's partition, the rank-major output); its name is bound to a dispatcher that compresses only while an
installed engine is inside forward or backward and hands every other call to DeepSpeed's function.
"""
import functools
import math
import types
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from deepspeed.runtime.zero import partition_parameters

from dsq_plugins.compression.registry import get_compressor
from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.engine.communicator import TorchDistributedCommunicator
from dsq_plugins.engine.sharded import QuantizedAllGather
from dsq_plugins.monitoring.monitor import Monitor

from .loss_scale import LossScaleUnits
from .zero_state import BucketLayout, ShardedZeroState, common_refusals

__all__ = ["ZeroThreeState", "attach", "refusals"]

_FORMAT = "dsq-zero3-1"
_ORIGINAL_GATHER = partition_parameters._dist_allgather_fn
_ACTIVE: List[Optional["ZeroThreeState"]] = []    # states whose engine is inside forward or backward (None: exact)


def refusals(config: DoubleSqueezeConfig) -> List[str]:
    """What of `config` ZeRO-3 cannot honour (each a reason)."""
    return common_refusals(config)


class _Done:
    """A collective that has completed, in the shape DeepSpeed's gather handles wait on."""

    def wait(self, *args, **kwargs) -> None:
        return None

    def is_completed(self) -> bool:
        return True


def _dispatch_gather(input_tensor, output_tensor, group=None):
    state = _ACTIVE[-1] if _ACTIVE else None
    if state is not None and state.compresses(input_tensor, output_tensor, group):
        state.gather(input_tensor, output_tensor, group)
        return _Done()
    return _ORIGINAL_GATHER(input_tensor, output_tensor, group)


class ZeroThreeState(ShardedZeroState):
    """DoubleSqueeze's state in a ZeRO-3 optimizer (`engine.doublesqueeze`), beside `ShardedZeroState`'s.

    Attributes:
        param_compressor: the spec of the parameter gathers' compressor.
        residual: the worker residual, float32, the trainable parameters' flat forms one after another.
        gathers: parameter all-gathers compressed so far (each of ``W * s`` elements moves as W frames).
        gathered_elements: elements those gathers delivered to this rank from the others (stock would have moved
            them in the parameters' dtype).
    """

    FORMAT = _FORMAT

    def __init__(self, optimizer, config: DoubleSqueezeConfig, param_compressor: str = "int8",
                 monitor: Optional[Monitor] = None, loss_scale: Optional[LossScaleUnits] = None,
                 residual_dtype: torch.dtype = torch.float32):
        params = [p for group in optimizer.fp16_groups for p in group]
        self._base: Dict[int, int] = {}
        total = 0
        for p in params:
            self._base[p.ds_id] = total
            total += p.ds_numel
        device = params[0].ds_tensor.device if params else torch.device("cpu")
        super().__init__(optimizer, config, monitor, total, device, loss_scale, residual_dtype)
        self.param_compressor = param_compressor
        self.gathers = 0
        self.gathered_elements = 0
        self.downlink = QuantizedAllGather(get_compressor(param_compressor), config.block_size, key=0,
                                           seed=config.seed)
        self._comms: Dict[int, TorchDistributedCommunicator] = {}

    # -- uplink --------------------------------------------------------------------------------------------------
    def _layout(self, params) -> BucketLayout:
        """`own`: per parameter, how many of its elements this rank owns."""
        key = tuple(p.ds_id for p in params)
        got = self._layouts.get(key)
        if got is not None:
            return got
        W, me = self.world_size, self.rank
        index: List[List[torch.Tensor]] = [[] for _ in range(W)]
        position: List[List[torch.Tensor]] = [[] for _ in range(W)]
        own, offset = [], 0
        for p in params:
            numel = p.ds_numel
            size = math.ceil(numel / W)
            for r in range(W):
                lo, hi = r * size, min((r + 1) * size, numel)
                if hi > lo:
                    index[r].append(torch.arange(offset + lo, offset + hi))
                    position[r].append(torch.arange(self._base[p.ds_id] + lo, self._base[p.ds_id] + hi))
            own.append(max(0, min(size, numel - me * size)))
            offset += numel
        got = self._layouts[key] = BucketLayout.of(index, position, own, self.residual.device)
        return got

    def reduce_scatter(self, params, communication_data_type: torch.dtype, accumulation_dtype: torch.dtype
                       ) -> List[torch.Tensor]:
        """The mean over ranks of this rank's partition of each parameter's gradient (DeepSpeed's
        `__avg_scatter_grads` contract: one tensor per parameter, its elements this rank owns)."""
        lay = self._layout(params)
        flat = torch.cat([p.grad.reshape(-1).to(communication_data_type) for p in params])
        return list(self.reduce(flat, lay, True).to(accumulation_dtype).split(lay.own))

    def dense_scatter(self, params, communication_data_type: torch.dtype) -> None:
        """Before DeepSpeed reduce-scatters `params`' gradients itself (a dense step): its counters, and the
        residual added to the gradients where some may be left."""
        numel = sum(p.grad.numel() for p in params)
        self.dense_reduction(numel, torch.empty((), dtype=communication_data_type).element_size())
        if not self.needs_flush():
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        self.flush_into(flat, self._layout(params))
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.grad.numel()].view_as(p.grad))
            offset += p.grad.numel()

    # -- downlink ------------------------------------------------------------------------------------------------
    def compresses(self, inp: torch.Tensor, out: torch.Tensor, group) -> bool:
        """Whether this gather is one of ours: a floating-point parameter gather over the data-parallel group,
        after warm-up."""
        return (inp.dtype.is_floating_point and out.numel() == inp.numel() * self.world_size
                and dist.get_world_size(group) == self.world_size and self.compressing())

    def _comm(self, group) -> TorchDistributedCommunicator:
        comm = self._comms.get(id(group))
        if comm is None:
            comm = self._comms[id(group)] = TorchDistributedCommunicator(group)
        return comm

    def gather(self, inp: torch.Tensor, out: torch.Tensor, group) -> None:
        """Every rank's ``Q(x[r])`` into `out` (rank-major), this rank's included."""
        self.downlink(self._comm(group), out, inp, self.step, False, self._round)
        self.gathers += 1
        self.gathered_elements += (self.world_size - 1) * inp.numel()

    def active(self, fn, *args, **kwargs):
        """Run `fn` with this state's gathers compressed."""
        _ACTIVE.append(self)
        try:
            return fn(*args, **kwargs)
        finally:
            _ACTIVE.pop()

    # -- what it holds -------------------------------------------------------------------------------------------
    def worker_residuals(self) -> Dict[str, torch.Tensor]:
        return {"residual": self.residual}

    def server_residuals(self) -> Dict[str, torch.Tensor]:
        """None: the parameter gathers keep no residual (the owner's exact partition is untouched)."""
        return {}

    def memory_report(self) -> Dict[str, int]:
        return {"worker_residual": self.residual.numel() * self.residual.element_size()}

    def residual_spans(self) -> List[Tuple[int, int]]:
        """One span: every parameter's flat form, one after another (no padding)."""
        return [(0, self.residual.numel())]

    def state_dict(self) -> dict:
        return dict(super().state_dict(), param_compressor=self.param_compressor)

    def _check_origin(self, sd: dict) -> None:
        super()._check_origin(sd)
        if sd.get("param_compressor") != self.param_compressor:
            raise ValueError(f"checkpoint was written with param_compressor {sd.get('param_compressor')!r}, this "
                             f"run uses {self.param_compressor!r}")


def attach(engine, state: ZeroThreeState) -> None:
    """Route `engine`'s gradient reduce-scatter and, inside its forward and backward, its parameter gathers through
    `state`."""
    optimizer = engine.optimizer
    name = "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads"
    stock_scatter = getattr(optimizer, name)
    stock_step = optimizer.step

    def avg_scatter_grads(self, params_to_reduce, communication_data_type):
        if not state.compressing():
            state.dense_scatter(params_to_reduce, communication_data_type)
            return stock_scatter(params_to_reduce, communication_data_type)
        return state.reduce_scatter(params_to_reduce, communication_data_type, self.gradient_accumulation_dtype)

    def step(self, *args, **kwargs):
        return state.run_step(stock_step, *args, **kwargs)

    setattr(optimizer, name, types.MethodType(avg_scatter_grads, optimizer))
    optimizer.step = types.MethodType(step, optimizer)
    for method in ("_post_step", "checkpoint_event_epilogue"):
        setattr(optimizer, method, _without_persistent(optimizer, getattr(optimizer, method)))
    for method in ("forward", "backward"):
        stock = getattr(engine, method)
        setattr(engine, method, functools.wraps(stock)(functools.partial(state.active, stock)))
    for p in engine.module.parameters():
        if hasattr(p, "all_gather_coalesced"):
            p.all_gather_coalesced = _one_by_one(p.all_gather_coalesced, state)
    partition_parameters._dist_allgather_fn = _dispatch_gather


def _without_persistent(optimizer, method):
    """`optimizer`'s `method` with its re-gather of the parameters DeepSpeed keeps whole left out (it gathers
    ``optimizer.persistent_parameters``): the next forward gathers them, compressed where its step is."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        persistent, optimizer.persistent_parameters = optimizer.persistent_parameters, []
        try:
            return method(*args, **kwargs)
        finally:
            optimizer.persistent_parameters = persistent
    return run


def _one_by_one(gather, state: ZeroThreeState):
    """A parameter's `all_gather_coalesced` that, while `state` compresses, gathers each parameter of the list on
    its own, those DeepSpeed keeps whole included: the blocks then start at each parameter's partition, so what the
    model computes with does not depend on which parameters DeepSpeed's prefetcher happens to group. The padding of
    a partition (DeepSpeed allocates it uninitialised) is zeroed first, so that it cannot set a block's range."""
    @functools.wraps(gather)
    def all_gather_coalesced(params, safe_mode: bool = False, quantize: bool = False):
        params = list(params)
        if not _ACTIVE or _ACTIVE[-1] is not state or not state.compressing():
            return gather(params, safe_mode=safe_mode, quantize=quantize)
        params.sort(key=lambda p: p.ds_id)          # the same order on every rank, as DeepSpeed's own gather sorts
        handles = []
        for p in params:
            _zero_padding(p, state.rank)
            handles.append(gather([p], safe_mode=safe_mode, quantize=quantize))
        return handles[0] if len(handles) == 1 else partition_parameters.MultipleAllGatherHandles(handles)
    return all_gather_coalesced


def _zero_padding(p, rank: int) -> None:
    """Zero the elements of this rank's partition of `p` past the parameter's end."""
    part = p.ds_tensor
    real = max(0, min(part.numel(), p.ds_numel - rank * part.numel()))
    if real < part.numel():
        part.data.view(-1)[real:].zero_()
