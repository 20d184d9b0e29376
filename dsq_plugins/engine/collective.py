"""The double-pass error-compensated collective: DoubleSqueeze on any `Communicator`, block by block.

For each block (docs/ARCHITECTURE.md section 3) of each tensor, on each of W ranks, the block's owner r acting as its server:

    worker i:   v_i = g_i + e_i;   c_i = C_w(v_i);   e_i <- v_i - c_i
                all_to_all: each block's c_i goes to the block's owner        (compressed bytes only)
    owner r:    v = mean_i c_i + e;   c = C_s(v);   e <- v - c
                all_gather of every owner's c                                 (compressed bytes only)
    every rank: the update of the block is c

Telescoping gives the conservation law ``sum_t c_t = sum_t mean_i g_i,t - mean_i e_i,T - e_T`` (docs/ARCHITECTURE.md). A block's
owner, seeds and compression depend on the tensor, the block and W only, so the result does not depend on how an
integration groups tensors into buckets: it equals `Simulator` for any layout. Tensors below `min_numel` elements,
and every tensor during warm-up, travel uncompressed and keep no residual: in the same two messages when the
bucket also has compressed tensors, by one all-reduce (what DDP sends) when it is dense throughout.

A step with a NaN/Inf on any rank is skipped on every rank: each uplink message carries the sender's flag, so all
ranks learn it from the same all_to_all; no residual changes and the update is all-NaN, so that an AMP
`GradScaler` skips the optimiser step exactly as with plain DDP. The flag is a device tensor: nothing waits for it.

The stages (`begin`, `serve`, `end`) can run on different threads: the adapters drive them through
`pipeline.BucketPipeline` (the uplink issued where a bucket becomes ready, the rest on a communication thread);
`reduce` runs them in a row.
"""
import threading
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch

from ..compression import fastpath
from .auto import AutoTuner, DENSE, MIXED, time_all_reduce
from .communicator import Communicator, ProcessGroupUnavailable
from ..config import DoubleSqueezeConfig
from ..compression.registry import get_compressor
from .bucket import BucketState, ErrorNorms, Exchange, Scratch, now
from .guard import QualityGuard
from .policy import PolicyError, TensorInfo, TensorPolicy
from ..monitoring.monitor import Monitor, RoundStats
from .plan import BucketPlan, expand_owned, owned_blocks

__all__ = ["DoubleSqueezeCollective", "BucketExchange", "Exchange", "default_chunk_elements"]


def default_chunk_elements(device: torch.device) -> int:
    """Elements of full rows processed at a time: cache-sized on the CPU, large on an accelerator (fewer
    launches; the temporaries are a few of these)."""
    return 1 << 18 if torch.device(device).type == "cpu" else 1 << 22


class _Round:
    """What the exchanges of one step did: counters, skip flags, error norms (device accumulators)."""

    def __init__(self):
        self.stats = RoundStats()
        self.skips: List[torch.Tensor] = []
        self.norms = ErrorNorms()
        self.guard_sampled = False


class BucketExchange:
    """One bucket's double pass in flight: one engine `Exchange` (part) per compressor its tensors use (the
    quality guard may have moved some of them to another compressor), each with its own uplink and downlink, and
    one skip decision for the whole bucket.

    Attributes:
        step: the step (communication round) it belongs to.
        keys, items: the bucket's tensors.
        spec: the bucket's compressor (auto's choice or the config's; None: dense).
        parts, index, specs: the parts, and for each the positions of its tensors among `items` and its compressor
            (None: dense).
        skip: 0-d bool tensor once served: whether some rank had a NaN or Inf in the bucket.
    """

    def __init__(self, step: int, keys, items, spec: Optional[str]):
        self.step, self.keys, self.items, self.spec = step, keys, items, spec
        self.parts: List[Exchange] = []
        self.index: List[List[int]] = []
        self.specs: List[Optional[str]] = []
        self.skip: Optional[torch.Tensor] = None

    @property
    def awaits_downlink(self) -> bool:
        """Once served: whether some part still has a downlink in flight (a bucket dense throughout has none, and
        can end at once)."""
        return any(ex.down is not None for ex in self.parts)

    @property
    def stats(self) -> RoundStats:
        total = RoundStats()
        for ex in self.parts:
            total.add(ex.stats)
        return total


class DoubleSqueezeCollective:
    """Owns what persists between steps (residuals, step, counters) and runs the double pass.

    Call `reduce(items)` for each group of tensors of a step (or `begin` / `serve` / `end`), then `finish_step()`
    once. Each item is ``(key, flat_tensor)``; `key` names the tensor (its residuals are kept under it, and it
    seeds random compressors and places its blocks' owners). Groups must be reduced in the same order, with the
    same keys and sizes, on every rank. A group's tensors share one dtype and device.

    Args:
        config: the `DoubleSqueezeConfig`.
        communicator: the `Communicator` (None: bound later with `bind`, before the first reduction).
        monitor: optional `Monitor`.
        chunk_elements: elements of full rows per chunk (default: `default_chunk_elements` of the device).
        key_names: how a key is named in warnings and TensorBoard tags (default: ``str(key)``).
        tensor_info: what the config's `policy` needs to know of a key (`TensorInfo`: name, shape, roles), or None
            for a key the integration cannot describe; needed only with a policy.
        residual_dtype: the dtype residuals are stored in (default: `residual_dtype_for` the gradients' dtype,
            the dtype the compensation is computed in). ``torch.bfloat16`` halves their memory: each update is
            still computed in that wider dtype and rounded once into the store.
    """

    def __init__(self, config: DoubleSqueezeConfig, communicator: Optional[Communicator] = None,
                 monitor: Optional[Monitor] = None, chunk_elements: Optional[int] = None,
                 key_names: Optional[Callable[[Hashable], str]] = None,
                 tensor_info: Optional[Callable[[Hashable], Optional[TensorInfo]]] = None,
                 residual_dtype: Optional[torch.dtype] = None):
        if not isinstance(config, DoubleSqueezeConfig):
            raise TypeError(f"config must be a DoubleSqueezeConfig, got {type(config).__name__}")
        if residual_dtype is not None and residual_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"residual_dtype must be torch.float32, torch.bfloat16 or torch.float16, "
                             f"got {residual_dtype!r}")
        self.residual_dtype = residual_dtype
        # the ranks auto's measurements are averaged over, so that they decide alike (None: this collective's
        # group); HSDP sets the whole job's, whose replica groups each run a collective of their own
        self.decision_comm: Optional[Communicator] = None
        self.config = config
        self.monitor = monitor
        self.chunk_elements = chunk_elements
        self._comm = communicator
        self._down_comm: Optional[Communicator] = None
        self._key_names = key_names
        self._tensor_info = tensor_info
        self.policy = TensorPolicy(config.policy)
        self._compressors = {spec: (get_compressor(spec), config.server_for(spec)) for spec in config.candidate_specs}
        self.auto: Optional[AutoTuner] = AutoTuner(config.candidate_specs) if config.auto else None
        self.guard: Optional[QualityGuard] = (QualityGuard(config.guard, config.fallback, config.block_size)
                                              if config.guard else None)
        self._guard_sampling = False
        self._step_started = -1
        self.step = 0
        self._init_counters()
        self._states: Dict[Tuple, BucketState] = {}
        self.flushes = 0                   # tensors whose residuals went out with a dense reduction (auto, guard)
        self._holder: Dict[Hashable, BucketState] = {}
        self._loaded: Dict[Hashable, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        self._loaded_numels: Dict[Hashable, int] = {}
        self._scratch = Scratch()
        self._lock = threading.Lock()

    def _init_counters(self):
        self._skipped_host = 0
        self._skipped_pending: List[torch.Tensor] = []
        self._skipped_reductions: List[torch.Tensor] = []
        self._totals = RoundStats()
        self._rounds: Dict[int, _Round] = {}

    # -- the process group -----------------------------------------------------------------------------------
    @property
    def comm(self) -> Communicator:
        if self._comm is None:
            raise ProcessGroupUnavailable("this DoubleSqueeze collective has no process group yet")
        return self._comm

    def bind(self, communicator: Communicator, down: Optional[Communicator] = None) -> None:
        """Bind the communicator (and, if given, another one of the same ranks for the downlinks: DDP's hook
        issues uplinks and downlinks from two threads)."""
        self._comm, self._down_comm = communicator, down

    @property
    def bound(self) -> bool:
        return self._comm is not None

    @property
    def down_comm(self) -> Communicator:
        """The communicator of the downlink (the DDP hook gives it a process group of its own)."""
        return self._down_comm or self.comm

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.size

    # -- the algorithm -------------------------------------------------------------------------------------
    def compresses(self, numel: int) -> bool:
        """Whether a tensor of `numel` elements is compressed at the current step (else: averaged dense)."""
        return self.step >= self.config.warmup_steps and numel >= max(1, self.config.min_numel)

    def reduce(self, items: Sequence[Tuple[Hashable, torch.Tensor]], outs: Optional[List[torch.Tensor]] = None,
               flat: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """The updates for a group of tensors: for each ``(key, flat)`` (1-D, any float dtype), the compressed
        mean over ranks, written into `outs` (1-D, one per item; default: new tensors). One all_to_all and one
        all_gather (and an all-reduce for dense tensors). It is `begin`, `serve` and `end` in a row."""
        if outs is None:
            outs = [torch.empty_like(t) for _, t in items]
        ex = self.begin(items, flat)
        self.serve(ex)
        return self.end(ex, outs)

    def begin(self, items: Sequence[Tuple[Hashable, torch.Tensor]],
              flat: Optional[torch.Tensor] = None) -> BucketExchange:
        """Stage 1, the worker pass: compress ``g + e_i`` block by block into the uplink and issue it (and the
        dense tensors' all-reduce). `flat`, if given, is the buffer the tensors are views of (a DDP bucket): a
        bucket that is dense throughout is then all-reduced in place. The tensors must stay untouched until `end`."""
        keys, tensors = self._check(items)
        if self._step_started != self.step:
            self._step_started = self.step
            self._on_step_start(tensors[0].device)
        spec, groups = self._groups(keys, tensors)
        bex = BucketExchange(self.step, keys, tensors, spec)
        track = self.monitor is not None and self.monitor.wants(self.step)
        comm = self.comm
        for part_spec, idx, dense in groups:
            sub_keys, sub = [keys[i] for i in idx], [tensors[i] for i in idx]
            state, flushed = self._state_for(sub_keys, sub, part_spec, dense)
            ex = Exchange(state, sub, self.step, track)
            ex.flushed = flushed
            plan = state.plan
            if self._guard_sampling and plan.compressed and state.keep_worker:
                ex.guard_sums = torch.zeros(4, len(plan.compressed), dtype=torch.float64, device=plan.device)
            t0 = now()
            part_flat = flat if len(groups) == 1 else None
            bad = state.worker_pass(ex, self._scratch, part_flat)
            ex.in_place_dense = ex.dense_buf is not None and ex.dense_buf is part_flat
            W, me = plan.world_size, plan.rank
            if state.has_rows:
                state.send[state.header_pos] = bad.to(torch.uint8)
                up = state.up
                ex.up = comm.all_to_all_async(state.send, up.sizes, [up.sizes[me]] * W,
                                              out=state.exchange_buf[:state.recv_size], name=f"dsq.up.{sub_keys[0]}")
            if ex.dense_buf is not None:
                ex.dense = comm.all_reduce_sum_async(ex.dense_buf, name=f"dsq.dense.{sub_keys[0]}")
            self._count(ex, t0)
            bex.parts.append(ex)
            bex.index.append(idx)
            bex.specs.append(part_spec)
        return bex

    def serve(self, bex: BucketExchange) -> None:
        """Stage 2, once the uplinks have arrived: the skip decision (any rank's flag in any part), the worker
        residual update, and the server pass of this rank's blocks into its downlink messages, which are then
        issued."""
        recvs, flags = [], []
        for ex in bex.parts:
            recv = ex.up.wait() if ex.up is not None else None
            if ex.dense is not None:
                ex.dense.wait()
            recvs.append(recv)
            flags.append(ex.state.skip_flag(ex, recv))
        bex.skip = flags[0] if len(flags) == 1 else torch.stack(flags).any()
        for ex, recv in zip(bex.parts, recvs):
            ex.skip = bex.skip
            t0 = now()
            ex.state.serve(ex, recv, self._scratch)
            if ex.state.has_rows:
                down = ex.state.down
                ex.down = self.down_comm.all_gather_async(ex.state.own, down.sizes,
                                                          out=ex.state.exchange_buf[:down.total],
                                                          name=f"dsq.down.{ex.state.plan.keys[0]}")
            ex.stats.compress_seconds += now() - t0

    def end(self, bex: BucketExchange, outs: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """Stage 3, once the downlinks have arrived: decode every block's update into `outs` (default: into the
        input tensors themselves). A skipped exchange gives all-NaN updates."""
        in_place = outs is None
        outs = bex.items if in_place else outs
        skipped = None
        for ex, idx in zip(bex.parts, bex.index):
            gathered = ex.down.wait() if ex.down is not None else None
            t0 = now()
            ex.state.finish(ex, gathered, [outs[i] for i in idx], self._scratch, into_items=in_place)
            ex.stats.compress_seconds += now() - t0
            if ex.flushed:
                if skipped is None:
                    skipped = bool(bex.skip)       # (a host read, on a switch step only)
                if skipped:                        # a skipped step applies nothing: the residuals stay held
                    for key, w, s in ex.flushed:
                        self.hold_again(key, w, s)
        stats = bex.stats
        if self.auto is not None:
            itemsize = bex.items[0].element_size()
            W = self.world_size
            ring = 2 * (W - 1) * sum(t.numel() for t in bex.items) * itemsize // max(1, W)
            self.auto.record(self.auto.measuring, tuple(bex.keys), stats.compress_seconds, stats.bytes_sent, ring)
        with self._lock:
            if self.guard is not None and bex.spec is not None:
                for ex in bex.parts:
                    if ex.guard_sums is not None:
                        self.guard.add([sp.key for sp in ex.state.plan.compressed], bex.spec, ex.guard_sums)
            r = self._rounds.setdefault(bex.step, _Round())
            r.stats.add(stats)
            r.skips.append(bex.skip)
            r.guard_sampled |= any(ex.guard_sums is not None for ex in bex.parts)
            for ex in bex.parts:
                r.norms.add(ex.norms)
        return outs

    def _on_step_start(self, device) -> None:
        """The first reduction of a step: auto's schedule and the guard's decisions, at the same step on every
        rank (each may take a small all-reduce)."""
        warm = self.step < self.config.warmup_steps
        if self.auto is not None and not warm:
            W = self.world_size
            self.auto.ring = 2 * (W - 1) / W
            self.auto.on_step_start(self.step, self.auto.clock(), lambda v: self._mean_over_ranks(v, device),
                                    (lambda n: self._time_all_reduce(n, device)) if W > 1 else None,
                                    lambda v: self._mean_over_ranks_async(v, device))
        if self.guard is not None:
            with self._lock:
                due = self.guard.due(self.step)
            if due:
                with self._lock:
                    switches = self.guard.decide(self.step, lambda v: self._sum_over_ranks(v, device))
                self.guard.warn(switches, self.describe_key)
                if switches and self.monitor is not None:
                    for sw in switches:
                        self.monitor.log_scalar(f"{self.monitor.prefix}guard/{self.describe_key(sw.key)}",
                                                float(self.guard.levels[(sw.key, sw.spec)]), self.step)
                    self.monitor.log_scalar(self.monitor.prefix + "guard/switches", float(len(self.guard.switches)),
                                            self.step)
            self._guard_sampling = not warm and self.guard.samples(self.step)

    def describe_key(self, key: Hashable) -> str:
        """How a tensor is named in warnings and TensorBoard tags (`key_names`, else ``str(key)``)."""
        return self._key_names(key) if self._key_names is not None else str(key)

    def guard_report(self) -> dict:
        """The guard's switches so far: [{step, tensor, from, to, pass, delta, nominal}]."""
        if self.guard is None:
            return {"enabled": False}
        return {"enabled": True, "switches": [
            dict(step=s.step, tensor=self.describe_key(s.key), spec=s.spec, to=s.to or "dense", pass_=s.pass_,
                 delta=round(s.delta, 4), nominal=round(s.nominal, 4)) for s in self.guard.switches]}

    # -- plans and residuals -----------------------------------------------------------------------------------
    def _check(self, items):
        keys, tensors = [], []
        for key, t in items:
            if t.dim() != 1 or not t.is_floating_point():
                raise ValueError(f"tensor {key!r}: reduce expects 1-D floating-point tensors, got shape "
                                 f"{tuple(t.shape)} dtype {t.dtype}")
            keys.append(key)
            tensors.append(t)
        if not tensors:
            raise ValueError("reduce needs at least one tensor")
        for key, t in zip(keys, tensors):
            if t.dtype != tensors[0].dtype or t.device != tensors[0].device:
                raise ValueError(f"tensors of one reduction share a dtype and device: {keys[0]!r} is "
                                 f"{tensors[0].dtype} on {tensors[0].device}, {key!r} is {t.dtype} on {t.device}")
        return keys, tensors

    def _sum_over_ranks(self, values: List[float], device) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        return self.comm.all_reduce_sum(t).tolist()

    def _mean_over_ranks(self, values: List[float], device) -> List[float]:
        """`values` averaged over the ranks that decide together: `decision_comm`'s if set, else this group's."""
        return self._mean_over_ranks_async(values, device)()

    def _mean_over_ranks_async(self, values: List[float], device) -> Callable[[], List[float]]:
        """`_mean_over_ranks`'s all-reduce issued now (in this group's order of collectives on every rank); the
        callable it returns waits for it and gives the mean."""
        comm = self.decision_comm or self.comm
        t = torch.tensor(values, dtype=torch.float64, device=device)
        pending = comm.all_reduce_sum_async(t, name="dsq.auto.check")
        return lambda: (pending.wait() / comm.size).tolist()

    def _time_all_reduce(self, nbytes: int, device) -> float:
        """Seconds of a blocking all-reduce of `nbytes` (auto's probe of the link)."""
        return time_all_reduce(self.comm, nbytes, device)

    def _groups(self, keys, tensors):
        """(the bucket's compressor spec or None, [(spec, positions, dense flags)]): the bucket's tensors grouped
        by the compressor each uses at this step. Dense tensors (small, warm-up, auto's dense) ride in the first
        group's messages; a bucket with nothing compressed is one dense group."""
        spec = self.auto.choice(tuple(keys)) if self.auto is not None else self.config.compressor
        per = []
        for key, t in zip(keys, tensors):
            base = None if spec is None or not self.compresses(t.numel()) else self._policy_spec(key, spec)
            if base is None:
                per.append(None)
            else:
                per.append(base if self.guard is None else self.guard.spec_for(key, base))
        specs = list(dict.fromkeys(s for s in per if s is not None))
        if not specs:
            return spec, [(None, list(range(len(keys))), tuple(True for _ in keys))]
        groups = []
        for n, s in enumerate(specs):
            idx = [i for i, x in enumerate(per) if x == s or (n == 0 and x is None)]
            groups.append((s, idx, tuple(per[i] is None for i in idx)))
        return spec, groups

    def _policy_spec(self, key: Hashable, spec: str) -> Optional[str]:
        """The compressor of tensor `key` in a bucket compressed with `spec`: its policy rule's (None: dense),
        else `spec`."""
        if not self.policy:
            return spec
        info = self._tensor_info(key) if self._tensor_info is not None else None
        if info is None and key not in self.policy.assignments:
            if self._tensor_info is None:
                raise PolicyError(f"DoubleSqueezeConfig.policy needs to know each tensor's role or name, and this "
                                  f"collective was built without tensor_info (tensor {self.describe_key(key)!r})")
        rule = self.policy.rule_for(key, info)
        return spec if rule is None else rule.spec

    def policy_report(self) -> dict:
        """The policy's rules and the compressor each tensor they decided got: {rules, tensors}."""
        return {"rules": [[r.selector, r.label] for r in self.policy.rules],
                "tensors": self.policy.report(self.describe_key)}

    def _state_for(self, keys, tensors, spec, dense) -> Tuple[BucketState, list]:
        numels = tuple(t.numel() for t in tensors)
        dtype, device = tensors[0].dtype, tensors[0].device
        key = (tuple(keys), numels, dense, dtype, device, spec)
        state = self._states.get(key)
        if state is None:
            state = self._new_state(keys, numels, dense, dtype, device, spec)
            self._states[key] = state
        return state, self._claim(state, keys, tensors)

    def _new_state(self, keys, numels, dense, dtype, device, spec) -> BucketState:
        cfg = self.config
        chunk = self.chunk_elements or default_chunk_elements(device)
        plan = BucketPlan(keys, numels, dense, dtype, device, self.world_size, self.rank, cfg.block_size, chunk)
        wc, sc = self._pair(spec if spec is not None else cfg.candidate_specs[0])
        return BucketState(plan, wc, sc, cfg.worker_ef, cfg.server_ef, cfg.seed, self.residual_dtype)

    def _pair(self, spec: str):
        """(worker, server) compressors of a part compressed with `spec`."""
        if spec not in self._compressors:
            self._compressors[spec] = (get_compressor(spec), self.config.server_for(spec))
        return self._compressors[spec]

    def _claim(self, state: BucketState, keys, tensors) -> list:
        """Make `state` hold the residuals of the tensors it compresses (moved from whichever state or checkpoint
        holds them: the layout or the compressor changed), and send along with its gradient the residuals of a
        tensor it sends dense (auto switched it to dense): ``g + e_i`` from each rank plus ``W e`` from the
        owners, so that the dense mean is ``mean_i (g_i + e_i) + e`` and no mass is lost. Returns what was sent
        along ([(key, worker, server)]): if the reduction is skipped (a NaN), it is held again."""
        compressed, flushed = state.compressed_keys, []
        for key, t in zip(keys, tensors):
            old = self._holder.get(key)
            if old is state:
                continue
            if key in compressed:
                if old is not None:
                    state.load_residuals(key, old.worker_residual(key), old.server_residual(key))
                    self._release(old, key)
                elif key in self._loaded:
                    state.load_residuals(key, *self._loaded.pop(key))
                self._holder[key] = state
                state.live.add(key)
                continue
            taken = self.flush_into(key, t)
            if taken is not None:
                flushed.append((key, *taken))
        return flushed

    def flush_into(self, key: Hashable, t: torch.Tensor):
        """Add tensor `key`'s residuals to `t` (flat, its size) as a dense reduction of `t` must deliver them:
        ``e_i`` from each rank plus ``W e`` from the owners, so that the mean over ranks carries
        ``mean_i e_i + e``; this collective no longer holds them. Returns the (worker, server) residuals taken, to
        `hold_again` if the step that was to deliver them is skipped, or None if it held none."""
        old = self._holder.get(key)
        if old is not None:
            w, s = old.worker_residual(key), old.server_residual(key)
            self._release(old, key)
        elif key in self._loaded:
            w, s = self._loaded.pop(key)
        else:
            return None
        if w is not None:
            t.add_(w.to(device=t.device, dtype=t.dtype))
        if s is not None:
            own = self.expand_server_residual(key, s.to(device=t.device, dtype=t.dtype), t.numel())
            t.add_(own, alpha=self.world_size)
        self.flushes += 1
        return w, s

    def holds(self, key: Hashable) -> bool:
        """Whether this collective holds residuals of tensor `key` (which `flush_into` would deliver)."""
        return key in self._holder or key in self._loaded

    def hold_again(self, key: Hashable, worker: Optional[torch.Tensor], server: Optional[torch.Tensor]) -> None:
        """Hold residuals `flush_into` took for a reduction that was skipped (a NaN): nothing is lost."""
        self._loaded[key] = (worker, server)

    def rescale(self, key: Hashable, factor: torch.Tensor) -> None:
        """Multiply tensor `key`'s residuals, coordinate by coordinate, by `factor` (flat, its size), for a caller
        that changes the units of what it reduces (`DoubleSqueezeAdamW`'s variance refresh changes the whitening
        of its momentum): the mass held keeps its value in the new units."""
        state = self._holder.get(key)
        if state is not None:
            w, s = state.worker_residual(key), state.server_residual(key)
        elif key in self._loaded:
            w, s = self._loaded[key]
        else:
            return
        factor = factor.reshape(-1)
        if w is not None:           # in float32 at least (residuals may be stored in bfloat16); stored as they were
            w = (w * factor.to(device=w.device, dtype=torch.promote_types(w.dtype, torch.float32))).to(w.dtype)
        if s is not None:
            f = factor.to(device=s.device, dtype=torch.promote_types(s.dtype, torch.float32))
            cfg = self.config
            parts = [f[a:b] for a, b in owned_blocks(key, f.numel(), cfg.block_size, self.world_size, self.rank)]
            s = (s * (torch.cat(parts) if parts else f[:0])).to(s.dtype)
        if state is not None:
            state.load_residuals(key, w, s)
        else:
            self._loaded[key] = (w, s)

    def _release(self, old: BucketState, key) -> None:
        """`old` no longer holds `key`'s residuals: zero them there (it may be used again), forget it when it
        holds none."""
        old.zero_residuals(key)
        old.live.discard(key)
        if self._holder.get(key) is old:
            del self._holder[key]
        if not old.live:
            self._states = {k: v for k, v in self._states.items() if v is not old}

    def worker_residuals(self) -> Dict[Hashable, torch.Tensor]:
        """{key: this rank's worker residual e_i of the tensor (flat, its size)}: tensors that keep one."""
        out = {k: w for k, (w, _) in self._loaded.items() if w is not None}
        for key, state in self._holder.items():
            w = state.worker_residual(key)
            if w is not None:
                out[key] = w
        return out

    def server_residuals(self) -> Dict[Hashable, torch.Tensor]:
        """{key: this rank's server residual of the tensor: the blocks it owns, in block order, concatenated}.
        `expand_server_residual` puts them in place in a tensor of the full size."""
        out = {k: s for k, (_, s) in self._loaded.items() if s is not None}
        for key, state in self._holder.items():
            s = state.server_residual(key)
            if s is not None:
                out[key] = s
        return out

    def expand_server_residual(self, key: Hashable, compact: torch.Tensor, numel: int) -> torch.Tensor:
        """This rank's server residual of `key` (as `server_residuals` gives it) in a zero tensor of `numel`
        elements, each owned block at its place: summed over ranks, that is the server residual e."""
        return expand_owned(key, compact, numel, self.config.block_size, self.world_size, self.rank)

    def residual_norms(self) -> Tuple[float, float]:
        """(||e_i||, ||e|| of this rank's owned blocks), L2 over all tensors."""
        def norm(ts):
            sq = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in ts)
            return sq ** 0.5
        return norm(self.worker_residuals().values()), norm(self.server_residuals().values())

    def memory_report(self) -> Dict[str, int]:
        """Bytes kept from step to step, by role (residuals, wire buffers, tail tables, index tables, dense
        buffers, per-thread scratch) and in total: what this state adds to the gradients' own memory."""
        out: Dict[str, int] = {}
        seen = set()
        for state in self._states.values():
            if id(state) in seen:
                continue
            seen.add(id(state))
            for k, v in state.memory().items():
                out[k] = out.get(k, 0) + v
        out["scratch"] = self._scratch.nbytes()
        out["total"] = sum(out.values())
        return out

    def _residual_tensors(self):
        """Every residual buffer the bucket states hold (worker's and server's, full and tail rows)."""
        for state in set(self._holder.values()):
            for t in (state.e_full, state.e_tail, state.s_full, state.s_tail):
                if t is not None:
                    yield t

    def reset_residuals(self) -> None:
        """Zero every residual (a checkpoint without them, or from another world size)."""
        self._loaded.clear()
        for t in self._residual_tensors():
            t.zero_()

    def scale_residuals(self, factor: float) -> None:
        """Multiply every residual, worker's and server's, by `factor`: the gradients' units changed (a loss
        scaler's new scale over the old), and the mass the residuals hold follows them, so that what they deliver
        in gradient units is unchanged."""
        for t in self._residual_tensors():
            t.mul_(factor)
        for w, s in self._loaded.values():
            for t in (w, s):
                if t is not None:
                    t.mul_(factor)

    # -- steps, counters, monitoring -----------------------------------------------------------------------
    def skip_step(self) -> RoundStats:
        """A step its framework skips before any reduction (a loss scaler's overflow that every rank agreed on):
        the step advances and counts as skipped; no residual changes. Call it with no reduction in flight."""
        step = self.advance_step()
        with self._lock:
            r = self._rounds.setdefault(step, _Round())
        r.stats.skipped += 1
        self._skipped_host += 1
        return self.close_step(step)

    def _count(self, ex: Exchange, t0: float) -> None:
        state, r = ex.state, ex.stats
        plan = state.plan
        W, me = plan.world_size, plan.rank
        itemsize = torch.empty((), dtype=plan.dtype).element_size()
        r.dense_bytes += plan.numel * itemsize
        r.compressed_tensors += len(plan.compressed)
        r.dense_tensors += len(plan.dense_items)
        r.compressed_buckets += int(state.has_rows)
        r.dense_buckets += int(plan.all_dense)
        if state.has_rows:
            up, down = state.up, state.down
            r.bytes_up_sent += sum(b for j, b in enumerate(up.sizes) if j != me)
            r.bytes_up_recv += (W - 1) * up.sizes[me]
            r.bytes_down_sent += (W - 1) * down.sizes[me]
            r.bytes_down_recv += sum(b for j, b in enumerate(down.sizes) if j != me)
            r.payload_bytes += up.total
        if plan.all_dense:
            nbytes = plan.dense_numel * itemsize
            ring = nbytes * (W - 1) // W                    # what a ring all-reduce moves in each of its passes
            r.bytes_up_sent += ring
            r.bytes_up_recv += ring
            r.bytes_down_sent += ring
            r.bytes_down_recv += ring
            r.payload_bytes += nbytes
        r.compress_seconds += now() - t0

    def finish_step(self) -> RoundStats:
        """Close the current step (communication round) once all its reductions have ended: advance `step`,
        fold the round's counters into `totals`, log to the monitor. Returns the round's counters."""
        return self.close_step(self.advance_step())

    def advance_step(self) -> int:
        """Start the next step (reductions begun from now on belong to it); returns the step it ends, which
        `close_step` closes once its reductions have all ended."""
        step, self.step = self.step, self.step + 1
        return step

    def close_step(self, step: int) -> RoundStats:
        """Fold step `step`'s counters (its reductions have all ended) into `totals` and log them; `step` itself
        has already advanced (`finish_step` does both)."""
        with self._lock:
            r = self._rounds.pop(step, None) or _Round()
        skips = [s for s in r.skips if s is not None]
        if skips:
            if all(fastpath.on_cpu(s) for s in skips):
                n = sum(bool(s) for s in skips)
                r.stats.skipped += n
                self._skipped_host += bool(n)
            else:
                flags = torch.stack(skips)
                self._skipped_reductions.append(flags.sum())
                self._skipped_pending.append(flags.any())
        if r.guard_sampled:
            with self._lock:
                self.guard.end_sample()
        r.norms.into(r.stats)
        self._totals.add(r.stats)
        if self.monitor is not None and self.monitor.wants(step):
            w, s = self.residual_norms()
            self.monitor.log_round(step, r.stats, w, s, self.skipped_steps)
            if self.auto is not None:
                for tag, value in self.auto.scalars().items():
                    self.monitor.log_scalar(self.monitor.prefix + tag, value, step)
        return r.stats

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for a non-finite gradient on some rank (reading it waits for the device)."""
        if self._skipped_pending:
            self._skipped_host += int(sum(int(t) for t in self._skipped_pending))
            self._skipped_pending.clear()
        return self._skipped_host

    @property
    def totals(self) -> RoundStats:
        """The counters summed over all closed steps (reading it waits for the device)."""
        if self._skipped_reductions:
            self._totals.skipped += int(sum(int(t) for t in self._skipped_reductions))
            self._skipped_reductions.clear()
        return self._totals

    # -- checkpoints ---------------------------------------------------------------------------------------
    def _identity(self) -> dict:
        return {"config": self.config.to_dict(), "world_size": self.world_size, "rank": self.rank}

    def state_dict(self) -> dict:
        """Everything needed for an exact resume of this rank (each rank saves its own): residuals by tensor
        key, step, counters, config, and each tensor's element count (`numels`: with every rank's state,
        `engine.reshard.reshard_state_dicts` resumes on another number of ranks)."""
        numels = dict(self._loaded_numels)
        numels.update({key: state.numel(key) for key, state in self._holder.items()})
        return dict(self._identity(), step=self.step, skipped_steps=self.skipped_steps, numels=numels,
                    totals=self.totals.as_dict(), auto=None if self.auto is None else self.auto.state_dict(),
                    guard=None if self.guard is None else self.guard.state_dict(),
                    worker_residuals={k: v.detach().cpu().clone() for k, v in self.worker_residuals().items()},
                    server_residuals={k: v.detach().cpu().clone() for k, v in self.server_residuals().items()})

    def check_compatible(self, sd: dict) -> None:
        """Refuse a state saved under another world size, rank or config, with a message that says which."""
        if "worker_residuals" not in sd:
            raise ValueError("this DoubleSqueeze state was saved by a version without block semantics (per-shard "
                             "residuals); it cannot be resumed exactly: start the residuals afresh")
        mine = self._identity()
        for name in ("world_size", "rank"):
            if sd.get(name) != mine[name]:
                raise ValueError(f"cannot load a DoubleSqueeze state saved with {name}={sd.get(name)} into one "
                                 f"with {name}={mine[name]}: residuals are per rank and per owned block (with "
                                 f"every rank's state, `load_resharded` resumes on another number of ranks)")
        saved = sd.get("config", {})
        if saved != mine["config"]:
            diff = {k: (saved.get(k), v) for k, v in mine["config"].items() if saved.get(k) != v}
            raise ValueError(f"cannot load a DoubleSqueeze state saved with another config; differing keys "
                             f"(saved, current): {diff}")

    def load_state_dict(self, sd: dict) -> None:
        self.check_compatible(sd)
        self.step = sd["step"]
        self._init_counters()
        self._skipped_host = sd["skipped_steps"]
        self._totals = RoundStats.from_dict(sd["totals"])
        if self.auto is not None and sd.get("auto"):
            self.auto.load_state_dict(sd["auto"])
        if self.guard is not None and sd.get("guard"):
            self.guard.load_state_dict(sd["guard"])
        worker, server = sd["worker_residuals"], sd["server_residuals"]
        self.reset_residuals()
        self._loaded_numels = dict(sd.get("numels", {}))
        for key in set(worker) | set(server):
            w, s = worker.get(key), server.get(key)
            state = self._holder.get(key)
            if state is not None:
                state.load_residuals(key, w, s)
            else:
                self._loaded[key] = (w, s)
