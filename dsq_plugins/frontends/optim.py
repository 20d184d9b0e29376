"""`DoubleSqueezeAdamW`: AdamW whose communication is DoubleSqueeze on the momentum (1-bit Adam's construction,
generalised to any compressor and to both residuals).

Why an optimizer: Adam divides every coordinate by its own running RMS, so it amplifies the compression error of
small coordinates, and the noise error feedback moves between steps inflates its second moment. On a transformer
language model (docs/RESULTS.md section 7) a 1- or 2-bit gradient under AdamW trails dense by 5-40% however the
scales are cut, while a linear optimizer turns error feedback's delay into nothing lost. So, as in 1-bit Adam
(Tang et al., 2021): Adam's variance is learnt during a warm-up, then frozen, and from then on the optimizer is
linear in what crosses the wire, which is the momentum:

    warm-up (step < warmup_steps): AdamW on gradients averaged by DoubleSqueeze with `warmup_config`
        (default ``int4:128``: 4.7 bits per element, as accurate as dense for Adam's variance)
    freeze: d = sqrt(v_hat) + eps, per coordinate, the same on every rank
    then, every step but the refreshes, rank i:
        w_i = beta1 * m + (1 - beta1) * g_i / d         the momentum, whitened by the frozen denominator
            (at the first of these steps after the warm-up or a refresh, g_i also carries what the warm-up
            collective's residuals held: e_i, and W e on the blocks rank i owns, so that nothing its compressor
            dropped is lost)
        m   = DoubleSqueeze(w_i)                         compressed with `config` (default ``sign``), both residuals
        x  <- x * (1 - lr * weight_decay) - lr * m / (1 - beta1^t)
    every `variance_refresh` steps after the freeze (0/1 Adam's remedy for a variance frozen before it settled;
    0, the default: never, as in 1-bit Adam), an AdamW step on the gradient averaged as in the warm-up, its
    variance updated as if by the k = `variance_refresh` steps since the last update:
        v <- beta2^k v + (1 - beta2^k) g^2,    d' = sqrt(v / (1 - beta2^t)) + eps
        m <- (beta1 m d + (1 - beta1) g) / d'  (the whitened momentum, and the momentum's residuals (times d/d'),
                                                 re-expressed in the new whitening: what they hold keeps its value)
        x  <- x * (1 - lr * weight_decay) - lr * m / (1 - beta1^t)
    (v is not kept between refreshes: it is rebuilt from d, v = (d - eps)^2 (1 - beta2^(t - k)), so the state is
    1-bit Adam's.) A refresh sends the warm-up's bytes instead of the momentum's.

Whitening makes every coordinate of the compressed vector comparable (a scaled sign over a block then contracts as
on Gaussian data), and the update, ``m`` itself, is what the conservation law counts:
``sum_t m_t = sum_t mean_i w_i,t - mean_i e_i,T - e_T`` in the whitened space (`collective`).

Where it runs: with `torch.distributed` (gloo, NCCL) on any launcher; pass the DDP-wrapped model as `ddp` and the
optimizer takes over DDP's gradient communication (a hook that averages with DoubleSqueeze during warm-up and
leaves gradients local afterwards, when the momentum is what travels); without DDP it averages the gradients
itself. Horovod: pass ``communicator=horovod_ext.communicator.HorovodCommunicator()`` and a plain (not
`hvd.DistributedOptimizer`) model. DeepSpeed ZeRO stage 0: pass it as `deepspeed.initialize`'s `optimizer`;
`deepspeed_ext` binds it to the engine's data-parallel group and turns the engine's own gradient all-reduce off
(`engine.enable_backward_allreduce`), so this optimizer moves every byte (`deepspeed_ext/adamw.py`).

Every rank checkpoints its own `state_dict()` (the residuals differ by rank); `load_resharded` resumes from
every rank's on any number of ranks.
"""
import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..engine.collective import DoubleSqueezeCollective
from ..engine.communicator import Communicator, TorchDistributedCommunicator
from ..engine.pipeline import plan_buckets
from ..engine.reshard import reshard_state_dicts
from ..engine.policy import TensorInfo, infer_roles, roles_from_shape, unwrap
from ..config import DoubleSqueezeConfig
from ..monitoring.monitor import Monitor

__all__ = ["DoubleSqueezeAdamW"]

_FORMAT = "dsq-adamw-1"


class DoubleSqueezeAdamW(torch.optim.Optimizer):
    """AdamW with DoubleSqueeze-compressed momentum after a variance warm-up (module docstring).

    Args:
        params: parameters (or parameter groups, with their own lr / weight_decay).
        lr, betas, eps, weight_decay: as `torch.optim.AdamW`.
        warmup_steps: steps of AdamW on averaged gradients before the variance freezes (1-bit Adam advises 15-25%
            of training; too short a warm-up freezes a variance that has not settled).
        config: the DoubleSqueeze config of the momentum (default: ``sign`` on both passes, both residuals,
            the quality guard off: the whitened momentum is what sign contracts on).
        warmup_config: the config of the warm-up's gradients (default ``int4:128``), and of the refreshes'.
        variance_refresh: steps between refreshes of the frozen variance (module docstring); 0: never.
        ddp: the `DistributedDataParallel` model whose gradients this optimizer averages (its comm hook is
            replaced; every parameter of the optimizer must be one of its). None: the optimizer averages them
            itself.
        process_group: the group to average over (default: the world), or
        communicator: any `Communicator` (Horovod's), instead of a process group.
        monitor: optional `Monitor` for both collectives' metrics (``dsq/`` during warm-up, ``dsq/momentum/``
            after).
        module: the model, to name the parameters for the configs' `policy` (name patterns, roles embedding and
            head) and in warnings; default: `ddp`'s module, else none (the policy then knows parameters by shape).
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, *, warmup_steps: int = 1000, variance_refresh: int = 0,
                 config: Optional[DoubleSqueezeConfig] = None, warmup_config: Optional[DoubleSqueezeConfig] = None,
                 ddp=None, process_group=None, communicator: Optional[Communicator] = None,
                 monitor: Optional[Monitor] = None, module: Optional[torch.nn.Module] = None):
        if not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas!r}: each in [0, 1)")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an integer >= 1 (Adam's variance is learnt then frozen), "
                             f"got {warmup_steps!r}")
        if isinstance(variance_refresh, bool) or not isinstance(variance_refresh, int) or variance_refresh < 0:
            raise ValueError(f"variance_refresh must be an integer >= 0 (steps between refreshes of the frozen "
                             f"variance; 0: never), got {variance_refresh!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.config = config or DoubleSqueezeConfig(compressor="sign", guard=0.0)
        self.warmup_config = warmup_config or DoubleSqueezeConfig(compressor="int4:128")
        for name, c in (("config", self.config), ("warmup_config", self.warmup_config)):
            if not isinstance(c, DoubleSqueezeConfig):
                raise TypeError(f"{name} must be a DoubleSqueezeConfig, got {type(c).__name__}")
            if c.auto:
                raise ValueError(f"{name}: compressor='auto' is for gradient hooks; name a compressor here")
        self.warmup_steps = warmup_steps
        self.variance_refresh = variance_refresh
        self.monitor = monitor
        self.steps = 0
        self._process_group, self._communicator = process_group, communicator
        self.grads: Optional[DoubleSqueezeCollective] = None        # the warm-up's gradient collective
        self.momentum: Optional[DoubleSqueezeCollective] = None
        self._ddp_state = None
        self._pending_sd: Optional[dict] = None
        self._module, self._named = None, {}
        self._name_from(module if module is not None else ddp)
        if ddp is not None:
            self._attach(ddp)

    # -- communication --------------------------------------------------------------------------------------
    def bind(self, communicator: Communicator, module: Optional[torch.nn.Module] = None) -> None:
        """Communicate through `communicator` (and name parameters from `module`), for a framework that builds
        the process group after the optimizer (DeepSpeed's engine). Before the first step only."""
        if self.momentum is not None or self._ddp_state is not None:
            raise RuntimeError("DoubleSqueezeAdamW.bind: the optimizer already communicates (a first step was "
                               "taken, or it was given ddp=)")
        self._communicator = communicator
        self._name_from(module)

    def _name_from(self, module: Optional[torch.nn.Module]) -> None:
        """Name the parameters (and their roles) from `module`, if one is given."""
        if module is not None:
            self._module = module
            self._named = {id(p): (n, r) for n, (p, r) in infer_roles(unwrap(module)).items()}

    @property
    def frozen(self) -> bool:
        """Whether the variance is frozen and the momentum is what travels."""
        return self.steps >= self.warmup_steps

    @property
    def refreshing(self) -> bool:
        """Whether the step being taken (the next `step()`) refreshes the frozen variance: its gradients are
        averaged as in the warm-up."""
        return self._refreshes_at(self.steps + 1)

    def _refreshes_at(self, t: int) -> bool:
        """Whether step number `t` (from 1) refreshes the frozen variance."""
        r = self.variance_refresh
        return r > 0 and t > self.warmup_steps and (t - self.warmup_steps) % r == 0

    def _comm(self) -> Communicator:
        if self._communicator is None:
            if not dist.is_initialized():
                raise RuntimeError("DoubleSqueezeAdamW needs torch.distributed initialised (or a communicator)")
            self._communicator = TorchDistributedCommunicator(self._process_group)
        return self._communicator

    def _collectives(self) -> None:
        if self.momentum is not None:
            return
        mon = self.monitor
        self.momentum = DoubleSqueezeCollective(self.config, self._comm(), _Prefixed(mon, "momentum/") if mon
                                                else None, key_names=self._describe, tensor_info=self._tensor_info)
        if self._ddp_state is None:
            self.grads = DoubleSqueezeCollective(self.warmup_config, self._comm(), mon, key_names=self._describe,
                                                 tensor_info=self._tensor_info)
        infos = [self._tensor_info(n) for n in range(len(self._params()))]
        for c in (self.momentum, self.grads if self._ddp_state is None else None):
            if c is not None:
                c.policy.check(infos, complete=bool(self._named))
        if self._pending_sd is not None:
            sd, self._pending_sd = self._pending_sd, None
            self._load_collectives(sd)

    def attach_ddp(self, ddp) -> None:
        """Take over the gradient communication of `ddp` (a `DistributedDataParallel` model over this optimizer's
        parameters), as ``ddp=`` does, for a framework that wraps the model after the optimizer is built (the
        Hugging Face Trainer: `DoubleSqueezeCallback` calls it). Before the first step and backward only."""
        if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            raise TypeError(f"attach_ddp takes the DistributedDataParallel model, got {type(ddp).__name__}")
        if self._ddp_state is not None:
            raise RuntimeError("DoubleSqueezeAdamW.attach_ddp: already attached to a DDP model (ddp= or attach_ddp)")
        if self.momentum is not None or self._communicator is not None:
            raise RuntimeError("DoubleSqueezeAdamW.attach_ddp: the optimizer already communicates by itself (a step "
                               "was taken, a state loaded with load_resharded, or a communicator given): attach "
                               "first, then load")
        if self._module is None:
            self._name_from(ddp)
        self._attach(ddp)
        pending = self._pending_sd
        if pending is not None and pending.get("grads") is not None:
            # a state loaded before: its warm-up residuals go to DDP's hook now, before the first backward uses it
            self._ddp_state.load_state_dict(pending["grads"])
            self._pending_sd = dict(pending, grads=None)

    def _attach(self, ddp) -> None:
        """Take over `ddp`'s gradient communication: DoubleSqueeze during warm-up and refreshes, nothing else."""
        from .ddp_hook import DoubleSqueezeState, doublesqueeze_hook
        in_ddp = {id(p) for p in ddp.parameters()}
        outside = sum(1 for p in self._params() if id(p) not in in_ddp)
        if outside:
            raise ValueError(f"{outside} of this optimizer's parameters are not the DDP model's: DDP would never "
                             f"average their gradients, and the ranks would drift apart; give the optimizer the "
                             f"DDP model's parameters (or leave ddp out: the optimizer then averages them itself)")
        self._ddp_state = DoubleSqueezeState(self.warmup_config, process_group=self._process_group,
                                             monitor=self.monitor, module=self._module)
        self.grads = self._ddp_state
        opt = self

        def hook(state, bucket):
            if opt.frozen and not opt.refreshing:
                fut = torch.futures.Future()
                fut.set_result(bucket.buffer())      # the local gradient: the momentum travels in step()
                return fut
            return doublesqueeze_hook(state, bucket)
        ddp.register_comm_hook(self._ddp_state, hook)

    def _params(self):
        return [p for g in self.param_groups for p in g["params"]]

    def _tensor_info(self, key) -> Optional[TensorInfo]:
        """What a policy knows of parameter number `key`: name and roles from the model, else its shape."""
        params = self._params()
        if not isinstance(key, int) or key >= len(params):
            return None
        p = params[key]
        named = self._named.get(id(p))
        if named is not None:
            return TensorInfo(named[0], tuple(p.shape), named[1])
        return TensorInfo(None, tuple(p.shape), roles_from_shape(p.shape), named=False)

    def _describe(self, key) -> str:
        info = self._tensor_info(key)
        return info.name if info is not None and info.name else str(key)

    # -- the step -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._collectives()
        if not self.frozen:
            self._warmup_step()
        elif self.refreshing:
            self._refresh_step()
        else:
            self._momentum_step()
        self.steps += 1
        return loss

    def _items(self, tensors):
        return [(n, t.reshape(-1)) for n, t in tensors]

    def _average_gradients(self) -> bool:
        """Average the gradients with the warm-up's collective (DDP's hook has, if there is one); whether they
        are all finite (DoubleSqueeze makes a skipped bucket all-NaN on every rank: the step is then skipped)."""
        params = [(n, p) for n, p in enumerate(self._params()) if p.grad is not None]
        if self._ddp_state is None and params:       # no DDP: average the gradients here
            named = [(n, p.grad) for n, p in params]
            for bucket in plan_buckets(named, self.warmup_config.bucket_mb):
                group = [named[i] for i in bucket]
                self.grads.reduce(self._items(group), outs=[g.reshape(-1) for _, g in group])
            self.grads.finish_step()
        grads = [p.grad for _, p in params]
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True

    def _warmup_step(self) -> None:
        ok = self._average_gradients()
        t = self.steps + 1
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not ok:
                    continue
                g = p.grad
                st["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (st["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))
        if t == self.warmup_steps:            # freeze: the whitened momentum travels from the next step on
            for group in self.param_groups:
                beta2 = group["betas"][1]
                for p in group["params"]:
                    st = self.state.get(p)
                    if st and "exp_avg_sq" in st:
                        st["denom"] = (st.pop("exp_avg_sq") / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                        st["exp_avg"].div_(st["denom"])

    def _refresh_step(self) -> None:
        """A refresh of the frozen variance (module docstring): skipped, as a warm-up step, on a NaN or Inf."""
        if not self._average_gradients():
            return
        t, k = self.steps + 1, self.variance_refresh
        for n, p in enumerate(self._params()):
            st = self.state.get(p)
            if not st or "denom" not in st or p.grad is None:
                continue
            grp = self._group_of(p)
            beta1, beta2 = grp["betas"]
            g, d = p.grad, st["denom"]
            v = (d - grp["eps"]).square_().mul_(1 - beta2 ** (t - k))       # what d was made of
            v.mul_(beta2 ** k).addcmul_(g, g, value=1 - beta2 ** k)
            new = v.div_(1 - beta2 ** t).sqrt_().add_(grp["eps"])
            ratio = d / new
            st["exp_avg"].mul_(ratio).mul_(beta1).addcdiv_(g, new, value=1 - beta1)
            self.momentum.rescale(n, ratio.reshape(-1))
            st["denom"] = new
            p.mul_(1 - grp["lr"] * grp["weight_decay"])
            p.add_(st["exp_avg"], alpha=-grp["lr"] / (1 - beta1 ** t))

    def _warmup_key(self, n: int, p) -> Optional[int]:
        """The key of parameter number `n` in the warm-up's collective (DDP's state numbers them as its hook
        first saw them; None if it never did)."""
        return self._ddp_state.number_of(p) if self._ddp_state is not None else n

    def _momentum_step(self) -> None:
        t = self.steps + 1
        whitened, entries, flushed = [], [], []
        warm = getattr(self.grads, "collective", self.grads)
        first = t == self.warmup_steps + 1
        if (first or self._refreshes_at(t - 1)) and warm is not None and hasattr(self.grads, "drain"):
            self.grads.drain()
        for n, p in enumerate(self._params()):
            st = self.state.get(p)
            if not st or "denom" not in st:
                continue                     # never had a gradient during warm-up: stays where it is
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            key = self._warmup_key(n, p) if warm is not None else None
            if key is not None and warm.holds(key):     # what the warm-up's residuals hold joins the momentum
                g = g.clone()
                taken = warm.flush_into(key, g.view(-1))
                if taken is not None:
                    flushed.append((key, *taken))
            beta1 = self._group_of(p)["betas"][0]
            w = st["exp_avg"] * beta1 + (g / st["denom"]) * (1 - beta1)
            whitened.append((n, w.reshape(-1)))
            entries.append(p)
        if first and warm is not None and (warm.worker_residuals() or warm.server_residuals()):
            # a DDP run resumed from a checkpoint saved at the freeze: its hook never numbered the parameters
            warnings.warn("DoubleSqueezeAdamW: residuals of the warm-up, saved at the freeze, cannot be matched to "
                          "parameters in this run and are not delivered", stacklevel=3)
        if not whitened:
            return
        outs = {}
        for bucket in plan_buckets(whitened, self.config.bucket_mb):
            for i, m in zip(bucket, self.momentum.reduce([whitened[i] for i in bucket])):
                outs[whitened[i][0]] = (entries[i], m)
        self.momentum.finish_step()
        ok = torch.stack([torch.isfinite(m).all() for _, m in outs.values()]).all()
        if flushed and not bool(ok):         # a skipped step delivers nothing: the warm-up's residuals stay held
            for taken in flushed:
                warm.hold_again(*taken)
        for p, m in outs.values():
            grp = self._group_of(p)
            beta1 = grp["betas"][0]
            st = self.state[p]
            st["exp_avg"].copy_(torch.where(ok, m.view_as(p), st["exp_avg"]))
            step = st["exp_avg"] * (-grp["lr"] / (1 - beta1 ** t)) - p * (grp["lr"] * grp["weight_decay"])
            p.add_(torch.where(ok, step, torch.zeros_like(step)))

    def _group_of(self, p):
        if not hasattr(self, "_groups") or len(self._groups) != sum(len(g["params"]) for g in self.param_groups):
            self._groups = {id(q): g for g in self.param_groups for q in g["params"]}
        return self._groups[id(p)]

    # -- counters and checkpoints ----------------------------------------------------------------------------
    def bytes_sent(self) -> int:
        """Bytes this rank has sent, both collectives together (warm-up gradients, then momentum)."""
        total = 0
        for c in (self.grads, self.momentum):
            if c is not None and c.bound:
                if hasattr(c, "drain"):
                    c.drain()
                total += c.totals.bytes_sent
        return total

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["doublesqueeze"] = dict(format=_FORMAT, steps=self.steps, warmup_steps=self.warmup_steps,
                                   grads=None if self.grads is None or not self.grads.bound
                                   else self.grads.state_dict(),
                                   momentum=None if self.momentum is None else self.momentum.state_dict())
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("doublesqueeze", None)
        if ours is None or ours.get("format") != _FORMAT:
            raise ValueError("not a DoubleSqueezeAdamW.state_dict() of this version (no 'doublesqueeze' entry of "
                             f"format {_FORMAT!r})")
        if ours["warmup_steps"] != self.warmup_steps:
            raise ValueError(f"cannot resume: the state was saved with warmup_steps={ours['warmup_steps']}, "
                             f"this optimizer has {self.warmup_steps}")
        super().load_state_dict(state_dict)
        self.steps = ours["steps"]
        if self._ddp_state is not None and ours.get("grads") is not None:
            # now, not at the first step(): DDP's hook reduces with it in the backward before that step
            self._ddp_state.load_state_dict(ours["grads"])
            ours = dict(ours, grads=None)
        if self.momentum is None:
            self._pending_sd = ours
        else:
            self._load_collectives(ours)

    def load_resharded(self, state_dicts: Sequence[dict]) -> None:
        """Resume from the `state_dict()` of every rank of a run on any number of ranks (call it on every rank,
        once the process group exists or the communicator is bound). On as many ranks, this rank's own state,
        exactly. Else the residuals are redistributed with their mass kept (`dsq_plugins.engine.reshard`): in
        both collectives, every rank's worker residual is the saved ranks' mean, and each block's server residual
        goes to its new owner. AdamW's state (the momentum, the frozen denominators) is the same on every rank
        (the momentum is the exchange's result, the variance comes from averaged gradients), so rank 0's is
        taken."""
        saved = [dict(sd) for sd in state_dicts]
        ours = [sd.pop("doublesqueeze", None) for sd in saved]
        if not saved or any(o is None or o.get("format") != _FORMAT for o in ours):
            raise ValueError("load_resharded takes every rank's DoubleSqueezeAdamW.state_dict() of this version "
                             f"(format {_FORMAT!r})")
        if len({(o["steps"], o["warmup_steps"]) for o in ours}) != 1:
            raise ValueError("the saved ranks' states are at different steps or warm-ups: not one run's")
        if ours[0]["warmup_steps"] != self.warmup_steps:
            raise ValueError(f"cannot resume: the state was saved with warmup_steps={ours[0]['warmup_steps']}, "
                             f"this optimizer has {self.warmup_steps}")
        comm = self._comm()
        world, rank = comm.size, comm.rank
        merged = dict(ours[0])                 # built and checked before anything here changes
        for part in ("momentum", "grads"):
            parts = [o.get(part) for o in ours]
            if all(p is None for p in parts):
                merged[part] = None
            elif any(p is None for p in parts):
                raise ValueError(f"some saved ranks have no {part} state: not one run's")
            elif part == "grads" and (self._ddp_state is not None) != all(p.get("format") for p in parts):
                raise ValueError("the saved warm-up state and this optimizer disagree on DDP (one went through a "
                                 "DDP hook, the other not): resume it the way it was saved (ddp= / attach_ddp)")
            elif part == "grads" and self._ddp_state is not None:
                merged[part] = parts               # DDP's state reshards them itself
            else:
                merged[part] = reshard_state_dicts(parts, world, rank)
        self._pending_sd = None             # replaced (the HF Trainer loads rank 0's optimizer.pt on every rank first)
        self._collectives()
        if self._ddp_state is not None and merged["grads"] is not None:
            self._ddp_state.load_resharded(merged.pop("grads"))
            merged["grads"] = None
        self.load_state_dict(dict(saved[0], doublesqueeze=merged))

    def _load_collectives(self, ours: dict) -> None:
        if ours.get("momentum") is not None:
            self.momentum.load_state_dict(ours["momentum"])
        if ours.get("grads") is not None and self.grads is not None:
            self.grads.load_state_dict(ours["grads"])


class _Prefixed(Monitor):
    """A monitor that writes another's tags under an extra prefix."""

    def __init__(self, inner: Monitor, extra: str):
        super().__init__(inner.every, inner.prefix + extra)
        self.inner = inner

    def log_scalar(self, tag, value, step):
        self.inner.log_scalar(tag, value, step)
