"""DoubleSqueeze under FSDP2 (`dsq_plugins.fsdp`), for real: `fully_shard` units on 2 gloo ranks under torchrun,
checked step by step against a plain-torch model of the algorithm (tests/reference.py's block compressors, none
of the library's code) on a model whose gradients are known in closed form (tests/fsdp_worker.py)."""
import math

import pytest
import torch

from .conftest import ROOT, launch, load_ranks
from .fsdp_worker import A, LR, SHAPES, coefficients, initial, term
from .reference import sign

UNITS = {"<root>": ["own"], "a": ["a.w", "a.b"], "b": ["b.w"]}
BLOCK = 16
W = 2


def to_rows(tensors, world=W):
    """FSDP2's rank-major layout of a unit: each tensor padded on dim 0 to a multiple of W, row r = every
    tensor's r-th chunk, flattened and concatenated."""
    rows = [[] for _ in range(world)]
    for t in tensors:
        d0 = t.shape[0]
        padded = torch.zeros((math.ceil(d0 / world) * world, *t.shape[1:]))
        padded[:d0] = t
        for r, chunk in enumerate(padded.chunk(world)):
            rows[r].append(chunk.reshape(-1))
    return torch.stack([torch.cat(r) for r in rows])


def from_rows(rows, shapes, world=W):
    out, offset = [], 0
    for shape in shapes:
        c = math.ceil(shape[0] / world)
        per = c * math.prod(shape[1:])
        full = torch.cat([rows[r, offset:offset + per] for r in range(world)]).view(c * world, *shape[1:])
        out.append(full[:shape[0]])
        offset += per
    return out


def blockwise(fn, row):
    return torch.cat([fn(row[i:i + BLOCK]) for i in range(0, row.numel(), BLOCK)])


def int8(x):
    """Min-max quantization to 256 levels per 512 elements (one chunk per block here), round to nearest."""
    lo, hi = x.min(), x.max()
    step = (hi - lo) / 255
    if step == 0:
        return x.clone()
    return lo + torch.round((x - lo) / step).clamp(0, 255) * step


def gradient(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The gradient of the worker's loss term at the parameters `p` the forward used, in their dtype: ``A * p + c``
    in float32; in 16 bits, autograd's own ops on the term (the mixed-precision forward casts `c` too)."""
    if p.dtype == torch.float32:
        return A * p + c
    leaf = p.detach().clone().requires_grad_()
    term(leaf, c.to(p.dtype)).backward()
    return leaf.grad


class Reference:
    """The algorithm of dsq_plugins/engine/sharded.py in plain torch, for every rank at once. With a 16-bit `dtype`
    (FSDP2's `MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype)`), the shards stay float32 and so does the
    worker residual; the copies, the gradients, the wire and the owner's sum are in `dtype`."""

    def __init__(self, downlink, dtype=torch.float32):
        self.downlink, self.dtype = downlink, dtype
        self.x = {u: to_rows([initial(n) for n in names]) for u, names in UNITS.items()}
        self.x_hat = {u: x.to(dtype, copy=True) for u, x in self.x.items()}
        self.e = {u: torch.zeros(W, *x.shape) for u, x in self.x.items()}
        # FSDP's padding takes no update: the optimizer sees the sharded parameters without it
        self.real = {u: to_rows([torch.ones(SHAPES[n]) for n in names]) for u, names in UNITS.items()}

    def used(self, u):
        if self.downlink == "delta":
            return self.x_hat[u]
        if self.downlink == "quantized":
            return torch.stack([blockwise(int8, row) for row in self.x[u]])
        return self.x[u].to(self.dtype)

    def step(self, t, dense=()):
        """Step t: the gather (from step 1 on, the owners' deltas), the forward and backward on what was
        gathered, the reduce-scatter, SGD on the exact shards. Units in `dense` go dense at this step (auto's
        choice): the gather is exact, the reduction sends every residual along, and the residuals are zero."""
        for u, names in UNITS.items():
            if self.downlink == "delta" and u in dense:
                self.x_hat[u] = self.x[u].to(self.dtype, copy=True)
            elif self.downlink == "delta" and t > 0:
                for r in range(W):
                    self.x_hat[u][r] += blockwise(sign, self.x[u][r].to(self.dtype) - self.x_hat[u][r])
            shapes = [SHAPES[n] for n in names]
            used = from_rows(self.used(u), shapes)
            grads = [to_rows([gradient(p, coefficients(i, t, n)) for p, n in zip(used, names)]).to(self.dtype)
                     for i in range(W)]
            if u in dense:
                for r in range(W):
                    total = sum(grads[i][r] + self.e[u][i, r] for i in range(W))
                    self.x[u][r] -= LR * total / W * self.real[u][r]
                self.e[u].zero_()
                continue
            for r in range(W):
                total = grads[r][r].clone()
                for i in range(W):
                    if i != r:
                        v = grads[i][r].float() + self.e[u][i, r]
                        c = blockwise(sign, v.to(self.dtype))
                        self.e[u][i, r] = v - c.float()
                        total += c
                self.x[u][r] -= LR * (total / W).float() * self.real[u][r]

    def params(self):
        out = {}
        for u, names in UNITS.items():
            out.update(zip(names, from_rows(self.x[u], [SHAPES[n] for n in names])))
        return out


STEPS = 5
RUNS = ["refusals", "delta", "delta+reshard", "quantized+reshard", "dense", "delta+nan2", "delta+dcp",
        "auto+steps12", "delta+bf16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch of 2 ranks doing every run of `RUNS` in turn (each saving a checkpoint after step 2)."""
    out = tmp_path_factory.mktemp("fsdp")
    launch(W, ROOT / "tests" / "fsdp_worker.py", [out, "--runs", *RUNS, "--steps", STEPS, "--save-at", 2],
           timeout=300)
    return out


@pytest.mark.parametrize("run", ["delta", "delta+reshard", "quantized+reshard", "dense", "delta+bf16"])
def test_fsdp2_equals_plain_torch_reference(runs, run):
    """Each step's parameters, each rank's worker residuals and (delta) the replicas every rank computes with
    equal the plain-torch reference; the forward used the replicas (delta) or the int8 parameters (quantized).
    With reshard_after_forward the backward's second gather of a unit sends nothing and changes nothing. Under
    bf16 mixed precision the replicas are bf16 and the worker residuals float32 (what bf16 would round away, kept)."""
    downlink = run.split("+")[0]
    dtype = torch.bfloat16 if "bf16" in run else torch.float32
    steps = STEPS
    ranks = load_ranks(runs / run, W)
    ref = Reference(downlink, dtype)
    for t in range(steps):
        ref.step(t)
        for i, rank in enumerate(ranks):
            rec = rank["records"][t]
            assert rec["dsq_step"] == t + 1
            for name, p in ref.params().items():
                torch.testing.assert_close(rec["params"][name], p, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} {name}: {m}")
            for u in UNITS:
                assert rec["worker"][u].dtype == torch.float32
                expected = ref.e[u][i].clone()
                expected[i] = 0
                torch.testing.assert_close(rec["worker"][u], expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} worker residual of {u}: {m}")
                if downlink == "delta":
                    assert rec["replicas"][u].dtype == dtype
                    torch.testing.assert_close(rec["replicas"][u], ref.x_hat[u].view(-1), rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"step {t} rank {i} replica of {u}: {m}")
    if dtype != torch.float32:       # the worker residuals hold what the gradients' dtype cannot
        last = ranks[0]["records"][-1]["worker"]
        assert any(not torch.equal(e, e.to(dtype).float()) for e in last.values())
    # the conservation law of the downlink: exact parameters = replica + the owner's residual, and the residual
    # is not everything (the replicas moved)
    if downlink == "delta":
        for u in UNITS:
            assert not torch.equal(ref.x_hat[u], to_rows([initial(n) for n in UNITS[u]]))


def test_fsdp2_resumes_exactly(runs, tmp_path):
    """Runs saved after step 2 (model, optimizer and `state.state_dict()` with torch.save, or
    `state.checkpoint_state()` beside `get_state_dict` with torch.distributed.checkpoint) and resumed in new
    processes end with the same parameters, worker residuals and replicas, bit for bit, as the runs that went on."""
    resumed = tmp_path / "resumed"
    both = ("delta", "quantized+reshard", "delta+dcp")
    launch(W, ROOT / "tests" / "fsdp_worker.py", [resumed, "--runs", *both, "--steps", STEPS, "--resume", runs])
    pairs = [(a, b) for run in both
             for a, b in zip(load_ranks(runs / run, W), load_ranks(resumed / run, W))]
    for a, b in pairs:
        for ra, rb in zip(a["records"][2:], b["records"]):
            assert ra["step"] == rb["step"] and ra["dsq_step"] == rb["dsq_step"]
            for kind in ("params", "worker", "replicas"):
                assert ra[kind].keys() == rb[kind].keys()
                for k in ra[kind]:
                    assert torch.equal(ra[kind][k], rb[kind][k]), (ra["step"], kind, k)


def test_fsdp2_skips_a_unit_with_a_nonfinite_gradient_on_every_rank(runs):
    """Rank 1's NaN in unit a at step 2: both ranks' reduced gradients of unit a are NaN (rank 0's own row was
    finite), unit a's residuals do not change, the other units' do; the step counts as skipped, training goes on
    finite."""
    for rank in load_ranks(runs / "delta+nan2", W):
        before, at, after = rank["records"][1:4]
        assert not at["finite"]["a.w"] and not at["finite"]["a.b"]
        assert at["finite"]["b.w"] and at["finite"]["own"]
        assert torch.equal(before["worker"]["a"], at["worker"]["a"])
        assert not torch.equal(before["worker"]["b"], at["worker"]["b"])
        for name, p in at["params"].items():
            assert torch.equal(p, before["params"][name]), name        # the step was skipped
        assert at["skipped_steps"] == 1 and before["skipped_steps"] == 0
        assert all(torch.isfinite(p).all() for p in after["params"].values())
        assert not torch.equal(after["params"]["a.w"], at["params"]["a.w"])


def test_fsdp2_refusals_name_what_is_valid(runs):
    """install refuses, before training, what it cannot honour: a module not sharded, an unknown downlink, 'delta'
    without the owner's residual, native HSDP (its replica all-reduce would be dense), a per-parameter policy
    (units are compressed whole)."""
    import json
    found = json.loads((runs / "refusals.json").read_text())
    assert found["plain config"] is None
    expected = {"not sharded": "fully_shard", "unknown downlink": "one of ['delta', 'quantized', 'dense']",
                "delta without server_ef": "server_ef=True", "native HSDP": "HSDP",
                "policy": "not supported under FSDP2 yet"}
    for case, words in expected.items():
        assert found[case] and words in found[case], (case, found[case])


ISOLATED = __import__("os").geteuid() == 0 and __import__("shutil").which("unshare") is not None


@pytest.mark.skipif(not ISOLATED, reason="counting a job's bytes needs root (unshare --net)")
def test_fsdp2_bytes_counted_by_the_kernel(tmp_path):
    """The loopback's bytes per step (in a network namespace of the job's own), plain FSDP2 against DoubleSqueeze
    (sign), 2 ranks, 0.26M parameters, steps after the first (whose gathers are dense): at least 8x fewer with
    kept copies (delta), at least 1.8x fewer where units reshard after forward (int8 gathers, two per step as
    plain FSDP2's)."""
    import os
    import subprocess
    import sys
    runs = ["off", "delta", "off+reshard", "quantized+reshard"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(tmp_path), "--big", "--steps", "4", "--runs", *runs]
    cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    per_step = {}
    for run in runs:
        wire = torch.load(tmp_path / run / "rank0.pt", weights_only=False)["wire"]
        per_step[run] = (wire[-1] - wire[1]) / (len(wire) - 2)
    assert per_step["off"] > 8 * per_step["delta"], per_step
    assert per_step["off+reshard"] > 1.8 * per_step["quantized+reshard"], per_step
    assert per_step["off+reshard"] > 1.3 * per_step["off"], per_step        # the baseline did gather twice


@pytest.fixture(scope="module")
def hsdp_runs(tmp_path_factory):
    """One launch of 4 ranks: HSDP with float32 residuals, with residuals kept in bfloat16, and under auto."""
    out = tmp_path_factory.mktemp("hsdp")
    launch(4, ROOT / "tests" / "fsdp_worker.py", [out, "--runs", "hsdp", "hsdp+bf16res", "hsdp+auto+steps12",
                                                  "--steps", 4], timeout=300)
    return out


def replay_hsdp(ranks, residual_dtype=None, dense=lambda t, u: False) -> None:
    """An HSDP run of 4 ranks (2 replicas of 2 shards) against its reference, step by step: plain torch inside the
    node (the dense mean of the node's two gradients) fed to the Simulator with plain-torch sign across the
    replicas, one per unit and shard, its residuals kept in `residual_dtype`. Where `dense(t, u)` (auto sent unit
    u dense at step t) the update is the plain mean of ``node mean + e_i`` plus the server residual, and the
    residuals are zero after it. Asserts every step's parameters on every rank and both residuals."""
    from dsq_plugins import DoubleSqueezeConfig, Simulator
    from dsq_plugins.engine.plan import expand_owned
    from .reference import reference
    world, shards = 4, 2
    config = DoubleSqueezeConfig(compressor="sign", block_size=BLOCK, min_numel=0, guard=0.0)
    keys = {u: k for k, u in enumerate(UNITS)}             # units are numbered in named_modules order
    x = {u: to_rows([initial(n) for n in names], shards) for u, names in UNITS.items()}
    real = {u: to_rows([torch.ones(SHAPES[n]) for n in names], shards) for u, names in UNITS.items()}
    sims = {(u, s): Simulator(2, config, key=keys[u], compressors=reference("sign"), residual_dtype=residual_dtype)
            for u in UNITS for s in range(shards)}
    for t in range(len(ranks[0]["records"])):
        for u, names in UNITS.items():
            used = from_rows(x[u], [SHAPES[n] for n in names], shards)
            grads = [to_rows([A * p + coefficients(i, t, n) for p, n in zip(used, names)], shards)
                     for i in range(world)]
            for s in range(shards):
                sim = sims[(u, s)]
                node_means = [sum(grads[r * shards + j][s] for j in range(shards)) / shards for r in range(2)]
                if dense(t, u):               # the residuals go out with the mean
                    held = sim.worker_errors or [0, 0]
                    update = sum(m + e for m, e in zip(node_means, held)) / 2
                    if sim.server_error is not None:
                        update = update + sim.server_error
                    sim.worker_errors = [torch.zeros_like(update) for _ in range(2)]
                    sim.server_error = torch.zeros_like(update)
                    sim.steps += 1
                else:
                    update = sim.step(node_means)
                x[u][s] -= LR * update * real[u][s]
                server = torch.zeros_like(x[u][s])
                for r in range(2):
                    rec = ranks[r * shards + s]["records"][t]
                    worker = rec["worker"].get(u, torch.zeros_like(server))
                    assert worker.numel() == x[u][s].numel()
                    torch.testing.assert_close(worker.to(sim.worker_errors[r].dtype), sim.worker_errors[r],
                                               rtol=1e-5, atol=1e-6,
                                               msg=lambda m: f"step {t} {u} shard {s} replica {r}: {m}")
                    if u in rec["server"]:
                        server += expand_owned(keys[u], rec["server"][u].float(), server.numel(), BLOCK, 2, r)
                torch.testing.assert_close(server.to(sim.server_error.dtype), sim.server_error, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} {u} shard {s} server residual: {m}")
        expected = {}
        for u, names in UNITS.items():
            expected.update(zip(names, from_rows(x[u], [SHAPES[n] for n in names], shards)))
        for i, rank in enumerate(ranks):
            for name, p in expected.items():
                torch.testing.assert_close(rank["records"][t]["params"][name], p, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} {name}: {m}")


@pytest.mark.parametrize("token", ["hsdp", "hsdp+bf16res"])
def test_hsdp_replica_all_reduce_is_the_double_pass(hsdp_runs, token):
    """HSDP on 4 ranks, 2 replicas of 2 shards: FSDP's reduce-scatter averages inside each replica, then the
    replicas' all-reduce of every shard is DoubleSqueeze's double pass. Each step's parameters equal plain torch
    (dense mean inside the node) fed to the Simulator with plain-torch sign across the replicas (one per unit and
    shard), and so do both residuals; the residuals are the size of the shard. With ``residual_dtype=bfloat16``
    the residuals are bfloat16 (half the memory) and equal the Simulator's kept in bfloat16, which is not the
    float32 run."""
    world = 4
    ranks = load_ranks(hsdp_runs / token, world)
    narrow = torch.bfloat16 if token.endswith("bf16res") else None
    if narrow is not None:
        wide = load_ranks(hsdp_runs / "hsdp", world)
        assert all(e.dtype == torch.bfloat16 for r in ranks for e in r["records"][0]["worker"].values())
        assert all(e.dtype == torch.bfloat16 for r in ranks for e in r["records"][0]["server"].values())
        for r, w in zip(ranks, wide):
            assert r["memory"]["worker_residual"] * 2 == w["memory"]["worker_residual"], (r["memory"], w["memory"])
            assert r["memory"]["server_residual"] * 2 == w["memory"]["server_residual"]
        assert any(not torch.equal(r["records"][-1]["worker"][u].float(), w["records"][-1]["worker"][u])
                   for r, w in zip(ranks, wide) for u in UNITS), "bfloat16 residuals gave the float32 run's"
    replay_hsdp(ranks, narrow)


def test_hsdp_auto_switches_lose_nothing(hsdp_runs):
    """compressor="auto" (candidate sign) under HSDP: the replicas' exchange of each unit explores sign, then
    dense, on the job's own step times averaged over the whole job, every rank (both replica groups) choosing the
    same at the same step. Replayed with its choices: a compressed step is the Simulator's (plain-torch sign)
    across the replicas, a dense one the plain mean of ``node mean + e_i`` plus the server residual (what the
    residuals held goes out with it, and they are zero after it); every step's parameters and both residuals
    match: nothing is lost in the switch to dense."""
    ranks = load_ranks(hsdp_runs / "hsdp+auto+steps12", 4)
    choices = [rec["specs"] for rec in ranks[0]["records"]]
    assert all(r["records"][t]["specs"] == choices[t] for r in ranks for t in range(len(choices)))
    seen = {spec for c in choices for spec in c.values()}
    assert {"sign", None} <= seen, choices
    replay_hsdp(ranks, dense=lambda t, u: choices[t][u] is None)


def test_lightning_model_parallel_strategy_equals_reference_and_resumes(tmp_path):
    """Lightning's ModelParallelStrategy (fully_shard in configure_model) with FSDPDoubleSqueezeCallback: every
    step equals the plain-torch reference (delta downlink); a run resumed from its step-2 checkpoint (a distributed
    checkpoint folder; the residuals in its metadata) ends bit for bit where the full run does."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(W, ROOT / "tests" / "lightning_fsdp_worker.py", [full, "--steps", 4, "--save-every", 2], timeout=300)
    launch(W, ROOT / "tests" / "lightning_fsdp_worker.py", [resumed, "--steps", 4, "--resume",
                                                            full / "ckpt" / "step=2.ckpt"], timeout=300)
    ref = Reference("delta")
    a, b = load_ranks(full, W), load_ranks(resumed, W)
    for t in range(4):
        ref.step(t)
        for i in range(W):
            rec = a[i]["records"][t]
            for name, p in ref.params().items():
                torch.testing.assert_close(rec["params"][name], p, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} {name}: {m}")
            for u in UNITS:          # the units' names in the LightningModule
                named = {"<root>": "root", "a": "root.a", "b": "root.b"}[u]
                torch.testing.assert_close(rec["replicas"][named], ref.x_hat[u].view(-1), rtol=1e-5, atol=1e-6)
                expected = ref.e[u][i].clone()
                expected[i] = 0
                torch.testing.assert_close(rec["worker"][named], expected, rtol=1e-5, atol=1e-6)
    for i in range(W):
        assert a[i]["step"] == b[i]["step"] == 4
        last_a, last_b = a[i]["records"][-1], b[i]["records"][-1]
        for kind in ("params", "worker", "replicas"):
            for k in last_a[kind]:
                assert torch.equal(last_a[kind][k], last_b[kind][k]), (i, kind, k)


def test_fsdp2_resume_on_more_ranks_keeps_the_residuals_mass(runs, tmp_path):
    """The 2-rank run's distributed checkpoint (after step 2) resumed on 4 ranks: FSDP2 reshards the parameters,
    the checkpoint reshards the residuals; every new rank's worker residual is the saved mean over the 2 ranks
    (so the mean, which the conservation law holds, is kept), and the replica every rank computes with is the
    saved one (x - e of each new owner's shard); training goes on finite."""
    launch(4, ROOT / "tests" / "fsdp_worker.py", [tmp_path, "--runs", "delta+dcp", "--steps", STEPS, "--resume", runs],
           timeout=300)
    before = load_ranks(runs / "delta+dcp", W)
    after = load_ranks(tmp_path / "delta+dcp", 4)
    for u, names in UNITS.items():
        shapes = [SHAPES[n] for n in names]
        saved_mean = [sum(p) / W for p in zip(*(from_rows(r["records"][1]["worker"][u], shapes) for r in before))]
        saved_replica = from_rows(before[0]["records"][1]["replicas"][u].view(W, -1), shapes)
        mine = torch.stack([r["loaded"]["mine"][u] for r in after])
        for i, rank in enumerate(after):
            got = from_rows(rank["loaded"]["worker"][u], shapes, world=4)
            for name, g, m in zip(names, got, saved_mean):
                torch.testing.assert_close(g, m, rtol=1e-6, atol=1e-7, msg=lambda s: f"rank {i} {name}: {s}")
        for name, g, m in zip(names, from_rows(mine, shapes, world=4), saved_replica):
            torch.testing.assert_close(g, m, rtol=1e-5, atol=1e-6, msg=lambda s: f"replica {name}: {s}")
        assert any(float(m.abs().max()) > 0 for m in saved_mean)
    for rank in after:
        assert rank["records"][0]["step"] == 2
        assert all(torch.isfinite(p).all() for p in rank["records"][-1]["params"].values())


def test_fsdp2_auto_switches_lose_nothing(runs):
    """compressor="auto" (candidate sign) under FSDP2 explores sign, then dense, on the job's own step times,
    every rank choosing the same at the same step; replayed with the choices it made, the plain-torch reference
    gives every step's parameters, residuals and replicas: a unit going dense sends its residuals along (they
    are zero after it) and its gather is exact, nothing lost in either switch."""
    ranks = load_ranks(runs / "auto+steps12", W)
    choices = [rec["specs"] for rec in ranks[0]["records"]]
    assert all(r["records"][t]["specs"] == choices[t] for r in ranks for t in range(len(choices)))
    seen = {spec for c in choices for spec in c.values()}
    assert {"sign", None} <= seen, choices
    ref = Reference("delta")
    for t, chosen in enumerate(choices):
        ref.step(t, dense={u for u, spec in chosen.items() if spec is None})
        for i, rank in enumerate(ranks):
            rec = rank["records"][t]
            for name, p in ref.params().items():
                torch.testing.assert_close(rec["params"][name], p, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} {name}: {m}")
            for u in UNITS:
                expected = ref.e[u][i].clone()
                expected[i] = 0
                torch.testing.assert_close(rec["worker"][u], expected, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} worker residual of {u}: {m}")
                torch.testing.assert_close(rec["replicas"][u], ref.x_hat[u].view(-1), rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {t} rank {i} replica of {u}: {m}")


def test_fsdp2_conservation_law_on_the_run_itself(runs):
    """On the run's own records (delta): the sum of the updates applied to each unit so far equals the sum of
    the true mean gradients (at the replicas the run computed with) less the mean worker residual,
    ``sum_t applied_t = sum_t mean_i g_i,t - mean_i e_i,T``, on every real element; and the residual is not
    everything: the applied sum is most of the true one."""
    ranks = load_ranks(runs / "delta", W)
    for u, names in UNITS.items():
        shapes = [SHAPES[n] for n in names]
        x0 = to_rows([initial(n) for n in names])
        real = to_rows([torch.ones(SHAPES[n]) for n in names]).bool()
        true = torch.zeros_like(x0)
        for t in range(STEPS):
            rec = ranks[0]["records"][t]
            used = from_rows(rec["replicas"][u].view(W, -1), shapes)
            true += sum(to_rows([A * p + coefficients(i, t, n) for p, n in zip(used, names)]) for i in range(W)) / W
            applied = (x0 - to_rows([rec["params"][n] for n in names])) / LR
            mean_e = sum(r["records"][t]["worker"][u] for r in ranks) / W
            torch.testing.assert_close(applied[real], (true - mean_e)[real], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"step {t} unit {u}: {m}")
        assert float(applied[real].norm()) > 0.5 * float(true[real].norm())
