"""One rank of a DoubleSqueeze FSDP2 run on a model whose gradients are known in closed form, for
test_fsdp.py's plain-torch reference: every parameter p adds ``0.5 * A * |p|^2 + <p, c>`` to the loss, so its
gradient is ``A * p_used + c`` where p_used is what the forward computed with and c is drawn per (rank, step,
parameter). Writes OUT/rank{r}.pt: per step the full parameters, the worker residuals, the replicas, the totals.

    torchrun --nproc-per-node 2 tests/fsdp_worker.py OUT --runs delta quantized+reshard --steps 4 [--save-at 2]
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import dsq_plugins as dsq
import dsq_plugins.fsdp as dsq_fsdp

A = 0.5
LR = 0.1
SHAPES = {"a.w": (13, 3), "a.b": (5,), "b.w": (9, 4), "own": (7,)}
BIG = {"a.w": (512, 256), "a.b": (512,), "b.w": (256, 512), "own": (1000,)}      # --big: for the kernel's bytes


def net_bytes() -> int:
    """Bytes the loopback has carried in this network namespace (sent; each is also received)."""
    for line in Path("/proc/self/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            return int(rest.split()[8])
    return 0


def coefficients(rank: int, step: int, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + 10 * step + sorted(SHAPES).index(name))
    return torch.randn(SHAPES[name], generator=g)


def initial(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(77 + sorted(SHAPES).index(name))
    return torch.randn(SHAPES[name], generator=g)


def term(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """One parameter's part of the loss (its gradient: ``A * p + c``, in the dtype the forward computes in)."""
    return 0.5 * A * (p * p).sum() + (p * c).sum()


class Leaf(nn.Module):
    def __init__(self, prefix, names):
        super().__init__()
        self.names = [f"{prefix}.{n}" for n in names]
        for n, full in zip(names, self.names):
            setattr(self, n, nn.Parameter(initial(full)))

    def forward(self, cs):
        out = 0
        for full in self.names:
            out = out + term(getattr(self, full.split(".")[1]), cs[full])
        return out


class Root(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Leaf("a", ["w", "b"])
        self.b = Leaf("b", ["w"])
        self.own = nn.Parameter(initial("own"))

    def forward(self, cs):
        return self.a(cs) + self.b(cs) + term(self.own, cs["own"])


def refusals(out: Path) -> None:
    """What install refuses, before training, with the message each gives: {case: message}."""
    from torch.distributed.device_mesh import init_device_mesh
    found = {}

    def attempt(case, fn):
        try:
            fn()
            found[case] = None
        except (ValueError, TypeError) as exc:
            found[case] = str(exc)

    def sharded(**kw):
        m = Root()
        for unit in (m.a, m.b, m):
            fully_shard(unit, **kw)
        return m
    quiet = dict(guard=0.0)
    attempt("not sharded", lambda: dsq_fsdp.install(Root(), dsq.DoubleSqueezeConfig(**quiet)))
    attempt("unknown downlink", lambda: dsq_fsdp.install(sharded(), dsq.DoubleSqueezeConfig(**quiet),
                                                         downlink="sparse"))
    attempt("delta without server_ef", lambda: dsq_fsdp.install(
        sharded(), dsq.DoubleSqueezeConfig(server_ef=False, **quiet), downlink="delta"))
    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("replicate", "shard"))
    attempt("native HSDP", lambda: dsq_fsdp.install(sharded(mesh=mesh), dsq.DoubleSqueezeConfig(**quiet)))
    attempt("policy", lambda: dsq_fsdp.install(sharded(), dsq.DoubleSqueezeConfig(policy={"role:norm": "dense"},
                                                                                 **quiet)))
    attempt("plain config", lambda: dsq_fsdp.install(sharded(), dsq.DoubleSqueezeConfig(**quiet)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "refusals.json").write_text(__import__("json").dumps(found))


def run(args, token: str, out: Path) -> None:
    """One run: `token` is the downlink ('delta', 'quantized', 'dense'; 'off': plain FSDP2; 'hsdp') with options
    '+reshard' (reshard_after_forward=True), '+nanT' (rank 1 gets a NaN gradient in unit a at step T) and '+dcp'
    (save and resume with torch.distributed.checkpoint, as --dcp), '+stepsN' (N steps instead of --steps),
    '+bf16' (`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=bfloat16)`: float32 shards, their gathers
    and gradient reductions in bfloat16), '+bf16res' (residuals kept in bfloat16, `residual_dtype`), '+auto'
    (compressor="auto" with --compressor as its one candidate); 'auto' and 'autoq' are 'delta' and 'quantized' under compressor="auto" with --compressor as its one candidate."""
    downlink, *opts = token.split("+")
    reshard = "reshard" in opts
    nan_step = next((int(o[3:]) for o in opts if o.startswith("nan")), -1)
    use_dcp = args.dcp or "dcp" in opts
    steps = next((int(o[5:]) for o in opts if o.startswith("steps")), args.steps)
    rank = dist.get_rank()
    model = Root()
    mesh = replicate = None
    if downlink == "hsdp":
        from torch.distributed.device_mesh import init_device_mesh
        both = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
        mesh, replicate = both["shard"], both["replicate"].get_group()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if "bf16" in opts \
        else MixedPrecisionPolicy()
    for unit in (model.a, model.b, model):
        fully_shard(unit, reshard_after_forward=reshard, mesh=mesh, mp_policy=mp)
    compressor = "auto" if downlink.startswith("auto") or "auto" in opts else args.compressor
    config = dsq.DoubleSqueezeConfig(compressor=compressor, block_size=16, min_numel=0, guard=0.0,
                                     candidates=args.compressor if compressor == "auto" else None)
    downlink = {"auto": "delta", "autoq": "quantized"}.get(downlink, downlink)
    state = None
    if downlink == "hsdp":
        state = dsq_fsdp.install(model, config, replicate_group=replicate,
                                 residual_dtype=torch.bfloat16 if "bf16res" in opts else None)
    elif downlink != "off":
        state = dsq_fsdp.install(model, config, downlink=downlink)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    start, loaded = 0, None
    if args.resume and use_dcp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
        path = Path(args.resume) / token / "dcp"
        model_sd, optim_sd = get_state_dict(model, opt)
        dsq_sd = state.checkpoint_state(checkpoint_id=path)
        extra = {"step": 0}
        dcp.load({"model": model_sd, "optim": optim_sd, "dsq": dsq_sd, "extra": extra}, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
        state.load_checkpoint_state(dsq_sd)
        start = extra["step"]
        loaded = {"worker": {k: v.clone() for k, v in state.worker_residuals().items()},
                  "mine": {u.name: u.downlink.mine.clone() for u in state.units if u.downlink is not None}}
    elif args.resume:
        ck = torch.load(Path(args.resume) / token / f"ck{rank}.pt", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        state.load_state_dict(ck["dsq"])
        start = ck["step"]
    out.mkdir(parents=True, exist_ok=True)
    records, wire = [], []
    dist.barrier()
    wire.append(net_bytes())
    for t in range(start, steps):
        cs = {n: coefficients(rank, t, n) for n in SHAPES}
        if t == nan_step and rank == 1:
            cs["a.w"][0, 0] = float("nan")
        loss = model(cs)
        loss.backward()
        finite = {n: bool(torch.isfinite(p.grad.to_local()).all()) for n, p in model.named_parameters()}
        flag = torch.tensor([float(all(finite.values()))])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 1.0:            # a gradient scaler's decision: skip the step where a gradient is not finite
            opt.step()
        opt.zero_grad()
        wire.append(net_bytes())
        if args.big:
            continue
        full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        records.append({"step": t, "params": full, "finite": finite,
                        "worker": {k: v.clone() for k, v in state.worker_residuals().items()},
                        "server": {k: v.clone() for k, v in state.server_residuals().items()},
                        "replicas": {k: v.clone() for k, v in state.replicas().items()},
                        "totals": state.totals.as_dict(), "dsq_step": state.step,
                        "specs": {u.name: u.last_spec for u in state.units},
                        "skipped_steps": state.skipped_steps})
        if t + 1 == args.save_at:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "dsq": state.state_dict(),
                        "step": t + 1}, out / f"ck{rank}.pt")
            if use_dcp:
                import torch.distributed.checkpoint as dcp
                from torch.distributed.checkpoint.state_dict import get_state_dict
                model_sd, optim_sd = get_state_dict(model, opt)
                dcp.save({"model": model_sd, "optim": optim_sd, "dsq": state.checkpoint_state(),
                          "extra": {"step": t + 1}}, checkpoint_id=out / "dcp")
    torch.save({"records": records, "wire": wire, "world": dist.get_world_size(), "loaded": loaded,
                "memory": state.memory_report() if state else None,
                "totals": state.totals.as_dict() if state else None},
               out / f"rank{rank}.pt")
    dist.barrier()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--runs", nargs="+", default=["delta"],
                    help="runs one after the other, each into OUT/RUN/ (see `run`), or 'refusals'")
    ap.add_argument("--compressor", default="sign")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--save-at", type=int, default=-1)
    ap.add_argument("--resume", default=None, help="the OUT of a run saved with --save-at")
    ap.add_argument("--big", action="store_true", help="larger tensors, for the kernel's byte counts")
    ap.add_argument("--dcp", action="store_true", help="also save (or resume) with torch.distributed.checkpoint")
    args = ap.parse_args()
    if args.big:
        SHAPES.update(BIG)
    dist.init_process_group("gloo")
    for token in args.runs:
        if token == "refusals":
            refusals(Path(args.out))
        else:
            run(args, token, Path(args.out) / token)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
