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
collectives (exact), and so does any all-gather outside a step (`update_lp_params`, checkpoint loading).

DeepSpeed has no communication-hook API. `install` replaces the bucket reductions on this optimizer instance, and
routes its step's all-gather: DeepSpeed's step calls `stage_1_and_2.all_gather_dp_groups`, a module function, with
this optimizer's partition lists; that name is bound once to a dispatcher (`_dispatch_all_gather`) that hands
calls for an installed optimizer to it and every other call to DeepSpeed's function unchanged.

A bucket whose gradients hold a NaN/Inf on some rank leaves every residual as it was and reduces to NaN, as stock
DeepSpeed would. Bytes are counted per message: `HEADER` plus the frame (`BlockCodec.nbytes`), against the
elements the stock collective would send in the gradients' dtype.
"""
import time
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from deepspeed.runtime.zero import stage_1_and_2

from dsq_plugins.compression.registry import get_compressor
from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.engine.codec import BlockCodec
from dsq_plugins.engine.communicator import TorchDistributedCommunicator
from dsq_plugins.engine.sharded import IndexedReduceScatter, frame_seed
from dsq_plugins.monitoring.monitor import Monitor, RoundStats

__all__ = ["ZeroTwoState", "refusals"]

_FORMAT = "dsq-zero2-1"
_ORIGINAL_ALL_GATHER = stage_1_and_2.all_gather_dp_groups
_STATES: "weakref.WeakValueDictionary[int, ZeroTwoState]" = weakref.WeakValueDictionary()


def refusals(config: DoubleSqueezeConfig) -> List[str]:
    """What of `config` ZeRO-2 cannot honour (each a reason)."""
    bad = []
    if config.policy:
        bad.append("a per-parameter policy (ZeRO-2 compresses DeepSpeed's buckets, which mix parameters)")
    if config.auto:
        bad.append("compressor 'auto' (name a compressor)")
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


class _Layout(NamedTuple):
    """Where a bucket's elements go. Per rank r: `index[r]` (positions in the bucket's flat tensor) and
    `position[r]` (positions in the residual) of the elements r owns; `own`: this rank's slices
    (group, param_id, start in the concatenation of its elements, numel), for DeepSpeed's fp32 partition buffer."""
    index: List[torch.Tensor]
    position: List[torch.Tensor]
    own: List[Tuple[int, int, int, int]]


class ZeroTwoState:
    """DoubleSqueeze's state in a ZeRO-2 optimizer (`engine.doublesqueeze`): residuals, step, counters.

    Attributes:
        config: the `DoubleSqueezeConfig`.
        step: optimizer steps taken since installation (warm-up counts them).
        residual: the worker residual, float32, the groups' flat buffers one after another.
        replica_rows: per group, this rank's row of ``x_hat`` (its partition of the copy every rank computes with).
    """

    def __init__(self, optimizer, config: DoubleSqueezeConfig, monitor: Optional[Monitor] = None):
        self.optimizer, self.config, self.monitor = optimizer, config, monitor
        self.comm = TorchDistributedCommunicator(optimizer.dp_process_group)
        self.world_size, self.rank = self.comm.size, self.comm.rank
        self.down = BlockCodec(config.server, config.block_size)
        self.step = 0
        self.skipped_steps = 0
        self._rounds = 0                       # bucket reductions since the step began (seeds)
        self._totals, self._round = RoundStats(), RoundStats()
        sizes = [int(p) for p in optimizer.partition_size]
        self._base = [sum(s * self.world_size for s in sizes[:g]) for g in range(len(sizes))]
        device = optimizer.parallel_partitioned_bit16_groups[0][0].device
        self.residual = torch.zeros(sum(sizes) * self.world_size, dtype=torch.float32, device=device)
        self.uplink = IndexedReduceScatter(config.worker, config.block_size, self.residual, config.worker_ef,
                                           config.seed)
        self.replica_rows = [parts[self.rank].detach().clone()
                             for parts in optimizer.parallel_partitioned_bit16_groups]
        self._layouts: Dict[tuple, _Layout] = {}
        self._in_step = False

    # -- uplink --------------------------------------------------------------------------------------------------
    def _layout(self, params: List[Tuple[int, int, int]]) -> _Layout:
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
        device = self.residual.device

        def joined(parts):
            return (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)
        got = self._layouts[key] = _Layout([joined(i) for i in index], [joined(p) for p in position], own)
        return got

    def reduce_bucket(self, flat: torch.Tensor, params: List[Tuple[int, int, int]], average: bool) -> None:
        """Reduce one bucket: `flat` is the concatenation of the gradients of `params` ((group, index in group,
        param_id), DeepSpeed's bucket order); this rank's elements of it become their mean over ranks (`average`)
        or sum, written in `flat` or added to DeepSpeed's fp32 partition buffer where it keeps one."""
        lay = self._layout(params)
        out, _ = self.uplink(self.comm, flat, lay.index, lay.position, average, self._rounds, self.step, self._round)
        self._rounds += 1
        self._write_own(flat, lay, out)

    def _write_own(self, flat: torch.Tensor, lay: _Layout, out: torch.Tensor) -> None:
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
        opt, W, me = self.optimizer, self.world_size, self.rank
        if not self._in_step or self.step < self.config.warmup_steps:
            dense()
            self.resync_rows()
            return
        t0 = time.perf_counter()
        for g, rows in enumerate(opt.parallel_partitioned_bit16_groups):
            x = opt.single_partition_of_fp32_groups[g].detach()
            mine = self.replica_rows[g]
            diff = x.float() - mine.float()
            seed = frame_seed(self.config.seed, -1 - g, self.step, me, -1)
            frame, _ = self.down.encode(diff, seed)
            F = frame.numel()
            self._round.compress_seconds += time.perf_counter() - t0
            gathered = self.comm.all_gather(frame, [F] * W).view(W, F)
            t0 = time.perf_counter()
            rows[me].data.copy_(mine)
            scratch = torch.zeros(rows[0].numel(), dtype=torch.float32, device=mine.device)
            for j in range(W):
                scratch.zero_()
                self.down.decode_add(gathered[j], scratch, seed=frame_seed(self.config.seed, -1 - g, self.step, j,
                                                                           -1))
                rows[j].data.add_(scratch.to(rows[j].dtype))
            mine.copy_(rows[me].data)
            self._round.bytes_down_sent += (W - 1) * F
            self._round.bytes_down_recv += (W - 1) * F
        self._round.compress_seconds += time.perf_counter() - t0

    def resync_rows(self) -> None:
        """Take this rank's row of the copy from the optimizer's buffers (after an exact all-gather)."""
        for g, parts in enumerate(self.optimizer.parallel_partitioned_bit16_groups):
            self.replica_rows[g].copy_(parts[self.rank].data)

    # -- the step ------------------------------------------------------------------------------------------------
    def run_step(self, step, *args, **kwargs):
        """`step` (the optimizer's own) with the downlink in place of its all-gather; then the step's counters."""
        warm = self.step < self.config.warmup_steps
        self._in_step = True
        try:
            result = step(*args, **kwargs)
        finally:
            self._in_step = False
        stats, self._round = self._round, RoundStats()
        stats.skipped = int(stats.skipped > 0)
        self.skipped_steps += stats.skipped
        if warm:
            stats.dense_buckets += 1
        self._totals.add(stats)
        if self.monitor is not None and self.monitor.wants(self.step):
            self.monitor.log_round(self.step, stats, *self.residual_norms(), self.skipped_steps)
        self.step += 1
        self._rounds = 0
        return result

    def warming_up(self) -> bool:
        return self.step < self.config.warmup_steps

    # -- what it holds -------------------------------------------------------------------------------------------
    @property
    def totals(self) -> RoundStats:
        """The counters summed over completed steps."""
        return self._totals

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
        return {"worker_residual": self.residual.numel() * 4,
                "replica_rows": sum(r.numel() * r.element_size() for r in self.replica_rows)}

    def state_dict(self) -> dict:
        return {"format": _FORMAT, "world_size": self.world_size, "rank": self.rank, "step": self.step,
                "skipped_steps": self.skipped_steps, "config": self.config.to_dict(),
                "residual": self.residual.clone(), "replica_rows": [r.clone() for r in self.replica_rows],
                "totals": self._totals.as_dict()}

    def load_state_dict(self, sd: dict) -> None:
        """Resume from `state_dict` of the same rank and world size: residuals, step, and every rank's copy
        rebuilt from the saved rows (one dense all-gather, a collective)."""
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a DoubleSqueeze ZeRO-2 state (format {sd.get('format')!r}, expected {_FORMAT!r})")
        if sd["world_size"] != self.world_size or sd["rank"] != self.rank:
            raise ValueError(f"state of rank {sd['rank']} of {sd['world_size']} loaded on rank {self.rank} of "
                             f"{self.world_size}")
        saved = DoubleSqueezeConfig.from_dict(sd["config"])
        if saved != self.config:
            differ = [k for k, v in self.config.to_dict().items() if sd["config"].get(k) != v]
            raise ValueError(f"checkpoint was written with another DoubleSqueeze config (differs in {differ})")
        if sd["residual"].shape != self.residual.shape:
            raise ValueError(f"residual of {tuple(sd['residual'].shape)} for this model's {tuple(self.residual.shape)}")
        self.residual.copy_(sd["residual"])
        self.step, self.skipped_steps = sd["step"], sd["skipped_steps"]
        self._totals = RoundStats.from_dict(sd["totals"])
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
        self.residual.zero_()
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
        if state.warming_up():
            return stock_average(tensor, communication_data_type)
        state.reduce_bucket(tensor.view(-1), bucket_params(communication_data_type), self.gradient_average)

    def reduce_list(grads, dtype):
        flat = torch.cat([g.reshape(-1) for g in grads])
        state.reduce_bucket(flat, bucket_params(dtype), optimizer.gradient_average)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def buffered_reduce_fallback(self, rank, grads, communication_data_type, elements_per_buffer=500000000,
                                 log=None):
        bucket = optimizer.ipg_buckets.get(communication_data_type)
        if state.warming_up() or rank is not None or bucket is None or grads is not bucket.grads:
            return stock_fallback(rank, grads, communication_data_type, elements_per_buffer, log)
        reduce_list(grads, communication_data_type)

    def fallback_preserving_fp32(self, grads, grad_params, communication_data_type, elements_per_buffer):
        if state.warming_up():
            return stock_fallback32(grads, grad_params, communication_data_type, elements_per_buffer)
        reduce_list(grads, communication_data_type)

    def step(self, *args, **kwargs):
        return state.run_step(stock_step, *args, **kwargs)

    optimizer.average_tensor = types.MethodType(average_tensor, optimizer)
    optimizer.buffered_reduce_fallback = types.MethodType(buffered_reduce_fallback, optimizer)
    optimizer._buffered_reduce_fallback_preserving_fp32 = types.MethodType(fallback_preserving_fp32, optimizer)
    optimizer.step = types.MethodType(step, optimizer)
    _STATES[id(optimizer.parallel_partitioned_bit16_groups)] = state
    stage_1_and_2.all_gather_dp_groups = _dispatch_all_gather
