"""DoubleSqueeze under PyTorch FSDP2 (`fully_shard`), at FSDP2's published seams.

Example::

    for block in model.blocks:
        fully_shard(block, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    state = dsq_plugins.fsdp.install(model, DoubleSqueezeConfig(compressor="sign"))
    ... train as usual ...
    torch.save(state.state_dict(), f"dsq_rank{rank}.pt")        # every rank saves its own

`install` gives every FSDP unit of `model` a custom reduce-scatter (`FSDPModule.set_custom_reduce_scatter`) and
all-gather (`set_custom_all_gather`) that run `engine.sharded`'s passes on the unit's flat buffer:

- uplink: the gradients' reduce-scatter carries ``C_w(g_i + e_i)`` row by row to each row's owner, with the worker
  residual ``e_i`` kept per unit (as large as the unit's unsharded gradient, in `residual_dtype`);
- downlink (`Downlink`): ``DELTA`` keeps every rank's copy ``x_hat`` of each unit between steps and sends
  ``C_s(x - x_hat)`` with the owner's residual (the parameters' memory of DDP or ZeRO-2: one unsharded copy per
  rank); ``QUANTIZED`` gathers int8 blocks with no residual, keeping FSDP's memory (the ZeRO-3 case, as ZeRO++);
  ``DENSE`` leaves the all-gather alone. The default follows the units: ``DELTA`` where they keep their
  parameters after forward (``reshard_after_forward=False``), else ``QUANTIZED``.

HSDP (shard inside a node, replicate across nodes): shard on the node's 1-D mesh and pass the replicas' group,
``install(model, config, replicate_group=mesh["replicate"].get_group())`` with ``fully_shard(..., mesh=
mesh["shard"])``. FSDP's reduce-scatter and all-gather inside the node stay FSDP's own; the all-reduce of each
shard across replicas (`FSDPModule.set_all_reduce_hook`) becomes the full double pass of
`DoubleSqueezeCollective`, with residuals the size of the shard (worker) and of the blocks this rank owns (server):
1 + 1/R times the shard's gradient for R replicas, half that with ``residual_dtype=torch.bfloat16``.

A step is one reduce-scatter of every unit; warm-up steps, and units smaller than ``min_numel``, go dense (FSDP's
own collectives). What this does not honour fails in `install`, before training: native HSDP (a 2-D mesh: its
replica all-reduce would stay dense), ``server_ef=False`` with ``DELTA`` (the copies would drift), parameters not
sharded on dim 0.
"""
import enum
import functools
import warnings
import re
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import AllGather, ReduceScatter
from torch.distributed.tensor import DTensor, Shard

from ..compression.registry import get_compressor
from ..config import DoubleSqueezeConfig
from ..engine.auto import AutoTuner, time_all_reduce
from ..engine.collective import DoubleSqueezeCollective
from ..engine.communicator import TorchDistributedCommunicator
from ..engine.plan import residual_dtype_for
from ..engine.sharded import CompressedReduceScatter, DeltaAllGather, QuantizedAllGather
from ..monitoring.monitor import Monitor, RoundStats

__all__ = ["Downlink", "FSDPDoubleSqueezeState", "install"]

_FORMAT = "dsq-fsdp-1"


class Downlink(enum.Enum):
    """How the parameters' all-gather travels (see the module docstring)."""
    DELTA = "delta"
    QUANTIZED = "quantized"
    DENSE = "dense"


class _Piece(NamedTuple):
    """Where one parameter lies in its unit's rows: `rows` of dim 0 per rank (padded), `width` elements per row
    of dim 0, from element `offset` of every rank's row."""
    name: str
    param: torch.nn.Parameter
    rows: int
    width: int
    offset: int

    def local_rows(self, rank: int) -> int:
        """Rows of dim 0 that `rank` holds (the last ranks may hold fewer, or none)."""
        return max(0, min(self.param.shape[0], (rank + 1) * self.rows) - rank * self.rows)


class _Unit:
    """One FSDP unit: its module, name, number, parameters (with their names in the installed module) and its
    two collectives."""

    def __init__(self, number: int, name: str, module: FSDPModule, params: List[torch.nn.Parameter],
                 param_names: List[str], uplink: CompressedReduceScatter, downlink):
        self.number, self.name, self.module, self.params = number, name, module, params
        self.param_names = param_names
        self.uplink, self.downlink = uplink, downlink
        self.numel = sum(p.numel() for p in params)
        self.last_spec: Optional[str] = None      # the compressor of its last reduction (None: dense)
        self.down_bytes = 0                        # bytes its gathers sent since its last reduction
        self.down_work = 0.0                       # ... and their compression seconds

    def pieces(self, world: int) -> Tuple[List[_Piece], int]:
        """FSDP2's rank-major layout of the unit on `world` ranks (parameters sharded on dim 0, padded to a
        multiple of `world`): each parameter's place in a row, and the row's length."""
        out, offset = [], 0
        for name, p in zip(self.param_names, self.params):
            if p.dim() == 0:
                raise ValueError(f"{name}: a 0-dim parameter has no dim 0 to shard")
            rows, width = -(-p.shape[0] // world), p[0].numel()
            out.append(_Piece(name, p, rows, width, offset))
            offset += rows * width
        return out, offset

    def mesh(self):
        p = self.params[0]
        return p.device_mesh if isinstance(p, DTensor) else None


class _UnitReduceScatter(ReduceScatter):
    def __init__(self, state: "FSDPDoubleSqueezeState", unit: _Unit):
        self.state, self.unit = state, unit

    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        self.state._reduce_scatter(self.unit, output_tensor, input_tensor, group, op)
        return None


class _UnitAllGather(AllGather):
    def __init__(self, state: "FSDPDoubleSqueezeState", unit: _Unit):
        self.state, self.unit = state, unit

    def allocate(self, size, *, dtype, device):
        numel = 1
        for s in size:
            numel *= int(s)
        self.unit.downlink.allocate(numel, dtype, device)
        return self.unit.downlink.buffer.view(*size)

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.state._all_gather(self.unit, output_tensor, input_tensor, group)
        return None


def _managed_params(unit: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters FSDP2 manages in `unit`'s group, in its order: depth first, not entering nested units."""
    out, seen = [], set()

    def visit(m: torch.nn.Module, top: bool):
        if not top and isinstance(m, FSDPModule):
            return
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        for child in m.children():
            visit(child, False)
    visit(unit, True)
    return out


def _reshards_after_forward(unit: FSDPModule) -> bool:
    groups = unit._get_fsdp_state()._fsdp_param_groups
    return any(g.post_forward_mesh_info is not None for g in groups)


class FSDPDoubleSqueezeState:
    """What `install` set up: the units' collectives, residuals, step and counters.

    Attributes:
        config: the `DoubleSqueezeConfig`.
        downlink: the `Downlink` mode.
        step: reduce-scatter rounds completed (every unit reduced once).
        monitor: optional `Monitor`, logged once per step.
    """

    def __init__(self, module: torch.nn.Module, config: DoubleSqueezeConfig, downlink: Downlink,
                 monitor: Optional[Monitor], residual_dtype: Optional[torch.dtype], param_compressor: str,
                 replicate_group=None):
        self.config, self.downlink, self.monitor = config, downlink, monitor
        self.replicate_group = replicate_group
        # HSDP: the replicas' all-reduce of each shard is the engine's double pass
        self.collective: Optional[DoubleSqueezeCollective] = None
        if replicate_group is not None:
            self.collective = DoubleSqueezeCollective(config, TorchDistributedCommunicator(replicate_group), monitor,
                                                      key_names=self._unit_name, residual_dtype=residual_dtype)
            # auto: every replica group decides alike, on step times averaged over the whole job
            self.collective.decision_comm = TorchDistributedCommunicator(dist.group.WORLD)
        self.residual_dtype = residual_dtype
        # compressor="auto": per unit, dense or a candidate, from the job's own step times (engine/auto.py); under
        # HSDP the collective's own, deciding the replicas' exchange
        self.auto: Optional[AutoTuner] = (None if not config.auto else AutoTuner(config.candidate_specs)
                                          if self.collective is None else self.collective.auto)
        self._started = -1
        self.step = 0
        self.skipped_steps = 0
        self._totals = RoundStats()
        self._round = RoundStats()
        self._reduced: set = set()
        self._comms: Dict[int, TorchDistributedCommunicator] = {}
        self.units: List[_Unit] = []
        worker = get_compressor(config.candidate_specs[0]) if config.auto else config.worker
        server = config.server_for(config.candidate_specs[0] if config.auto else config.compressor)
        quant = get_compressor(param_compressor)
        names = {id(p): n for n, p in module.named_parameters()}
        for name, m in module.named_modules():
            if not isinstance(m, FSDPModule):
                continue
            params = _managed_params(m)
            if not params:
                continue
            key = len(self.units)
            up = CompressedReduceScatter(worker, config.block_size, key, config.worker_ef, residual_dtype, config.seed)
            if downlink is Downlink.DELTA:
                down = DeltaAllGather(server, config.block_size, key, config.seed)
            elif downlink is Downlink.QUANTIZED:
                down = QuantizedAllGather(quant, config.block_size, key, config.seed)
            else:
                down = None
            unit = _Unit(key, name or "<root>", m, params, [names.get(id(p), f"{key}.{i}") for i, p in
                                                            enumerate(params)], up, down)
            if self.collective is not None:
                m.set_all_reduce_hook(functools.partial(self._all_reduce, unit))
            else:
                m.set_custom_reduce_scatter(_UnitReduceScatter(self, unit))
                if down is not None:
                    m.set_custom_all_gather(_UnitAllGather(self, unit))
            self.units.append(unit)
        if not self.units:
            raise ValueError("install found no FSDP unit with parameters in this module: call fully_shard on the model "
                             "(or its blocks) first")

    def _unit_name(self, key) -> str:
        return self.units[key].name if isinstance(key, int) and key < len(self.units) else str(key)

    # -- the collectives -------------------------------------------------------------------------------------
    def _comm(self, group) -> TorchDistributedCommunicator:
        comm = self._comms.get(id(group))
        if comm is None:
            comm = self._comms[id(group)] = TorchDistributedCommunicator(group)
        return comm

    def _spec_for(self, unit: _Unit) -> Optional[str]:
        """The compressor of `unit` at this step, or None: dense (warm-up, a small unit, auto's choice)."""
        if self.step < self.config.warmup_steps or unit.numel < max(1, self.config.min_numel):
            return None
        return self.auto.choice(unit.number) if self.auto is not None else self.config.compressor

    def _begin(self, unit: _Unit, comm: TorchDistributedCommunicator) -> Optional[str]:
        """Every collective of a unit starts here: at the first one of a step, auto's schedule (the same
        collective on every rank); then the unit's compressor for this step, set on its passes."""
        if self._started != self.step:
            self._started = self.step
            if self.auto is not None and self.step >= self.config.warmup_steps:
                device = unit.params[0].device
                W = comm.size
                self.auto.ring = 2 * (W - 1) / W

                def sync_async(values):
                    pending = comm.all_reduce_sum_async(torch.tensor(values, dtype=torch.float64, device=device))
                    return lambda: (pending.wait() / W).tolist()

                def sync(values):
                    return sync_async(values)()

                def probe(nbytes):
                    return time_all_reduce(comm, nbytes, device)
                self.auto.on_step_start(self.step, self.auto.clock(), sync, probe if W > 1 else None, sync_async)
        spec = self._spec_for(unit)
        if spec is not None and self.auto is not None:
            unit.uplink.set_compressor(get_compressor(spec))
            if isinstance(unit.downlink, DeltaAllGather):
                unit.downlink.set_compressor(self.config.server_for(spec))
        return spec

    def _reduce_scatter(self, unit: _Unit, out: torch.Tensor, inp: torch.Tensor, group, op) -> None:
        if op == dist.ReduceOp.AVG:
            average = True
        elif op == dist.ReduceOp.SUM:
            average = False
        else:
            raise ValueError(f"DoubleSqueeze under FSDP2 averages or sums gradients; got the reduce op {op} "
                             "(a custom gradient divide factor): leave set_gradient_divide_factor unset")
        comm = self._comm(group)
        spec = self._begin(unit, comm)
        before = RoundStats()
        before.add(self._round)
        if spec is not None:
            skip = unit.uplink(comm, inp, out, average, self.step, self._round)
            self._round.skipped += int(skip)
        else:
            unit.uplink.flush_into(inp)            # a unit going dense (auto) sends its residual along
            dist.reduce_scatter_tensor(out, inp, op=op, group=group)
            nbytes = (comm.size - 1) * out.numel() * out.element_size()
            self._round.bytes_up_sent += nbytes
            self._round.bytes_up_recv += nbytes
            self._round.dense_bytes += nbytes
            self._round.payload_bytes += nbytes
            self._round.dense_tensors += 1
        unit.last_spec = spec
        if self.auto is not None:
            ring = 2 * (comm.size - 1) * out.numel() * out.element_size()
            self.auto.record(self.auto.measuring, unit.number,
                             self._round.compress_seconds - before.compress_seconds + unit.down_work,
                             self._round.bytes_sent - before.bytes_sent + unit.down_bytes, ring)
        unit.down_bytes, unit.down_work = 0, 0.0
        if isinstance(unit.downlink, DeltaAllGather):
            unit.downlink.reduced()
        if unit.number in self._reduced:            # a unit reduced twice: the round is over whatever is missing
            self._close_round()
        self._reduced.add(unit.number)
        if len(self._reduced) == len(self.units):
            self._close_round()

    def _all_reduce(self, unit: _Unit, reduce_output: torch.Tensor) -> None:
        """HSDP: the shard (averaged inside the node by FSDP) averaged across replicas by the double pass (under
        auto, the collective's choice: a unit going dense sends its residuals along)."""
        flat = reduce_output.view(-1)
        col = self.collective
        bex = col.begin([(unit.number, flat)], flat)       # flat: a dense step is all-reduced in place
        col.serve(bex)
        col.end(bex)                                      # the averages written into `flat` itself
        unit.last_spec = bex.specs[0]                     # one tensor: one part
        if unit.number in self._reduced:
            self._close_round()
        self._reduced.add(unit.number)
        if len(self._reduced) == len(self.units):
            self._close_round()

    def _all_gather(self, unit: _Unit, out: torch.Tensor, inp: torch.Tensor, group) -> None:
        comm = self._comm(group)
        spec = self._begin(unit, comm)
        sent, work = self._round.bytes_down_sent, self._round.compress_seconds
        unit.downlink(comm, out, inp, self.step, spec is None, self._round)
        unit.down_bytes += self._round.bytes_down_sent - sent
        unit.down_work += self._round.compress_seconds - work

    def _close_round(self) -> None:
        self._reduced = set()
        if self.collective is not None:
            self.collective.finish_step()
            self.step = self.collective.step
            self.skipped_steps = self.collective.skipped_steps
            return
        stats, self._round = self._round, RoundStats()
        skipped = stats.skipped > 0
        stats.skipped = int(skipped)
        self.skipped_steps += int(skipped)
        self._totals.add(stats)
        if self.monitor is not None and self.monitor.wants(self.step):
            self.monitor.log_round(self.step, stats, self.worker_residual_norm(), 0.0, self.skipped_steps)
        self.step += 1

    # -- what it holds ---------------------------------------------------------------------------------------
    @property
    def totals(self) -> RoundStats:
        """The counters summed over completed steps."""
        return self.collective.totals if self.collective is not None else self._totals

    def worker_residuals(self) -> Dict[str, torch.Tensor]:
        """Each unit's worker residual ``e_i``: (W, n) in FSDP's rank-major layout (this rank's row is zero); under
        HSDP, (n,) for this rank's shard."""
        if self.collective is not None:
            return {self.units[k].name: e for k, e in self.collective.worker_residuals().items()}
        return {u.name: u.uplink.residual for u in self.units if u.uplink.residual is not None}

    def server_residuals(self) -> Dict[str, torch.Tensor]:
        """HSDP: each unit's server residual of the blocks this rank owns among its replicas (else empty: the
        owner's residual of the parameters is ``x - x_hat``, see `replicas`)."""
        if self.collective is None:
            return {}
        return {self.units[k].name: e for k, e in self.collective.server_residuals().items()}

    def worker_residual_norm(self) -> float:
        sq = sum(float(e.float().pow(2).sum()) for e in self.worker_residuals().values())
        return sq ** 0.5

    def replicas(self) -> Dict[str, torch.Tensor]:
        """Under ``DELTA``: each unit's copy ``x_hat`` (W, n) that every rank computes with."""
        return {u.name: u.downlink.buffer.view(-1) for u in self.units
                if isinstance(u.downlink, DeltaAllGather) and u.downlink.buffer is not None}

    def memory_report(self) -> Dict[str, int]:
        """Bytes this state keeps from step to step, by role: worker residuals, replicas (``DELTA``'s copies)."""
        if self.collective is not None:
            return self.collective.memory_report()
        worker = sum(u.uplink.memory() for u in self.units)
        replicas = sum(u.downlink.memory() for u in self.units if u.downlink is not None)
        return {"worker_residuals": worker, "replicas": replicas, "total": worker + replicas}

    def resync(self) -> None:
        """Send the next parameter all-gather of every unit dense: after the parameters were changed other than by
        an optimizer step between a reduce-scatter and the next all-gather (for example, loaded)."""
        for u in self.units:
            if isinstance(u.downlink, DeltaAllGather):
                u.downlink.resync()

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state for an exact resume on the same number of ranks: residuals per unit, each rank's own
        row of its copies under ``DELTA``, the step and counters."""
        W = dist.get_world_size()
        if self.collective is not None:
            return {"format": _FORMAT, "hsdp": self.collective.state_dict(), "world_size": W,
                    "rank": dist.get_rank(), "config": self.config.to_dict(), "downlink": self.downlink.value}
        return {"format": _FORMAT, "config": self.config.to_dict(), "downlink": self.downlink.value,
                "world_size": W, "rank": dist.get_rank(), "step": self.step, "skipped_steps": self.skipped_steps,
                "auto": None if self.auto is None else self.auto.state_dict(),
                "totals": self._totals.as_dict(),
                "worker_residuals": {u.name: u.uplink.residual.detach().cpu().clone()
                                     for u in self.units if u.uplink.residual is not None},
                "replica_rows": {u.name: u.downlink.mine.detach().cpu().clone() for u in self.units
                                 if isinstance(u.downlink, DeltaAllGather) and u.downlink.mine is not None}}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a DoubleSqueeze FSDP2 state (format {sd.get('format')!r}, expected {_FORMAT!r})")
        W = dist.get_world_size()
        if sd["world_size"] != W or sd["rank"] != dist.get_rank():
            raise ValueError(f"this state was saved by rank {sd['rank']} of {sd['world_size']}; this is rank "
                             f"{dist.get_rank()} of {W}")
        if sd["config"] != self.config.to_dict() or sd["downlink"] != self.downlink.value:
            raise ValueError("this state was saved under another DoubleSqueeze config or downlink mode")
        if ("hsdp" in sd) != (self.collective is not None):
            raise ValueError("this state was saved with" + ("" if "hsdp" in sd else "out") + " a replicate group "
                             "(HSDP); this one is set up with" + ("" if self.collective is not None else "out"))
        if self.collective is not None:
            self.collective.load_state_dict(sd["hsdp"])
            self.step, self.skipped_steps, self._reduced = self.collective.step, self.collective.skipped_steps, set()
            return
        names = {u.name for u in self.units}
        unknown = (set(sd["worker_residuals"]) | set(sd["replica_rows"])) - names
        if unknown:
            raise ValueError(f"this state has units this model does not: {sorted(unknown)}")
        self.step, self.skipped_steps = sd["step"], sd["skipped_steps"]
        if self.auto is not None and sd.get("auto"):
            self.auto.load_state_dict(sd["auto"])
        self._totals = RoundStats.from_dict(sd["totals"])
        self._round, self._reduced = RoundStats(), set()
        for u in self.units:
            device = u.params[0].device
            e = sd["worker_residuals"].get(u.name)
            u.uplink.residual = None if e is None else e.to(device).clone()
            if isinstance(u.downlink, DeltaAllGather):
                mine = sd["replica_rows"].get(u.name)
                u.downlink.load_row(None if mine is None else mine.to(device))


    # -- torch.distributed.checkpoint -------------------------------------------------------------------------
    def checkpoint_state(self, checkpoint_id=None) -> dict:
        """This state for `torch.distributed.checkpoint`, beside the model's and optimizer's (`get_state_dict`)::

            dcp.save({"model": model_sd, "optim": optim_sd, "dsq": state.checkpoint_state()}, checkpoint_id=path)
            # resume, on any number of ranks:
            dsq_sd = state.checkpoint_state(checkpoint_id=path)        # shaped after what `path` holds
            dcp.load({"model": model_sd, "optim": optim_sd, "dsq": dsq_sd}, checkpoint_id=path)
            set_state_dict(model, optim, model_state_dict=model_sd, optim_state_dict=optim_sd)
            state.load_checkpoint_state(dsq_sd)

        It holds, sharded like each parameter (DTensors on its mesh, so that the checkpoint reshards them): the
        mean over ranks of the worker residuals and, under ``DELTA``, the owners' residuals ``x - x_hat``; and,
        for an exact resume on as many ranks, each rank's own residual rows and replica row (keys of their world
        size and rank). Given `checkpoint_id` (a folder `dcp.save` wrote), it is the template to load into: the
        exact part only if the checkpoint was saved by as many ranks. Saving reduces the worker residuals across
        ranks (one reduce-scatter per unit): every rank must call it."""
        if self.collective is not None:
            raise ValueError("under HSDP save `state.state_dict()` per rank (torch.save); the distributed "
                             "checkpoint form is for the sharded uplink")
        W, rank = self._shard_world()
        sd = {"format": _FORMAT, "config": self.config.to_dict(), "downlink": self.downlink.value,
              "world_size": W, "step": self.step, "skipped_steps": self.skipped_steps}
        saved_world = W
        if checkpoint_id is not None:
            saved_world = _saved_world(checkpoint_id)
        mean, owner = {}, {}
        for u in self.units:
            pieces, n = u.pieces(W)
            rows = self._worker_mean_row(u, W, n) if checkpoint_id is None else None
            mean[u.name] = {pc.name: self._sharded(pc, u, rank, None if rows is None else rows) for pc in pieces}
            if isinstance(u.downlink, DeltaAllGather):
                if checkpoint_id is None:
                    row = self._owner_residual_row(u, pieces, rank, n)
                    owner[u.name] = {pc.name: self._sharded(pc, u, rank, row) for pc in pieces}
                else:
                    owner[u.name] = {pc.name: self._sharded(pc, u, rank, None) for pc in pieces}
        sd["worker_mean"] = mean
        if owner:
            sd["owner_residual"] = owner
        if saved_world == W:
            mine = {}
            for u in self.units:
                pieces, n = u.pieces(W)
                e = u.uplink.residual
                entry = {"worker": e.detach().clone() if e is not None and checkpoint_id is None
                         else torch.zeros(W, n, dtype=self._residual_dtype(u), device=self._device(u))}
                if isinstance(u.downlink, DeltaAllGather):
                    m = u.downlink.mine
                    entry["replica"] = (m.detach().clone() if m is not None and checkpoint_id is None
                                        else torch.zeros(n, dtype=self._row_dtype(u), device=self._device(u)))
                mine[u.name] = entry
            sd[f"exact_w{W}"] = {f"rank{rank}": mine}
        return sd

    def load_checkpoint_state(self, sd: dict) -> None:
        """Resume from what `dcp.load` filled into `checkpoint_state(checkpoint_id=...)`'s template: exactly if it
        was saved by as many ranks, else with the residuals redistributed so that their mass is kept: every rank's
        worker residual becomes the saved mean (the mean over ranks, which the conservation law holds, is kept),
        and each owner's replica row becomes ``x - e`` of its new shard (the parameters every rank computes with
        are the ones saved). Call it after the model's parameters are loaded."""
        if sd.get("format") != _FORMAT:
            raise ValueError(f"not a DoubleSqueeze FSDP2 checkpoint state (format {sd.get('format')!r})")
        if sd["config"] != self.config.to_dict() or sd["downlink"] != self.downlink.value:
            raise ValueError("this checkpoint was saved under another DoubleSqueeze config or downlink mode")
        W, rank = self._shard_world()
        self.step, self.skipped_steps = int(sd["step"]), int(sd["skipped_steps"])
        self._round, self._reduced = RoundStats(), set()
        exact = sd.get(f"exact_w{W}", {}).get(f"rank{rank}")
        for u in self.units:
            pieces, n = u.pieces(W)
            if exact is not None:
                u.uplink.residual = exact[u.name]["worker"].to(self._device(u)).clone()
                if isinstance(u.downlink, DeltaAllGather):
                    u.downlink.load_row(exact[u.name]["replica"].to(self._device(u)).clone())
                continue
            full = torch.zeros(W, n, dtype=self._residual_dtype(u), device=self._device(u))
            for pc in pieces:
                value = sd["worker_mean"][u.name][pc.name]
                value = value.full_tensor() if isinstance(value, DTensor) else value
                padded = torch.zeros(pc.rows * W, *pc.param.shape[1:], dtype=full.dtype, device=full.device)
                padded[:pc.param.shape[0]] = value
                full[:, pc.offset:pc.offset + pc.rows * pc.width] = padded.view(W, -1)
            u.uplink.residual = full
            if isinstance(u.downlink, DeltaAllGather):
                row = torch.zeros(n, dtype=self._row_dtype(u), device=self._device(u))
                for pc in pieces:
                    k = pc.local_rows(rank) * pc.width
                    if k:
                        x = pc.param.to_local().reshape(-1)
                        e = sd["owner_residual"][u.name][pc.name]
                        e = e.to_local() if isinstance(e, DTensor) else e
                        row[pc.offset:pc.offset + k] = x.to(row.dtype) - e.reshape(-1).to(row.dtype)
                u.downlink.load_row(row)

    def _shard_world(self) -> Tuple[int, int]:
        mesh = self.units[0].mesh()
        if mesh is None:
            return dist.get_world_size(), dist.get_rank()
        return mesh.size(), mesh.get_local_rank()

    def _residual_dtype(self, u: _Unit) -> torch.dtype:
        """The dtype of `u`'s worker residual (`CompressedReduceScatter`'s choice where it has none yet)."""
        if u.uplink.residual is not None:
            return u.uplink.residual.dtype
        return self.residual_dtype or residual_dtype_for(u.params[0].dtype)

    @staticmethod
    def _row_dtype(u: _Unit) -> torch.dtype:
        """The dtype of `u`'s replica row (the parameters' as gathered)."""
        mine = getattr(u.downlink, "mine", None)
        return mine.dtype if mine is not None else u.params[0].dtype

    @staticmethod
    def _device(u: _Unit) -> torch.device:
        return u.params[0].device

    def _worker_mean_row(self, u: _Unit, W: int, n: int) -> torch.Tensor:
        """This rank's row of the mean over ranks of the worker residuals (one reduce-scatter)."""
        e = u.uplink.residual
        if e is None:
            e = torch.zeros(W, n, dtype=self._residual_dtype(u), device=self._device(u))
        row = torch.empty(n, dtype=e.dtype, device=e.device)
        dist.reduce_scatter_tensor(row, e.contiguous().view(-1), op=dist.ReduceOp.SUM, group=u.mesh().get_group())
        return row.div_(W)

    def _owner_residual_row(self, u: _Unit, pieces: List[_Piece], rank: int, n: int) -> torch.Tensor:
        """``x - x_hat`` of this rank's row (zero where it has no copy yet)."""
        row = torch.zeros(n, dtype=self._row_dtype(u), device=self._device(u))
        mine = u.downlink.mine
        if mine is None:
            return row
        for pc in pieces:
            k = pc.local_rows(rank) * pc.width
            if k:
                x = pc.param.to_local().reshape(-1).to(mine.dtype)
                row[pc.offset:pc.offset + k] = x - mine[pc.offset:pc.offset + k]
        return row

    @staticmethod
    def _sharded(pc: _Piece, u: _Unit, rank: int, row: Optional[torch.Tensor]) -> DTensor:
        """A DTensor shaped and sharded as parameter `pc` holding its piece of `row` (None: zeros, a template)."""
        p, k = pc.param, pc.local_rows(rank)
        if row is None:
            local = torch.zeros(k, *p.shape[1:], dtype=p.dtype, device=p.device)
        else:
            local = row[pc.offset:pc.offset + k * pc.width].reshape(k, *p.shape[1:]).clone()
        return DTensor.from_local(local, p.device_mesh, [Shard(0)], run_check=False, shape=p.shape,
                                  stride=p.stride())


def _saved_world(checkpoint_id) -> int:
    """The world size a DoubleSqueeze FSDP2 state in a `dcp.save` folder was saved by (from its keys)."""
    from torch.distributed.checkpoint import FileSystemReader
    keys = FileSystemReader(str(checkpoint_id)).read_metadata().state_dict_metadata.keys()
    found = {int(m.group(1)) for k in keys for m in [re.search(r"exact_w(\d+)\.rank", k)] if m}
    if len(found) != 1:
        raise ValueError(f"{checkpoint_id} holds no DoubleSqueeze FSDP2 state (or several): "
                         f"world sizes {sorted(found)}")
    return found.pop()




def install(module: torch.nn.Module, config: Optional[DoubleSqueezeConfig] = None, *,
            monitor: Optional[Monitor] = None, downlink: Union[Downlink, str, None] = None,
            residual_dtype: Optional[torch.dtype] = None, param_compressor: str = "int8",
            replicate_group=None) -> FSDPDoubleSqueezeState:
    """DoubleSqueeze on `module`'s FSDP2 units (call it after the `fully_shard` calls, before training).

    Args:
        module: the model after its `fully_shard` calls: its units are every `FSDPModule` in it (itself included).
        config: a `DoubleSqueezeConfig` (default: ``DoubleSqueezeConfig()``).
        monitor: optional `Monitor` (e.g. `TensorBoardMonitor`).
        downlink: a `Downlink` (or its value); default: ``DELTA`` if no unit reshards after forward, else
            ``QUANTIZED``.
        residual_dtype: dtype of the worker residuals (default: float32 for 16-bit gradients, e.g. a
            `MixedPrecisionPolicy` reducing in bfloat16, else the gradients' reduce dtype). Under HSDP the dtype
            both residuals of the replicas' double pass are stored in (``torch.bfloat16``: half their memory;
            the compensation is still computed in the wider dtype).
        param_compressor: the compressor of ``QUANTIZED`` all-gathers (default ``"int8"``).
        replicate_group: HSDP: the process group of this rank's replicas (the ranks holding the same shard): the
            all-reduce across it becomes the double pass; FSDP's own collectives inside the node stay as they are
            (`downlink` must then be None or ``"dense"``).

    Returns:
        the `FSDPDoubleSqueezeState`.
    """
    config = config or DoubleSqueezeConfig()
    if not isinstance(config, DoubleSqueezeConfig):
        raise TypeError(f"config must be a DoubleSqueezeConfig, got {type(config).__name__}")
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"install expects a torch.nn.Module, got {type(module).__name__}")
    if config.policy:
        raise ValueError("DoubleSqueezeConfig.policy chooses compressors per parameter, and FSDP2 compresses each "
                         "unit's flat gradient as one: not supported under FSDP2 yet; leave the policy out (every unit "
                         "then uses `compressor`)")
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for m in units:
        for p in _managed_params(m):
            if not isinstance(p, DTensor):
                continue
            if p.device_mesh.ndim != 1:
                raise ValueError("native HSDP (a 2-D mesh) is not supported: its replica all-reduce would travel "
                                 "dense; shard on a 1-D mesh")
            if tuple(p.placements) != (Shard(0),):
                raise ValueError(f"parameters must be sharded on dim 0, got {p.placements}")
    if replicate_group is not None:
        if downlink not in (None, Downlink.DENSE, Downlink.DENSE.value):
            raise ValueError("with a replicate_group (HSDP) the double pass runs across replicas: FSDP's own "
                             "collectives inside the node stay dense (downlink None or 'dense')")
        downlink = Downlink.DENSE
    if downlink is None:
        downlink = Downlink.QUANTIZED if any(_reshards_after_forward(m) for m in units) else Downlink.DELTA
    try:
        downlink = Downlink(downlink)
    except ValueError:
        raise ValueError(f"unknown downlink {downlink!r}: one of {[d.value for d in Downlink]}") from None
    if downlink is Downlink.DELTA and not config.server_ef:
        raise ValueError("downlink='delta' needs server_ef=True: without the owner's residual the copies drift")
    if config.guard and replicate_group is None:     # (under HSDP the replicas' collective runs it)
        warnings.warn("the quality guard does not run under FSDP2: units keep their compressor "
                      "(DoubleSqueezeConfig(guard=0) silences this)", UserWarning, stacklevel=2)
    return FSDPDoubleSqueezeState(module, config, downlink, monitor, residual_dtype, param_compressor,
                                  replicate_group)
