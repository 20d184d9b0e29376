"""Assertions shared by the integration tests: the conservation law and agreement between ranks."""
import torch

# The per-tensor policy the integration tests give workload.Roles, and what each parameter gets under it with the
# config's compressor topk:0.1 and min_numel 16 (None: dense; fc.bias: a bias no rule names; head.bias: 5 elements,
# under min_numel)
POLICY = "role:embedding=int8,role:head=topk:0.25,role:norm=dense,fc.weight=sign"
POLICY_SPECS = {"tok.weight": "int8", "ln.weight": None, "ln.bias": None, "fc.weight": "sign",
                "fc.bias": "topk:0.1", "head.weight": "topk:0.25", "head.bias": None}

# what an unknown compressor's error lists: the built-ins, in order
VALID_NAMES = "valid names: bf16, fp16, grouptopk, int2, int4, int8, none, qsgd, randomk, sign, topk"


def assert_conservation(ranks, atol=1e-5, steps=None):
    """sum_t c_t = sum_t mean_i g_i,t - mean_i e_i,T - e_T, parameter by parameter (docs/ARCHITECTURE.md section 1)."""
    w = len(ranks)
    records = ranks[0]["records"]
    steps = range(len(records)) if steps is None else steps
    for name, c0 in records[0]["c"].items():
        applied = sum(records[t]["c"][name] for t in steps)
        true = sum(sum(ranks[r]["records"][t]["g"][name] for r in range(w)) / w for t in steps)
        worker = sum(ranks[r]["worker_residual"].get(name, torch.zeros_like(c0)) for r in range(w)) / w
        server = sum(ranks[r]["server_residual"].get(name, torch.zeros_like(c0)) for r in range(w))
        scale = 1 + max(float(x.abs().max()) for x in (applied, true, worker, server))
        torch.testing.assert_close(applied, true - worker - server, rtol=0, atol=atol * scale,
                                   msg=lambda m: f"conservation broken for {name}: {m}")


def assert_equals_simulator(ranks, config, keys=None, steps=None, rtol=1e-5, atol=1e-6, compressors=None):
    """Every rank's update of every parameter equals the `Simulator`'s on the ranks' recorded gradients, step by
    step, and at the end each rank's worker residual and the sum of the ranks' server residuals equal the
    Simulator's (a rank that reports no residual where the Simulator has one fails). `keys`: {name: the key the
    integration gives the parameter} (its seeds depend on it), default the name; `steps`: how many records;
    `compressors`: the Simulator's (worker, server), e.g. plain-torch references (`tests/reference.py`)."""
    import dsq_plugins as dsq

    w = len(ranks)
    records = ranks[0]["records"]
    steps = len(records) if steps is None else steps
    for name, c0 in records[0]["c"].items():
        sim = dsq.Simulator(w, config, key=name if keys is None else keys[name], compressors=compressors)
        for t in range(steps):
            expected = sim.step([ranks[r]["records"][t]["g"][name].reshape(-1) for r in range(w)])
            for r in range(w):
                torch.testing.assert_close(ranks[r]["records"][t]["c"][name].reshape(-1), expected, rtol=rtol,
                                           atol=atol, equal_nan=True,
                                           msg=lambda m: f"rank {r} step {t} {name}: {m}")
        zero = torch.zeros(c0.numel(), dtype=expected.dtype)
        for r in range(w):
            mine = ranks[r]["worker_residual"].get(name)
            want = sim.worker_errors[r] if sim.worker_errors else zero
            if mine is None:
                assert not torch.count_nonzero(want), f"rank {r} keeps no worker residual of {name}"
            else:
                torch.testing.assert_close(mine.reshape(-1), want, rtol=rtol, atol=atol,
                                           msg=lambda m: f"worker residual of {name} on rank {r}: {m}")
        server = [ranks[r]["server_residual"][name].reshape(-1) for r in range(w) if name in ranks[r]["server_residual"]]
        want = sim.server_error if sim.server_error is not None else zero
        if not server:
            assert not torch.count_nonzero(want), f"no rank keeps a server residual of {name}"
        else:
            torch.testing.assert_close(sum(server), want, rtol=rtol, atol=atol,
                                       msg=lambda m: f"server residual of {name}: {m}")


def assert_same_update_everywhere(ranks):
    for t, rec in enumerate(ranks[0]["records"]):
        for r in ranks[1:]:
            for name, c in rec["c"].items():
                assert torch.equal(c, r["records"][t]["c"][name]), f"ranks disagree on {name} at step {t}"


def residuals_by_name(collective, named_numels):
    """({name: worker residual}, {name: server residual, this rank's owned blocks in place, zero elsewhere}) of a
    `DoubleSqueezeCollective` whose tensors are keyed by parameter name; `named_numels` is [(name, numel)]."""
    worker, server = collective.worker_residuals(), collective.server_residuals()
    w, s = {}, {}
    for name, numel in named_numels:
        if name in worker:
            w[name] = worker[name].detach().cpu().clone()
        if name in server:
            s[name] = collective.expand_server_residual(name, server[name], numel).cpu()
    return w, s


def shut_down_and_exit() -> None:
    """End a torch.distributed test worker: a barrier (no rank tears down its Gloo pairs while another is still
    using them), destroy the process group, then leave without interpreter finalisation. Gloo's threads can
    abort the process there ("terminate called without an active exception", SIGABRT; seen once in a few
    hundred runs, see pytorch/pytorch#179291), after every result has been written."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def assert_policy_equals_simulator(ranks, keys=None, block_size=256, **tol):
    """Under `POLICY` on workload.Roles, every parameter equals a Simulator run with the compressor its rule names
    (plain-torch references for sign and top-k, `tests/reference.py`), residuals included; a dense one the plain
    mean, with no worker residual kept. `keys`: {name: the integration's key}, default the name."""
    import dsq_plugins as dsq
    try:
        from .reference import reference
    except ImportError:                 # imported as a top-level module by a worker
        from reference import reference

    base = dict(block_size=block_size, min_numel=16, guard=0.0)
    for name, spec in POLICY_SPECS.items():
        sub = [{"records": [{"g": {name: rec["g"][name]}, "c": {name: rec["c"][name]}} for rec in r["records"]],
                "worker_residual": {k: v for k, v in r["worker_residual"].items() if k == name},
                "server_residual": {k: v for k, v in r["server_residual"].items() if k == name}} for r in ranks]
        key = None if keys is None else {name: keys[name]}
        if spec is None:
            assert_equals_simulator(sub, dsq.DoubleSqueezeConfig(compressor="topk:0.1", **dict(base, min_numel=10**9)),
                                    keys=key, **tol)
            assert all(not torch.count_nonzero(r["worker_residual"].get(name, torch.zeros(1))) for r in ranks), name
            continue
        compressors = reference(spec) if spec.split(":")[0] in ("sign", "topk") else None
        assert_equals_simulator(sub, dsq.DoubleSqueezeConfig(compressor=spec, **base), keys=key,
                                compressors=compressors, **tol)


def run_cases(make_parser, body, rank) -> None:
    """A worker's main: parse the command line (`make_parser()`, with an ``out`` positional) and run `body(args)`,
    or, with ``--cases '{"name": [more arguments], ...}'``, run `body` once per case with the command line's
    arguments plus the case's, writing to OUT/name: one launch (one start-up of Python, torch and the framework in
    every process, one rendezvous) for many runs on the same process group. A case that raises leaves
    OUT/name/failed{rank}.txt with the error and its traceback, and the next case runs. `rank()` is this process's
    rank, asked after `body` has initialised the framework."""
    import json
    import os
    import sys
    import traceback
    from pathlib import Path

    ap = make_parser()
    ap.add_argument("--cases", default=None, help='JSON {"name": [more arguments]}: one run per case, in OUT/name')
    args = ap.parse_args()
    if args.cases is None:
        body(args)
        return
    common = list(sys.argv[1:])
    common.remove(args.out)
    for name, more in json.loads(args.cases).items():
        case = ap.parse_args([str(Path(args.out) / name), *common, *more])
        try:
            body(case)
        except Exception as e:          # recorded for the test; the next case builds its own model and state
            out = Path(case.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"failed{rank()}.txt").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
            sys.stderr.write(f"case {name} failed: {type(e).__name__}: {e}\n")
