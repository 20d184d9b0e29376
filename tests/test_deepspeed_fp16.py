"""DoubleSqueeze under DeepSpeed's fp16 with its dynamic loss scaler (ZeRO 1, 2 and 3; real DeepSpeed, gloo, 2 ranks).

DeepSpeed's CPU accelerator offers fp16 only on CPUs with mkldnn fp16 kernels; the workers answer that capability
query as such a CPU does (tests/ds_worker.py), and everything else is DeepSpeed's own fp16 path: its optimizers,
loss scaler and overflow checks. The scenario: SGD, sign in blocks of 256, loss scale 2^8 with a window of 2 clean
steps; at step 2 one parameter's gradient (the last one backward produces, so that other buckets are reduced before
it) is Inf on rank 1 only; DeepSpeed halves the scale there and doubles it again later.

The reference is plain torch's fp32 gradients of the same weights and DeepSpeed's fp32 master partitions (what its
optimizer steps), independent of the code under test. In gradient units, with ``U_t`` the loss scale of step t's
reduction (the residuals' units) and ``R_t`` the mean worker residual plus the owners' residuals after it::

    c_t = mean_i g_i,t + R_{t-1} / U_{t-1} - R_t / U_t          (every step DeepSpeed does not skip)

where ``c_t`` is the averaged gradient the optimizer applied. DeepSpeed 0.19's ZeRO-1/2 step unscales by the scale
*after* its update of the scale, so at a step where the scale grows it applies half the gradient (stock does the
same); ``c_t`` is recovered accordingly: ``(x_t - x_{t+1}) / LR * S_after / S_before``.
"""
import pytest
import torch

from .conftest import ROOT, launch, launch_cases, load_ranks

LR = 0.5
DS_WORKER = ROOT / "tests" / "ds_worker.py"
ZERO3_WORKER = ROOT / "tests" / "ds_zero3_worker.py"
SCENARIO = ("--fp16", "--model", "multi", "--steps", "7", "--nan-at", "2", "--nan-param", "0.weight",
            "--scale-window", "2", "--dsq", '{"guard": 0}')


def _flat(ranks, t, key, names):
    return torch.cat([sum(r["records"][t][key][n] for r in ranks) / len(ranks) for n in names])


def _residual(ranks, t, stage, names, d):
    """R_t: the mean over ranks of the worker residuals, plus (ZeRO 1) the sum of the owners' server residuals."""
    W = len(ranks)
    if stage == 2:
        return (sum(r["records"][t]["residual"] for r in ranks) / W)[:d]
    parts = []
    for n in names:
        numel = ranks[0]["records"][t]["g"][n].numel()
        worker = sum(r["records"][t]["worker_residual"].get(n, torch.zeros(numel)) for r in ranks) / W
        server = sum(r["records"][t]["server_residual"].get(n, torch.zeros(numel)) for r in ranks)
        parts.append(worker + server)
    return torch.cat(parts)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    """The scenario at ZeRO 1 and ZeRO 2, and the resume, in one launch (`Cases`; the resume after the run it
    loads: the full run is the scenario at ZeRO 2, saved after step 6)."""
    tmp = tmp_path_factory.mktemp("fp16")
    resume = ("--stage", "2", "--bucket", "1024", *SCENARIO)
    return launch_cases(tmp, 2, {
        **{f"zero{stage}": ("--stage", str(stage), "--bucket", "1024", *SCENARIO) for stage in (1, 2)},
        "full": (*resume, "--save-at", "6"),
        "resumed": (*resume, "--steps", "1", "--first-step", "6", "--load", tmp / "cases" / "full" / "ckpt")},
        worker=DS_WORKER)


@pytest.mark.parametrize("stage", [1, 2], ids=["zero1", "zero2"])
def test_fp16_residuals_follow_the_loss_scale_and_an_overflow_changes_nothing(scenario, stage):
    """The overflow is skipped on every rank with every residual as it was (bit for bit), although other buckets
    were reduced before it at ZeRO-2; the conservation law holds in gradient units across both scale changes (a
    residual not rescaled breaks it by 27-110% of the gradient's norm; measured error here: under 0.1%)."""
    ranks = scenario.ranks(f"zero{stage}")
    names = list(ranks[0]["records"][0]["g"])
    d = sum(ranks[0]["records"][0]["g"][n].numel() for n in names)
    records = ranks[0]["records"]
    assert [(rec["scale"], rec["scale_after"]) for rec in records][1:6] == \
        [(256, 256), (256, 128), (128, 128), (128, 128), (128, 256)], "the scenario's scale changes"
    for r in ranks:
        rec = r["records"]
        assert [x["ds_skipped"] for x in rec] == [0, 0, 1, 1, 1, 1, 1]
        assert rec[-1]["skipped_steps"] == 1 and rec[1]["skipped_steps"] == 0
        assert torch.equal(rec[2]["master"], rec[1]["master"]), "the overflow step changed the weights"
        for key in (("residual",) if stage == 2 else ("worker_residual", "server_residual")):
            now, before = rec[2][key], rec[1][key]
            for k in (now if isinstance(now, dict) else {None: now}):
                a = now if k is None else now[k]
                b = before if k is None else before[k]
                assert torch.equal(a, b), f"the skipped step changed residual {key} {k}"
        for n, p in r["params"].items():
            assert torch.equal(p, ranks[0]["params"][n]), n

    def master(t):
        return torch.cat([r["records"][t]["master"] if t >= 0 else r["master0"] for r in ranks])[:d]

    units, previous = None, torch.zeros(d)
    for t, rec in enumerate(records):
        skipped = t == 2
        u = units if skipped else rec["scale"]
        now = _residual(ranks, t, stage, names, d) / u
        if not skipped:
            c = (master(t - 1) - master(t)) / LR * rec["scale_after"] / rec["scale"]
            g = _flat(ranks, t, "g", names)
            err = float((c - (g + previous - now)).norm() / g.norm())
            assert err < 0.01, f"step {t}: conservation in gradient units off by {err:.4f} of the gradient"
        previous, units = now, u
    assert float(previous.norm()) > 0.1 * float(_flat(ranks, 6, "g", names).norm()), "error feedback kept nothing"


def test_fp16_zero3_overflow_is_skipped_everywhere_and_restores_the_residual(tmp_path):
    """ZeRO-3 (int8 parameter gathers): the same overflow is skipped on both ranks, the exact parameters and every
    residual as they were, although other buckets were reduced first; the next step trains at the halved scale (every
    parameter moves, all finite). The residual's rescaling is the code ZeRO-2 shares (`zero_state.py`), checked
    against the conservation law in the ZeRO-2 test above."""
    out = tmp_path / "run"
    launch(2, ZERO3_WORKER, [out, "--fp16", "--model", "multi", "--steps", "4", "--nan-at", "2", "--nan-param",
                             "0.weight"])
    ranks = load_ranks(out, 2)
    for r in ranks:
        rec = r["records"]
        assert [x["scale"] for x in rec] == [256, 256, 256, 128]
        assert [x["ds_skipped"] for x in rec] == [0, 0, 1, 1] and rec[-1]["skipped_steps"] == 1
        assert torch.equal(rec[2]["residual"], rec[1]["residual"])
        for n in rec[2]["before"]:
            assert torch.equal(rec[2]["after"][n], rec[2]["before"][n]), n
            assert not torch.equal(rec[3]["after"][n], rec[3]["before"][n]), n
        assert float(rec[1]["residual"].norm()) > 0
        assert all(torch.isfinite(v).all() for v in rec[3]["after"].values())


def test_fp16_resume_keeps_the_residuals_units(scenario):
    """Saved after step 5, where DeepSpeed doubled the scale: the residuals are still in the old scale's units, and
    the checkpoint says so; the resumed step 6 rescales them as the uninterrupted run does, bit for bit."""
    full, resumed = scenario.ranks("full"), scenario.ranks("resumed")      # the resume's last --steps counts
    assert full[0]["records"][5]["scale_after"] == 2 * full[0]["records"][5]["scale"]
    for a, b in zip(full, resumed):
        assert torch.equal(a["residual"], b["residual"])
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), n
