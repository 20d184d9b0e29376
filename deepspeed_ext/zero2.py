"""DoubleSqueeze under DeepSpeed ZeRO stage 2: both passes of sharded data parallelism compressed.

ZeRO-2 lays each parameter group out flat, padded and rank-major: rank ``r`` owns elements ``[r * n, (r + 1) * n)``
of the group's flat buffer (`optimizer.parallel_partitioned_bit16_groups[g][r]`), reduces the gradients of those
elements to itself at every micro-step (bucket by bucket, from backward hooks), steps them in fp32 (its master
partition, `single_partition_of_fp32_groups[g]`) and all-gathers the updated partitions after the step. Those two
collectives become DoubleSqueeze's two passes, as `dsq_plugins.engine.sharded` states them for FSDP2:

Uplink, each bucket DeepSpeed reduces (`average_tensor` with ``contiguous_gradients``, `buffered_reduce_fallback`
without; ``overlap_comm`` either way), worker ``i``, for each owner ``r != i`` of some of the bucket's elements
``S_r``::

    v = g_i[S_r] + e_i[S_r];   c = C_w(v);   e_i[S_r] <- v - c      c goes to rank r            (one all_to_all)
    owner r:   g[S_r] = (g_r[S_r] + sum_{i != r} c_i) / W            (its own elements never leave it: exact)

The worker residual ``e_i`` is float32 whatever the gradients' dtype, indexed like the groups' flat buffers (as large
as the unsharded gradients, as under FSDP2).

Downlink, the parameter all-gather after each step, group by group::

    owner r:      c = C_s(x[r] - x_hat[r])       x: its fp32 master partition      c goes to every rank (one all_gather)
    every rank:   x_hat[r] += c for every r      x_hat: the bit16 flat buffer the model computes with

The owner's residual is ``x[r] - x_hat[r]``, held implicitly (the conservation law in `async_ps`'s form); every
rank applies every frame by the same ops, so the copies stay bit for bit equal. Warm-up steps run DeepSpeed's own
collectives (exact), and so do auto's dense steps (the residual carried along, `ShardedZeroState.flush_into`) and any
all-gather outside a step (`update_lp_params`, checkpoint loading).

DeepSpeed has no communication-hook API. `install` replaces the bucket reductions on this optimizer instance, and
routes its step's all-gather: DeepSpeed's step calls `stage_1_and_2.all_gather_dp_groups`, a module function, with
this optimizer's partition lists; that name is bound once to a dispatcher (`_dispatch_all_gather`) that hands
calls for an installed optimizer to it and every other call to DeepSpeed's function unchanged.

A bucket whose gradients hold a NaN/Inf on some rank leaves every residual as it was and reduces to NaN, as stock
DeepSpeed would. Bytes are counted per message: `HEADER` plus the frame (`BlockCodec.nbytes`), against the
elements the stock collective would send in the gradients' dtype.
"""
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from deepspeed.runtime.zero import stage_1_and_2

from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.engine.codec import BlockCodec
from dsq_plugins.engine.sharded import exchange_delta
from dsq_plugins.monitoring.monitor import Monitor

from .loss_scale import LossScaleUnits
from .zero_state import BucketLayout, ShardedZeroState, common_refusals

__all__ = ["ZeroTwoState", "refusals"]

_FORMAT = "dsq-zero2-1"
_ORIGINAL_ALL_GATHER = stage_1_and_2.all_gather_dp_groups
_STATES: "weakref.WeakValueDictionary[int, ZeroTwoState]" = weakref.WeakValueDictionary()


def refusals(config: DoubleSqueezeConfig) -> List[str]:
    """What of `config` ZeRO-2 cannot honour (each a reason)."""
    bad = common_refusals(config)
    if not config.server_ef:
        bad.append("server_ef false (the parameter downlink keeps the owner's residual, or the copies drift)")
    return bad


def _dispatch_all_gather(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor,
                         allgather_bucket_size):
    state = _STATES.get(id(partitioned_param_groups))
    if state is not None and state.optimizer.parallel_partitioned_bit16_groups is partitioned_param_groups:
        return state.all_gather(lambda: _ORIGINAL_ALL_GATHER(groups_flat, partitioned_param_groups, dp_process_group,
                                                             start_alignment_factor, allgather_bucket_size))
    return _ORIGINAL_ALL_GATHER(groups_flat, partitioned_param_groups, dp_process_group, start_alignment_factor,
                                allgather_bucket_size)


class ZeroTwoState(ShardedZeroState):
    """DoubleSqueeze's state in a ZeRO-2 optimizer (`engine.doublesqueeze`), beside `ShardedZeroState`'s.

    Attributes:
        residual: the worker residual, float32, the groups' flat buffers one after another.
        replica_rows: per group, this rank's row of ``x_hat`` (its partition of the copy every rank computes with).
    """

    FORMAT = _FORMAT

    def __init__(self, optimizer, config: DoubleSqueezeConfig, monitor: Optional[Monitor] = None,
                 loss_scale: Optional[LossScaleUnits] = None, residual_dtype: torch.dtype = torch.float32):
        sizes = [int(p) for p in optimizer.partition_size]
        device = optimizer.parallel_partitioned_bit16_groups[0][0].device
        W = len(optimizer.parallel_partitioned_bit16_groups[0])       # one partition per data-parallel rank
        super().__init__(optimizer, config, monitor, sum(sizes) * W, device, loss_scale, residual_dtype)
        self._base = [sum(s * W for s in sizes[:g]) for g in range(len(sizes))]
        self.down = BlockCodec(config.server_for(config.candidate_specs[0]), config.block_size)
        self.replica_rows = [parts[self.rank].detach().clone()
                             for parts in optimizer.parallel_partitioned_bit16_groups]
        self._in_step = False

    # -- uplink --------------------------------------------------------------------------------------------------
    def _layout(self, params: List[Tuple[int, int, int]]) -> BucketLayout:
        """`own`: this rank's pieces as (group, param_id, start in the concatenation of its elements, numel)."""
        key = tuple(params)
        got = self._layouts.get(key)
        if got is not None:
            return got
        opt, W = self.optimizer, self.world_size
        index: List[List[torch.Tensor]] = [[] for _ in range(W)]
        position: List[List[torch.Tensor]] = [[] for _ in range(W)]
        own, mine, offset = [], 0, 0
        for g, idx, param_id in params:
            p = opt.bit16_groups[g][idx]
            size = int(opt.partition_size[g])
            for r in sorted(opt.param_to_partition_ids[g][param_id]):
                start = int(opt.grad_start_offset[g][r][param_id])
                insert = int(opt.grad_partition_insertion_offset[g][r][param_id])
                numel = min(p.numel() - start, size - insert)
                if numel <= 0:
                    continue
                index[r].append(torch.arange(offset + start, offset + start + numel))
                at = self._base[g] + r * size + insert
                position[r].append(torch.arange(at, at + numel))
                if r == self.rank:
                    own.append((g, param_id, mine, numel))
                    mine += numel
            offset += p.numel()
        got = self._layouts[key] = BucketLayout.of(index, position, own, self.residual.device)
        return got

    def _use(self, spec: str) -> None:
        super()._use(spec)
        server = self.config.server_for(spec)
        if server.spec != self.down.spec:
            self.down = BlockCodec(server, self.config.block_size)

    def dense_bucket(self, flat: torch.Tensor, params: List[Tuple[int, int, int]]) -> None:
        """Before DeepSpeed reduces the bucket `flat` itself (a dense step): its counters, and its residual into
        `flat` where some may be left."""
        self.dense_reduction(flat.numel(), flat.element_size())
        if self.needs_flush():
            self.flush_into(flat, self._layout(params))

    def reduce_bucket(self, flat: torch.Tensor, params: List[Tuple[int, int, int]], average: bool) -> None:
        """Reduce one bucket: `flat` is the concatenation of the gradients of `params` ((group, index in group,
        param_id), DeepSpeed's bucket order); this rank's elements of it become their mean over ranks (`average`)
        or sum, written in `flat` or added to DeepSpeed's fp32 partition buffer where it keeps one."""
        lay = self._layout(params)
        self._write_own(flat, lay, self.reduce(flat, lay, average))

    def _write_own(self, flat: torch.Tensor, lay: BucketLayout, out: torch.Tensor) -> None:
        opt = self.optimizer
        compact = []
        for g, param_id, start, numel in lay.own:
            target = opt._get_compact_grad_partition_slice(g, self.rank, param_id, numel)
            compact.append(target)
        if all(t is None for t in compact):
            flat[lay.index[self.rank]] = out.to(flat.dtype)
            return
        for (g, param_id, start, numel), target in zip(lay.own, compact):
            piece = out[start:start + numel]
            if target is None:
                raise RuntimeError("a bucket mixes groups with and without DeepSpeed's fp32 partition buffer")
            target.add_(piece.to(target.dtype))

    # -- downlink ------------------------------------------------------------------------------------------------
    def all_gather(self, dense) -> None:
        """The optimizer's parameter all-gather: the delta downlink inside a step past warm-up; else `dense()`
        (DeepSpeed's own), after which every rank's copy is exact again."""
        opt = self.optimizer
        if not self._in_step or not self.compressing():
            dense()
            self.resync_rows()
            return
        for g, rows in enumerate(opt.parallel_partitioned_bit16_groups):
            x = opt.single_partition_of_fp32_groups[g].detach()
            mine = self.replica_rows[g]
            exchange_delta(self.down, self.comm, x.float() - mine.float(), [r.data for r in rows], mine,
                           self.config.seed, -1 - g, self.step, self._round)

    def resync_rows(self) -> None:
        """Take this rank's row of the copy from the optimizer's buffers (after an exact all-gather)."""
        for g, parts in enumerate(self.optimizer.parallel_partitioned_bit16_groups):
            self.replica_rows[g].copy_(parts[self.rank].data)

    # -- the step ------------------------------------------------------------------------------------------------
    def run_step(self, step, *args, **kwargs):
        """`step` (the optimizer's own) with the downlink in place of its all-gather; then the step's counters."""
        self._in_step = True
        try:
            return super().run_step(step, *args, **kwargs)
        finally:
            self._in_step = False

    # -- what it holds -------------------------------------------------------------------------------------------
    def worker_residuals(self) -> Dict[str, torch.Tensor]:
        """{"group<g>": this rank's worker residual of parameter group g, float32, its padded flat layout}."""
        sizes = [int(n) * self.world_size for n in self.optimizer.partition_size]
        return {f"group{g}": self.residual[self._base[g]:self._base[g] + size] for g, size in enumerate(sizes)}

    def server_residuals(self) -> Dict[str, torch.Tensor]:
        """{"group<g>": the owner's residual ``x[r] - x_hat[r]`` of this rank's partition of group g, float32}."""
        return {f"group{g}": x.detach().float() - mine.float() for g, (x, mine) in
                enumerate(zip(self.optimizer.single_partition_of_fp32_groups, self.replica_rows))}

    def residual_norms(self) -> Tuple[float, float]:
        """(||e_i||, ||x[r] - x_hat[r]||) of this rank, L2."""
        server = sum(float(r.norm()) ** 2 for r in self.server_residuals().values()) ** 0.5
        return float(self.residual.norm()), server

    def memory_report(self) -> Dict[str, int]:
        """Bytes DoubleSqueeze keeps per rank beside ZeRO-2's own: the worker residual and the copy's rows."""
        return {"worker_residual": self.residual.numel() * self.residual.element_size(),
                "replica_rows": sum(r.numel() * r.element_size() for r in self.replica_rows)}

    def residual_spans(self) -> List[Tuple[int, int]]:
        """Per parameter group, its flat buffer's parameters (with `parameter_alignment`'s padding between them;
        the padding to a multiple of the ranks after)."""
        opt = self.optimizer
        return [(self._base[g], offsets[-1] + meta[-1].numel() if offsets else 0)
                for g, (offsets, meta) in enumerate(zip(opt.round_robin_bit16_offsets, opt.round_robin_bit16_meta))]

    def state_dict(self) -> dict:
        return dict(super().state_dict(), replica_rows=[r.clone() for r in self.replica_rows],
                    round_robin=bool(self.optimizer.round_robin_gradients))

    def load_resharded(self, saved) -> dict:
        """As `ShardedZeroState.load_resharded`; the copy of the parameters every rank computes with is the saved
        one (the saved ranks' rows, one after another, cut into this world's partitions), so the owners'
        residuals ``x - x_hat`` against the exact parameters DeepSpeed loaded keep their mass too. Every rank reads
        every saved row: no collective. Refused under ``round_robin_gradients`` (it orders the parameters by the
        number of ranks)."""
        if self.optimizer.round_robin_gradients:
            raise ValueError("a ZeRO-2 resume on another number of ranks is not supported with "
                             "round_robin_gradients (it orders each group's parameters by the number of ranks)")
        self._saved_rows: Dict[int, List[torch.Tensor]] = {}
        first = super().load_resharded(saved)
        rows, self._saved_rows = self._saved_rows, {}
        for g, ((_, real), mine) in enumerate(zip(self.residual_spans(), self.replica_rows)):
            full = torch.cat([rows[r][g].reshape(-1) for r in sorted(rows)])[:real]
            flat = self.optimizer.bit16_groups_flat[g].data.view(-1)
            flat[:real].copy_(full.to(flat.device, flat.dtype))
            mine.copy_(self.optimizer.parallel_partitioned_bit16_groups[g][self.rank].data)
            self.optimizer._update_model_bit16_weights(g)
        return first

    def _take_saved(self, sd: dict) -> None:
        if sd.get("round_robin"):
            raise ValueError("the checkpoint was saved with round_robin_gradients, which orders each group's "
                             "parameters by the number of ranks: it resumes on as many ranks only")
        self._saved_rows[sd["rank"]] = [r.detach().cpu() for r in sd["replica_rows"]]

    def load_state_dict(self, sd: dict) -> None:
        """Resume from `state_dict` of the same rank and world size: residuals, step, and every rank's copy
        rebuilt from the saved rows (one dense all-gather, a collective)."""
        super().load_state_dict(sd)
        W = self.world_size
        for g, (parts, row) in enumerate(zip(self.optimizer.parallel_partitioned_bit16_groups, sd["replica_rows"])):
            mine = self.replica_rows[g]
            mine.copy_(row)
            nbytes = mine.numel() * mine.element_size()
            flat = self.optimizer.bit16_groups_flat[g]
            self.comm.all_gather(mine.contiguous().view(torch.uint8).view(-1), [nbytes] * W,
                                 out=flat.data.view(-1)[:W * mine.numel()].view(torch.uint8))
            self.optimizer._update_model_bit16_weights(g)

    def reset_residuals(self) -> None:
        """Residuals to zero and the copy taken as it is (after loading another world size's checkpoint)."""
        super().reset_residuals()
        self.resync_rows()


def attach(optimizer, state: ZeroTwoState) -> None:
    """Route `optimizer`'s bucket reductions and its step's all-gather through `state`."""
    import types

    stock_average = optimizer.average_tensor
    stock_fallback = optimizer.buffered_reduce_fallback
    stock_fallback32 = optimizer._buffered_reduce_fallback_preserving_fp32
    stock_step = optimizer.step

    def bucket_params(dtype):
        return list(optimizer.ipg_buckets[dtype].params)

    def average_tensor(self, tensor, communication_data_type):
        if not state.compressing():
            state.dense_bucket(tensor.view(-1), bucket_params(communication_data_type))
            return stock_average(tensor, communication_data_type)
        state.reduce_bucket(tensor.view(-1), bucket_params(communication_data_type), self.gradient_average)

    def through_flat(grads, fn) -> None:
        """`fn` on the concatenation of `grads`, written back into them."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        fn(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def reduce_list(grads, dtype):
        params = bucket_params(dtype)
        if not state.compressing():
            state.dense_reduction(sum(g.numel() for g in grads), grads[0].element_size())
            if state.needs_flush():
                through_flat(grads, lambda flat: state.flush_into(flat, state._layout(params)))
            return False
        through_flat(grads, lambda flat: state.reduce_bucket(flat, params, optimizer.gradient_average))
        return True

    def buffered_reduce_fallback(self, rank, grads, communication_data_type, elements_per_buffer=500000000,
                                 log=None):
        bucket = optimizer.ipg_buckets.get(communication_data_type)
        if rank is not None or bucket is None or grads is not bucket.grads \
                or not reduce_list(grads, communication_data_type):
            return stock_fallback(rank, grads, communication_data_type, elements_per_buffer, log)

    def fallback_preserving_fp32(self, grads, grad_params, communication_data_type, elements_per_buffer):
        if not reduce_list(grads, communication_data_type):
            return stock_fallback32(grads, grad_params, communication_data_type, elements_per_buffer)

    def step(self, *args, **kwargs):
        return state.run_step(stock_step, *args, **kwargs)

    optimizer.average_tensor = types.MethodType(average_tensor, optimizer)
    optimizer.buffered_reduce_fallback = types.MethodType(buffered_reduce_fallback, optimizer)
    optimizer._buffered_reduce_fallback_preserving_fp32 = types.MethodType(fallback_preserving_fp32, optimizer)
    optimizer.step = types.MethodType(step, optimizer)
    _STATES[id(optimizer.parallel_partitioned_bit16_groups)] = state
    stage_1_and_2.all_gather_dp_groups = _dispatch_all_gather
