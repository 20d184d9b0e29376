"""`dsq.DoubleSqueezeAdamW` under the real torchrun and DDP (2 ranks, gloo), against plain torch.

- Lossless compressors: the warm-up equals `torch.optim.AdamW` on the mean gradient, step for step, and the
  frozen phase equals AdamW with its variance frozen (and refreshed every few steps), written here in plain torch.
- Sign on the momentum: the conservation law in the whitened space, ``sum_t m_t = sum_t mean_i w_i,t - mean_i e_i
  - e``, with ``w_i,t`` rebuilt here from the recorded local gradients and, at the first frozen step, what the
  warm-up's residuals held at the freeze (nothing is lost there); every step applies exactly ``m_t``; the
  momentum travels in a twentieth of dense's bytes. With refreshes of the variance the law holds in the gradient's
  units (each step's ``m_t`` and ``w_i,t`` times its denominator, the final residuals times the last one): the
  residuals carried across a refresh are re-expressed in the new whitening, and what the warm-up's collective held
  after a refresh joins the next momentum; under DDP and on a plain model (the optimizer then averages itself).
- A resumed run continues bit for bit; resumed on 3 ranks from 2 (`load_resharded`) the residuals' mass is kept
  and delivered; a NaN on one rank skips the step on both.
"""
import json

import pytest
import torch

from .conftest import ROOT, deepspeed_launch, horovodrun as launch_horovod, launch_cases
from .workload import batch, build_model

WORKER = ROOT / "tests" / "adamw_worker.py"
HVD_WORKER = ROOT / "tests" / "hvd_adamw_worker.py"
DS_WORKER = ROOT / "tests" / "ds_adamw_worker.py"
LR, WD, BETAS, EPS = 0.01, 0.1, (0.9, 0.999), 1e-8
REFRESH_BETA2 = 0.9          # so that a refresh of 3-4 steps moves the variance by a third, not a fraction of 1%
REFUSED = [({"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True},
            "ZeRO stage 1 (it partitions the optimizer state"),
           ({"bf16": {"enabled": True}}, "bf16 training"),
           ({"gradient_allreduce_op": "sum"}, '"gradient_allreduce_op": "sum"'),
           ({"doublesqueeze": {"enabled": True}}, "ValueError: the \"doublesqueeze\" section compresses the "
                                                  "gradients and DoubleSqueezeAdamW the momentum: choose one")]


@pytest.fixture(scope="module")
def torch_runs(tmp_path_factory):
    """The torchrun runs of this file, in one launch (`Cases`; the resume after the run it loads)."""
    tmp = tmp_path_factory.mktemp("adamw")
    return launch_cases(tmp, 2, {
        "lossless": ("--compressor", "none", "--warmup-compressor", "none", "--steps", 9, "--warmup", 4, "--lr", LR),
        "lossless_refresh": ("--compressor", "none", "--warmup-compressor", "none", "--steps", 12, "--warmup", 4,
                             "--refresh", 3, "--beta2", REFRESH_BETA2, "--lr", LR),
        "sign": ("--compressor", "sign", "--steps", 12, "--warmup", 4, "--lr", LR),
        "sign_refresh": ("--compressor", "sign", "--steps", 14, "--warmup", 4, "--refresh", 4,
                         "--beta2", REFRESH_BETA2, "--lr", LR),
        "lossless_refresh_own": ("--compressor", "none", "--warmup-compressor", "none", "--steps", 12, "--warmup", 4,
                                 "--refresh", 3, "--beta2", REFRESH_BETA2, "--lr", LR, "--no-ddp"),
        "sign_refresh_own": ("--compressor", "sign", "--steps", 14, "--warmup", 4, "--refresh", 4,
                             "--beta2", REFRESH_BETA2, "--lr", LR, "--no-ddp"),
        "full": ("--steps", 10, "--warmup", 4, "--refresh", 3, "--save-at", 2, 6),
        "part": ("--steps", 10, "--warmup", 4, "--refresh", 3, "--load", tmp / "cases" / "full", "--load-step", 6),
        "part_warm": ("--steps", 10, "--warmup", 4, "--refresh", 3, "--load", tmp / "cases" / "full",
                      "--load-step", 2),
        "part_warm_late": ("--steps", 10, "--warmup", 4, "--refresh", 3, "--load", tmp / "cases" / "full",
                           "--load-step", 2, "--attach-late"),
        "nan": ("--steps", 9, "--warmup", 4, "--nan-at", 6),
        "foreign": ("--steps", 2, "--extra-param"),
        "saved": ("--steps", 6, "--warmup", 4, "--save-at", 2, 6),
        "saved_own": ("--steps", 6, "--warmup", 4, "--save-at", 6, "--no-ddp")}, worker=WORKER)


@pytest.fixture(scope="module")
def resharded_runs(torch_runs, tmp_path_factory):
    """3 ranks resume from the 2 ranks' checkpoints of `torch_runs` (`load_resharded`), in one launch: during the
    warm-up (step 2) and after the freeze (step 6), under DDP and on a plain model."""
    saved, own = torch_runs.out / "saved", torch_runs.out / "saved_own"
    return launch_cases(tmp_path_factory.mktemp("adamw3"), 3, {
        "warm": ("--steps", 6, "--warmup", 4, "--load", saved, "--load-step", 2, "--load-ranks", 2),
        "frozen": ("--steps", 10, "--warmup", 4, "--load", saved, "--load-step", 6, "--load-ranks", 2),
        "frozen_own": ("--steps", 10, "--warmup", 4, "--load", own, "--load-step", 6, "--load-ranks", 2,
                       "--no-ddp")}, worker=WORKER, timeout=300)


@pytest.fixture(scope="module")
def deepspeed_runs(tmp_path_factory):
    """The deepspeed launcher's runs, in one launch."""
    tmp = tmp_path_factory.mktemp("ds_adamw")
    return launch_cases(tmp, 2, {
        "none": ("--compressor", "none", "--warmup-compressor", "none", "--steps", 7, "--warmup", 3, "--lr", LR),
        "sign": ("--steps", 10, "--warmup", 3, "--lr", LR, "--save-at", 6),
        "resumed": ("--steps", 10, "--warmup", 3, "--lr", LR, "--load", tmp / "cases" / "sign"),
        "refused": ("--refuse-with", json.dumps([c for c, _ in REFUSED]))},
        worker=DS_WORKER, launcher=deepspeed_launch)


def _mean_grads(model, step):
    grads = []
    for r in range(2):
        model.zero_grad()
        x, y = batch(step, 0, r, "multi")
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return [(a + b) / 2 for a, b in zip(*grads)]


def test_lossless_is_adamw_then_adamw_with_its_variance_frozen(torch_runs):
    check_against_plain_torch(torch_runs.ranks("lossless"), 9, 4)


@pytest.mark.parametrize("case", ["lossless_refresh", "lossless_refresh_own"])
def test_lossless_with_variance_refreshes_is_the_plain_torch_reference(torch_runs, case):
    """Under DDP, and on a plain model (the optimizer averages the gradients itself, as under Horovod and
    DeepSpeed)."""
    check_against_plain_torch(torch_runs.ranks(case), 12, 4, refresh=3, beta2=REFRESH_BETA2)


def test_on_horovod_lossless_is_the_same_and_sign_agrees_everywhere(tmp_path):
    """The same optimizer on Horovod's communicator (horovodrun, a plain model: it averages the warm-up's
    gradients itself): with lossless compressors, plain torch's AdamW then its frozen variance; with sign, every
    rank holds the same parameters at every step, in far fewer bytes than dense."""
    steps, warm = 7, 3
    runs = launch_cases(tmp_path, 2, {
        "none": ("--compressor", "none", "--warmup-compressor", "none", "--steps", steps, "--warmup", warm,
                 "--lr", LR),
        "sign": ("--steps", steps, "--warmup", warm, "--lr", LR)}, worker=HVD_WORKER, launcher=launch_horovod)
    check_against_plain_torch(runs.ranks("none"), steps, warm)
    ranks = runs.ranks("sign")
    for t in range(steps):
        for name, p in ranks[0]["records"][t]["param"].items():
            assert torch.equal(p, ranks[1]["records"][t]["param"][name]) and torch.isfinite(p).all()
    numel = sum(p.numel() for p in build_model("multi").parameters())
    assert ranks[0]["bytes_sent"] < steps * numel * 4 / 4        # under a quarter of dense's ring all-reduce


def test_on_deepspeed_lossless_is_the_same_sign_moves_only_compressed_bytes_and_resumes_exactly(deepspeed_runs):
    """Stock `deepspeed.initialize` (the deepspeed launcher, ZeRO 0, no section) with DoubleSqueezeAdamW as its
    optimizer: the engine's gradient all-reduce is off and the optimizer moves the bytes. Lossless: plain torch's
    AdamW then its frozen variance. Sign: every rank holds the same parameters, in under a tenth of dense's bytes
    once frozen; a run resumed from engine.save_checkpoint continues bit for bit."""
    ranks = deepspeed_runs.ranks("none")
    assert not ranks[0]["allreduce"]
    check_against_plain_torch(ranks, 7, 3)
    a, b = deepspeed_runs.ranks("sign"), deepspeed_runs.ranks("resumed")
    for t in range(10):
        for name, p in a[0]["records"][t]["param"].items():
            assert torch.equal(p, a[1]["records"][t]["param"][name]) and torch.isfinite(p).all()
            if t >= 6:
                assert torch.equal(b[0]["records"][t - 6]["param"][name], p), f"resumed step {t} {name}"
    numel = sum(p.numel() for p in build_model("multi").parameters())
    assert 0 < a[0]["momentum_bytes"] < (10 - 3) * numel * 4 / 10      # dense's ring all-reduce: numel * 4 a step


def test_on_deepspeed_a_checkpoint_of_two_ranks_resumes_on_three_with_the_residuals_mass(deepspeed_runs, tmp_path):
    """engine.load_checkpoint on 3 ranks of the 2 ranks' checkpoint (saved after step 6, frozen): every new rank's
    momentum worker residual is the saved ranks' mean, the server residuals keep their sum (against what the saving
    ranks recorded themselves), and the 3 ranks train on in step."""
    three = launch_cases(tmp_path, 3, {"resumed3": ("--steps", 9, "--warmup", 3, "--lr", LR, "--load",
                                                    deepspeed_runs.out / "sign")},
                         worker=DS_WORKER, launcher=deepspeed_launch, timeout=300)
    old = [torch.load(deepspeed_runs.out / "sign" / f"held{r}.pt", weights_only=False) for r in range(2)]
    loaded = [torch.load(three.out / "resumed3" / f"loaded{r}.pt", weights_only=False) for r in range(3)]
    mass = 0.0
    for name, e0 in old[0]["worker"].items():
        mean = (e0 + old[1]["worker"][name]) / 2
        for r in range(3):
            assert loaded[r]["steps"] == 6 and torch.equal(loaded[r]["worker"][name], mean), (name, r)
        torch.testing.assert_close(sum(x["server"][name] for x in loaded), old[0]["server"][name] +
                                   old[1]["server"][name], rtol=0, atol=0)
        mass += float(mean.abs().sum())
    assert mass > 0.1
    new = three.ranks("resumed3")
    assert [len(n["records"]) for n in new] == [3, 3, 3]
    for t in range(3):
        for name, p in new[0]["records"][t]["param"].items():
            assert torch.isfinite(p).all() and all(torch.equal(n["records"][t]["param"][name], p) for n in new)


def test_on_deepspeed_what_it_cannot_run_is_refused_before_training(deepspeed_runs):
    assert deepspeed_runs.failure("refused") is None
    for r in range(2):
        errors = json.loads((deepspeed_runs.out / "refused" / f"refused{r}.json").read_text())
        for (extra, message), error in zip(REFUSED, errors):
            assert error is not None and message in error, (extra, error)


def check_against_plain_torch(ranks, steps, warm, refresh=0, beta2=BETAS[1]):
    """AdamW for `warm` steps, then its variance frozen (the momentum whitened by the frozen denominator), and
    every `refresh` steps an AdamW step that updates the variance as if by `refresh` steps."""
    model = build_model("multi")
    params = list(model.parameters())
    ref = torch.optim.AdamW(params, lr=LR, betas=(BETAS[0], beta2), eps=EPS, weight_decay=WD)
    m = denom = v = None
    for t in range(steps):
        g = _mean_grads(model, t)
        with torch.no_grad():
            if t < warm:
                for p, gi in zip(params, g):
                    p.grad = gi
                ref.step()
                if t == warm - 1:
                    st = [ref.state[p] for p in params]
                    v = [s["exp_avg_sq"].clone() for s in st]
                    denom = [(s["exp_avg_sq"] / (1 - beta2 ** warm)).sqrt() + EPS for s in st]
                    m = [s["exp_avg"] / d for s, d in zip(st, denom)]
            elif refresh and (t + 1 - warm) % refresh == 0:
                for i, (p, gi) in enumerate(zip(params, g)):
                    v[i] = beta2 ** refresh * v[i] + (1 - beta2 ** refresh) * gi * gi
                    new = (v[i] / (1 - beta2 ** (t + 1))).sqrt() + EPS
                    m[i] = (BETAS[0] * m[i] * denom[i] + (1 - BETAS[0]) * gi) / new
                    denom[i] = new
                    p.mul_(1 - LR * WD).add_(m[i], alpha=-LR / (1 - BETAS[0] ** (t + 1)))
            else:
                for i, (p, gi) in enumerate(zip(params, g)):
                    m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * gi / denom[i]
                    p.mul_(1 - LR * WD).add_(m[i], alpha=-LR / (1 - BETAS[0] ** (t + 1)))
        for r, rank in enumerate(ranks):
            for (name, got), p in zip(rank["records"][t]["param"].items(), params):
                torch.testing.assert_close(got, p.detach(), rtol=1e-5, atol=1e-6,
                                           msg=lambda msg: f"rank {r} step {t} {name}: {msg}")


def test_sign_momentum_conserves_its_mass_and_applies_it(torch_runs):
    check_sign_momentum(torch_runs.ranks("sign"), 12, 4)


@pytest.mark.parametrize("case", ["sign_refresh", "sign_refresh_own"])
def test_sign_momentum_with_variance_refreshes_conserves_its_mass_in_the_gradients_units(torch_runs, case):
    ranks = torch_runs.ranks(case)
    recs = ranks[0]["records"]
    assert [t for t in range(14) if recs[t]["refresh"]] == [7, 11]
    moved = max(float(((recs[7]["denom"][n] - recs[6]["denom"][n]) / recs[6]["denom"][n]).abs().max())
                for n in ranks[0]["names"])
    assert moved > 0.05, f"a refresh moved no denominator by more than {moved:.3f}: the test checks nothing"
    check_sign_momentum(ranks, 14, 4, refresh=4)


def check_sign_momentum(ranks, steps, warm, refresh=0):
    """Both ranks agree; every step applies ``m_t`` (a refresh: its own AdamW step, checked against the plain
    torch reference in the lossless case); the conservation law, each step's terms times its denominator."""
    recs = [r["records"] for r in ranks]
    names = ranks[0]["names"]
    refreshes = {t for t in range(warm, steps) if refresh and (t + 1 - warm) % refresh == 0}
    for t in range(warm, steps):
        assert recs[0][t]["frozen"]
        for name in names:
            assert torch.equal(recs[0][t]["param"][name], recs[1][t]["param"][name]), "ranks disagree"
    for name in names:
        denom = recs[0][warm - 1]["denom"][name]
        applied = torch.zeros_like(denom, dtype=torch.float64)
        sent = torch.zeros_like(applied)
        prev = recs[0][warm - 1]["m"][name]
        zero = torch.zeros_like(denom)

        def held_at(t):
            """What the warm-up's residuals held after step t (the freeze or a refresh): it joins the next
            momentum, e_i from rank i and W e from the owner of each block."""
            return [(recs[r][t]["warm_worker"].get(name, zero).view_as(zero)
                     + 2 * recs[r][t]["warm_server"].get(name, zero).view_as(zero)) for r in range(2)]
        held = held_at(warm - 1)
        for t in range(warm, steps):
            p0, p1 = recs[0][t - 1]["param"][name], recs[0][t]["param"][name]
            m = recs[0][t]["m"][name]
            # the step applies m_t itself (decoupled weight decay beside it)
            torch.testing.assert_close(p1, p0 * (1 - LR * WD) - LR * m / (1 - BETAS[0] ** (t + 1)),
                                       rtol=1e-5, atol=1e-7)
            if t in refreshes:
                prev, held = m, held_at(t)
                continue
            denom = recs[0][t]["denom"][name]
            w = [BETAS[0] * prev + (1 - BETAS[0]) * (recs[r][t]["grad"][name] + held[r]) / denom for r in range(2)]
            held = [zero, zero]
            sent += (denom * (w[0] + w[1]) / 2).double()
            applied += (denom * m).double()
            prev = m
        zero = torch.zeros_like(applied)          # tensors below min_numel travel dense and keep no residual
        e_w = sum(r["worker_residual"].get(name, zero).double().view_as(applied) for r in ranks) / 2
        e_s = sum(r["server_residual"].get(name, zero).double().view_as(applied) for r in ranks)
        held_end = denom.double() * (e_w + e_s)
        torch.testing.assert_close(applied, sent - held_end, rtol=0, atol=1e-4 * (1 + float(sent.abs().max())),
                                   msg=lambda msg: f"conservation broken for {name}: {msg}")
        assert float(applied.norm()) > 0.3 * float(sent.norm()), f"{name}: the momentum stayed in the residuals"
        for r in ranks:                  # delivered, so no longer held by the warm-up's collective
            for kind in ("warm_worker", "warm_server"):
                assert not r["after"][kind].get(name, zero).any(), f"{name}: the warm-up's residual is still held"
    for t in [warm - 1, *sorted(refreshes)]:
        held = sum(float(recs[r][t]["warm_worker"][n].norm()) for r in range(2) for n in names
                   if n in recs[r][t]["warm_worker"])
        assert held > 0, f"the warm-up's int4 residuals were empty after step {t}: the test checks nothing"
    numel = sum(p.numel() for p in build_model("multi").parameters())
    dense = 2 * (2 - 1) / 2 * numel * 4          # what a ring all-reduce sends per rank per step
    per_step = max(r["momentum_bytes"] for r in ranks) / ranks[0]["momentum_steps"]
    assert per_step < dense / 10, (per_step, dense)


@pytest.mark.parametrize("case, at", [("part_warm", 2), ("part_warm_late", 2), ("part", 6)])
def test_resume_continues_exactly(torch_runs, case, at):
    """Resumed during the warm-up (DDP's hook reduces with the loaded residuals in the first backward, before the
    optimizer's first step; also with the state loaded before `attach_ddp`, the order a framework that wraps the
    model later imposes) and after the freeze, just before a refresh of the variance."""
    a, b = torch_runs.ranks("full"), torch_runs.ranks(case)
    for r in range(2):
        assert b[r]["first"] == at
        for t in range(at, 10):
            for name, p in a[r]["records"][t]["param"].items():
                assert torch.equal(b[r]["records"][t - at]["param"][name], p), f"rank {r} step {t} {name}"


@pytest.mark.parametrize("case, saved", [("frozen", "saved"), ("frozen_own", "saved_own")])
def test_resumed_on_three_ranks_the_momentums_residuals_are_delivered(torch_runs, resharded_runs, case, saved):
    """2 ranks save after step 6 (frozen, sign on the momentum); 3 ranks resume from both ranks' states
    (`load_resharded`) and take 4 steps. Every new rank starts from AdamW's saved state and the saved ranks' mean
    worker residual, the server residual keeps its sum; and the conservation law holds across the resume:
    ``sum_t m_t = sum_t mean_i w_i,t + R_6 - R_10`` over the resumed steps, with ``R = mean_i e_i + e`` and R_6
    what the saving ranks held (their own record). Starting the residuals afresh breaks it by R_6."""
    old = [torch.load(torch_runs.out / saved / f"held6_rank{r}.pt", weights_only=False) for r in range(2)]
    loaded = [torch.load(resharded_runs.out / case / f"loaded{r}.pt", weights_only=False) for r in range(3)]
    new = resharded_runs.ranks(case)
    beta1 = BETAS[0]
    held_mass = 0.0
    for name, e0 in old[0]["m_worker"].items():
        mean = (e0 + old[1]["m_worker"][name]) / 2
        server = old[0]["m_server"][name] + old[1]["m_server"][name]
        for r in range(3):
            assert torch.equal(loaded[r]["m_worker"][name], mean), (name, r)
            for k, v in old[0]["state"][name].items():
                assert torch.equal(loaded[r]["state"][name][k], v), (name, k, r)
        torch.testing.assert_close(sum(loaded[r]["m_server"][name] for r in range(3)), server, rtol=0, atol=0)
        held_mass += float((mean + server).abs().sum())

        recs = [n["records"] for n in new]
        assert all(n["first"] == 6 and len(n["records"]) == 4 for n in new)
        applied, sent = torch.zeros_like(mean), torch.zeros_like(mean)
        m_prev, denom = old[0]["state"][name]["exp_avg"], old[0]["state"][name]["denom"]
        for t in range(4):
            m = recs[0][t]["m"][name]
            for r in range(3):
                assert torch.equal(recs[r][t]["m"][name], m) and torch.equal(recs[r][t]["denom"][name], denom)
                assert torch.equal(recs[r][t]["param"][name], recs[0][t]["param"][name])
                sent += (beta1 * m_prev + (1 - beta1) * recs[r][t]["grad"][name] / denom).reshape(-1) / 3
            applied += m.reshape(-1)
            m_prev = m
        end = sum(n["worker_residual"][name] for n in new) / 3 + sum(n["server_residual"][name] for n in new)
        expected = sent + (mean + server) - end
        torch.testing.assert_close(applied, expected, rtol=0, atol=1e-5 * (1 + float(expected.abs().max())),
                                   msg=lambda msg: f"{name}: the mass held at the save was not delivered: {msg}")
    assert held_mass > 1.0, "the saving ranks held little residual: the test would not see it dropped"


def test_resumed_on_three_ranks_during_the_warm_up_the_gradients_residuals_keep_their_mass(torch_runs,
                                                                                          resharded_runs):
    """Saved at step 2 (AdamW on int4 gradients through DDP's hook), resumed on 3 ranks: every new rank's
    worker residual is the saved mean, the server residual put in place and summed over the owners is the saved
    one element for element, AdamW's state is the saved one, and the run goes on through the freeze with the
    ranks in step."""
    from dsq_plugins.engine.plan import expand_owned
    old = [torch.load(torch_runs.out / "saved" / f"held2_rank{r}.pt", weights_only=False) for r in range(2)]
    loaded = [torch.load(resharded_runs.out / "warm" / f"loaded{r}.pt", weights_only=False) for r in range(3)]
    assert old[0]["warm_worker_raw"]
    for key, e0 in old[0]["warm_worker_raw"].items():
        mean = (e0 + old[1]["warm_worker_raw"][key]) / 2
        assert float(mean.abs().sum()) > 0, key
        for r in range(3):
            assert torch.equal(loaded[r]["warm_worker_raw"][key], mean), (key, r)
        n = old[0]["warm_numels"][key]       # each rank's owned blocks put in place (blocks of 256, the worker's)
        before = sum(expand_owned(key, o["warm_server_raw"][key], n, 256, 2, r) for r, o in enumerate(old)
                     if key in o["warm_server_raw"])
        after = sum(expand_owned(key, x["warm_server_raw"][key], n, 256, 3, r) for r, x in enumerate(loaded)
                    if key in x["warm_server_raw"])
        assert isinstance(before, torch.Tensor) and torch.equal(after, before), key
    for name, st in old[0]["state"].items():
        for r in range(3):
            assert all(torch.equal(loaded[r]["state"][name][k], v) for k, v in st.items()), (name, r)
    new = resharded_runs.ranks("warm")
    for t in range(4):
        for name, p in new[0]["records"][t]["param"].items():
            assert torch.isfinite(p).all() and all(torch.equal(n["records"][t]["param"][name], p) for n in new)
    assert new[0]["records"][-1]["frozen"]


def test_a_nan_on_one_rank_skips_the_step_on_both(torch_runs):
    ranks = torch_runs.ranks("nan")
    for r in ranks:
        recs = r["records"]
        for name in recs[5]["param"]:
            assert torch.equal(recs[6]["param"][name], recs[5]["param"][name])
            assert torch.equal(recs[6]["m"][name], recs[5]["m"][name])
            assert not torch.equal(recs[7]["param"][name], recs[6]["param"][name])
            assert torch.isfinite(recs[8]["param"][name]).all()
        assert r["skipped"] == 1


@pytest.mark.parametrize("kw, message", [
    (dict(warmup_steps=0), "warmup_steps must be an integer >= 1"),
    (dict(variance_refresh=-1), "variance_refresh must be an integer >= 0"),
    (dict(betas=(0.9, 1.0)), "invalid betas"),
    (dict(config="sign"), "config must be a DoubleSqueezeConfig"),
])
def test_bad_arguments_are_refused(kw, message):
    import dsq_plugins as dsq
    with pytest.raises((ValueError, TypeError), match=message):
        dsq.DoubleSqueezeAdamW(build_model("multi").parameters(), **kw)


def test_a_parameter_ddp_does_not_hold_is_refused(torch_runs):
    """`ddp=` with an optimizer that also holds a parameter outside the DDP model: refused at construction, since
    DDP would never average that parameter's gradient."""
    torch_runs.refused("foreign", "1 of this optimizer's parameters are not the DDP model's")


def test_load_resharded_refuses_what_is_not_one_runs_states():
    """Before anything is loaded: a state that is not a DoubleSqueezeAdamW's, ranks at different steps, another
    warm-up."""
    import dsq_plugins as dsq
    opt = dsq.DoubleSqueezeAdamW(build_model("multi").parameters(), warmup_steps=4)
    sd = opt.state_dict()
    at = lambda steps, warm=4: dict(sd, doublesqueeze=dict(sd["doublesqueeze"], steps=steps, warmup_steps=warm))  # noqa: E731
    with pytest.raises(ValueError, match="takes every rank's DoubleSqueezeAdamW.state_dict"):
        opt.load_resharded([at(3), torch.optim.AdamW(build_model("multi").parameters()).state_dict()])
    with pytest.raises(ValueError, match="different steps or warm-ups"):
        opt.load_resharded([at(3), at(4)])
    with pytest.raises(ValueError, match="saved with warmup_steps=5"):
        opt.load_resharded([at(3, 5), at(3, 5)])
