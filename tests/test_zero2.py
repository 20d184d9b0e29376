"""DoubleSqueeze under DeepSpeed ZeRO-2, from the config section alone (stock `deepspeed.initialize` in
tests/ds_worker.py, 2 and 3 ranks, gloo). The reference is written here in plain torch: ZeRO-2's partitions of the
flat gradient, the worker pass per owner with the reference compressor block by block, SGD on the owner's exact
partition, and the delta downlink; the engine's applied updates are recovered from the weights."""
import json

import pytest
import torch

from .reference import sign, topk
from .test_deepspeed import run
from .conftest import ROOT, deepspeed_launch, launch_cases

WORKER = ROOT / "tests" / "ds_worker.py"
LR = 0.5
BLOCK = 256


def blockwise(fn, v: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(b) for b in v.split(BLOCK)]) if v.numel() else v.clone()


def uplink_reference(g, e, rows, fn=sign, stored=torch.float32):
    """One step of the worker pass to the owners: ``rows[r]`` are the elements rank r owns; each other rank sends it
    ``fn(g_i + e_i)`` block by block and keeps the rest in ``e_i`` (updated in place, rounded to `stored`). Returns
    the owners' means."""
    W = len(g)
    avg = torch.zeros_like(g[0])
    for r, own in enumerate(rows):
        acc = g[r][own] + e[r][own]
        for i in range(W):
            if i != r:
                v = g[i][own] + e[i][own]
                c = blockwise(fn, v)
                e[i][own] = (v - c).to(stored).float()
                acc += c
        avg[own] = acc / W
    return avg


def reference_zero2(ranks, w0: torch.Tensor, fn=sign, stored=torch.float32, up_at=None):
    """Per step, the update ``(x_hat_before - x_hat_after) / LR`` of one flat parameter, and at the end the worker
    residuals (per rank, padded flat), the exact parameters and the copy. The uplink carries the gradients'
    elements (DeepSpeed's buckets hold no padding); the downlink, each owner's whole partition. `up_at(t)`, if given,
    is the uplink's compressor at step t (the downlink keeps `fn`), or None for a dense step (auto's dense mode: the
    mean of ``g_i + e_i``, the worker residuals emptied, and DeepSpeed's exact all-gather)."""
    W, n = len(ranks), ranks[0]["partition_size"][0]
    d = w0.numel()
    pad = lambda t: torch.cat([t, torch.zeros(W * n - d)])
    x, x_hat = pad(w0.clone()), pad(w0.clone())
    e = [torch.zeros(W * n) for _ in range(W)]
    updates = []
    for t in range(len(ranks[0]["records"])):
        g = [pad(r["records"][t]["g"]["weight"]) for r in ranks]
        up = fn if up_at is None else up_at(t)
        before = x_hat.clone()
        if up is None:
            avg = sum(gi + ei for gi, ei in zip(g, e)) / W
            e = [torch.zeros_like(ei) for ei in e]
            x = x - LR * avg
            x_hat = x.clone()
            updates.append(((before - x_hat) / LR)[:d])
            continue
        avg = uplink_reference(g, e, [slice(r * n, min((r + 1) * n, d)) for r in range(W)], up, stored)
        x = x - LR * avg
        for r in range(W):
            rows = slice(r * n, (r + 1) * n)
            x_hat[rows] += blockwise(fn, x[rows] - x_hat[rows])
        updates.append(((before - x_hat) / LR)[:d])
    return updates, e, x, x_hat


def initial_weight():
    from .workload import build_model
    return build_model("single").weight.detach().reshape(-1).clone()


@pytest.mark.parametrize("nproc", [2, 3])
def test_zero2_equals_the_plain_torch_reference_on_both_passes(torchrun, tmp_path, nproc):
    """One 40x50 weight in DeepSpeed's ZeRO-2 partitions, sign in blocks of 256: every step's applied update, the
    worker residuals and the owners' residuals equal the reference; every rank holds the same parameters; the
    conservation law holds; the bytes the collectives moved are under an eighth of stock's."""
    ranks, _ = run(torchrun, tmp_path, nproc, "--stage", "2", "--model", "single", "--steps", "5",
                   "--dsq", '{"guard": 0}')
    w0 = initial_weight()
    updates, e, x, x_hat = reference_zero2(ranks, w0)
    W, n = nproc, ranks[0]["partition_size"][0]
    for t, want in enumerate(updates):
        for r in ranks:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], want, rtol=1e-4, atol=1e-5)
    for i, r in enumerate(ranks):
        torch.testing.assert_close(r["residual"], e[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["server_residuals"]["group0"], (x - x_hat)[i * n:(i + 1) * n], rtol=1e-4, atol=1e-5)
        assert torch.equal(r["params"]["weight"], ranks[0]["params"]["weight"])
        assert r["step"] == 5 and r["skipped_steps"] == 0
    # conservation: what the model holds plus every residual is dense SGD on the mean gradient
    d = w0.numel()
    mean_g = sum(sum(r["records"][t]["g"]["weight"] for r in ranks) / W for t in range(5))
    held = ranks[0]["params"]["weight"].reshape(-1) + torch.cat([r["server_residuals"]["group0"] for r in ranks])[:d]
    worker = sum(r["residual"] for r in ranks)[:d] / W
    torch.testing.assert_close(held - LR * worker, w0 - LR * mean_g, rtol=1e-4, atol=1e-5)
    assert float(sum(r["residual"] for r in ranks).abs().sum()) > 0       # error feedback did keep something
    for r in ranks:
        t = r["totals"]
        stock = 2 * (W - 1) * n * 4 * 5            # reduce-scatter + all-gather of fp32, five steps
        assert t["bytes_up_sent"] + t["bytes_down_sent"] < stock / 8, t
        assert t["bytes_down_sent"] > 0 and t["bytes_up_sent"] > 0


LOSSLESS = {"plain": (), "overlap_comm": ("--overlap-comm",), "no-contiguous": ("--no-contiguous",),
            "overlap_comm+no-contiguous": ("--overlap-comm", "--no-contiguous"), "bf16": ("--bf16",),
            "bf16+fp32-accumulation": ("--bf16", "--fp32-accum"),
            "bf16+fp32-accumulation+no-contiguous": ("--bf16", "--fp32-accum", "--no-contiguous")}
REFUSALS = {
    "server_ef": ('{"server_ef": false}', "server_ef false"),
    "policy": ('{"policy": {"role:norm": "dense"}}', "a per-parameter policy"),
    "param_compressor": ('{"param_compressor": "int4"}', '"param_compressor" compresses ZeRO-3\'s parameter gathers'),
    "residual_dtype-under-zero1": ('{"residual_dtype": "bf16", "stage": 1}',
                                   '"residual_dtype" stores ZeRO-2/3\'s worker residual'),
}


def _refusal_args(dsq: str):
    section = json.loads(dsq)
    stage = str(section.pop("stage", 2))
    return ("--stage", stage, "--dsq", json.dumps(section))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """The two-rank runs of this file's tests but the reference's and the guard's, in one launch (`Cases`)."""
    return launch_cases(tmp_path_factory.mktemp("zero2"), 2, {
        "bf16-residual": ("--stage", "2", "--model", "single", "--steps", "5",
                          "--dsq", '{"guard": 0, "residual_dtype": "bf16"}'),
        "nan": ("--stage", "2", "--model", "single", "--steps", "3", "--nan-at", "2", "--dsq", '{"guard": 0}'),
        "auto": ("--stage", "2", "--model", "single", "--steps", "10",
                 "--dsq", '{"guard": 0, "compressor": "auto", "candidates": "sign"}'),
        **{f"lossless-{k}": ("--stage", "2", "--model", "multi", "--compressor", "none", "--steps", "3",
                             "--bucket", "64", "--dsq", '{"guard": 0}', *args) for k, args in LOSSLESS.items()},
        **{f"refused-{k}": _refusal_args(dsq) for k, (dsq, _) in REFUSALS.items()}}, worker=WORKER)


def test_zero2_bf16_residual_equals_the_reference_and_halves_its_memory(cases):
    """``"residual_dtype": "bf16"``: the worker residual is stored in bfloat16 (the compensation runs in fp32): every
    step's update equals the reference whose residual is rounded to bfloat16 after each update, and the residual
    takes 2 bytes per element."""
    ranks = cases.ranks("bf16-residual")
    updates, e, x, x_hat = reference_zero2(ranks, initial_weight(), stored=torch.bfloat16)
    for t, want in enumerate(updates):
        for r in ranks:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], want, rtol=1e-4, atol=1e-5)
    for i, r in enumerate(ranks):
        assert r["residual"].dtype == torch.bfloat16
        torch.testing.assert_close(r["residual"].float(), e[i], rtol=0, atol=0)
        assert r["memory"]["worker_residual"] == 2 * r["residual"].numel()
    assert float(ranks[0]["residual"].float().abs().sum()) > 0


def test_zero2_auto_runs_both_modes_and_loses_nothing(cases):
    """``"compressor": "auto"`` (candidate sign) under ZeRO-2: every rank takes the same mode at every step, and in
    10 steps auto has run both (it explores the candidate, then dense). Each step's update equals the plain-torch
    reference run in the recorded modes: a dense step delivers the mean of ``g_i + e_i`` (the worker residuals go
    along and are emptied) through DeepSpeed's own collectives, whose all-gather makes the copy exact; the
    residuals and the parameters at the end equal the reference's."""
    ranks = cases.ranks("auto")
    modes = [rec["uplink"] for rec in ranks[0]["records"]]
    assert all([rec["uplink"] for rec in r["records"]] == modes for r in ranks)
    assert modes[0] == "sign" and "dense" in modes, modes
    w0 = initial_weight()
    updates, e, x, x_hat = reference_zero2(ranks, w0, up_at=lambda t: None if modes[t] == "dense" else sign)
    for t, want in enumerate(updates):
        for r in ranks:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"step {t} ({modes[t]}): {m}")
    n = ranks[0]["partition_size"][0]
    for i, r in enumerate(ranks):
        torch.testing.assert_close(r["residual"], e[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r["server_residuals"]["group0"], (x - x_hat)[i * n:(i + 1) * n], rtol=1e-4,
                                   atol=1e-5)
        first_dense = modes.index("dense")
        assert float(r["records"][first_dense - 1]["residual"].abs().sum()) > 0      # sign left something ...
        assert not r["records"][first_dense]["residual"].any()                      # ... the dense step sent it
        assert r["auto_history"][0][1] == "sign" and any(m == "dense" for _, m in r["auto_history"])


def test_zero2_quality_guard_moves_the_uplink_and_loses_nothing(torchrun, tmp_path):
    """The quality guard under ZeRO-2, set so strict (0.999 of sign's nominal contraction) that sign fails it: after
    the first sampled step every rank moves the uplink to the fallback `topk:0.1` at the same step, with a
    QualityWarning. The updates equal the plain-torch reference that switches at the guard's recorded steps, and
    the conservation law holds across the switch (the residual carries over)."""
    ranks, proc = run(torchrun, tmp_path, 2, "--stage", "2", "--model", "single", "--steps", "5",
                      "--dsq", '{"guard": 0.999, "fallback": "topk:0.1"}')
    assert "quality guard moved" in proc.stderr and "the gradient uplink" in proc.stderr
    switches = ranks[0]["guard_switches"]
    assert switches == ranks[1]["guard_switches"] and switches[0][:2] == [1, "topk:0.1"], switches
    dense_from = switches[1][0] if len(switches) > 1 else 10 ** 9
    ref = {"sign": sign, "topk:0.1": topk(0.1)}
    w0 = initial_weight()
    updates, e, x, x_hat = reference_zero2(
        ranks, w0, up_at=lambda t: sign if t < 1 else (ref["topk:0.1"] if t < dense_from else (lambda v: v.clone())))
    for t, want in enumerate(updates):
        for r in ranks:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], want, rtol=1e-4, atol=1e-5)
    for i, r in enumerate(ranks):
        torch.testing.assert_close(r["residual"], e[i], rtol=1e-4, atol=1e-5)
    d = w0.numel()
    mean_g = sum(sum(r["records"][t]["g"]["weight"] for r in ranks) / 2 for t in range(5))
    held = ranks[0]["params"]["weight"].reshape(-1) + torch.cat([r["server_residuals"]["group0"] for r in ranks])[:d]
    worker = sum(r["residual"] for r in ranks)[:d] / 2
    torch.testing.assert_close(held - LR * worker, w0 - LR * mean_g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting", list(LOSSLESS))
def test_zero2_lossless_is_stock_with_many_buckets(cases, setting):
    """The lossless compressor `none` through buckets of 64 elements (each parameter's gradient split across owners
    and buckets, a parameter larger than a bucket): the update is plain SGD on the mean of the ranks' reference
    gradients, with DeepSpeed's overlap_comm and contiguous_gradients on and off, and in bf16 (with DeepSpeed's
    fp32 gradient accumulation too, where it keeps an fp32 partition buffer; the tolerance is bf16's weights')."""
    args = LOSSLESS[setting]
    ranks = cases.ranks(f"lossless-{setting}")
    tol = dict(rtol=2e-2, atol=1e-2) if "--bf16" in args else dict(rtol=1e-5, atol=1e-6)
    for t in range(3):
        for name in ranks[0]["records"][t]["g"]:
            mean = (ranks[0]["records"][t]["g"][name] + ranks[1]["records"][t]["g"][name]) / 2
            for r in ranks:
                torch.testing.assert_close(r["records"][t]["c"][name], mean, **tol)
    assert ranks[0]["totals"]["compressed_buckets"] > 3 * 3      # several buckets per step went through ours


def test_zero2_accumulation_warmup_and_resume_under_the_deepspeed_launcher(tmp_path):
    """Under the deepspeed launcher, 2 micro-steps per step and 2 warm-up steps: warm-up moves stock's bytes, then
    compressed ones; a run resumed from engine.save_checkpoint at step 4 continues bit for bit (parameters, both
    residuals, the copy)."""
    common = ("--stage", "2", "--model", "multi", "--accum", "2", "--dsq", '{"guard": 0, "warmup_steps": 2}')
    runs = launch_cases(tmp_path, 2, {
        "full": (*common, "--steps", "6", "--save-at", "4"),
        "resumed": (*common, "--steps", "2", "--first-step", "4", "--load", tmp_path / "cases" / "full" / "ckpt")},
        worker=WORKER, launcher=deepspeed_launch)
    full, resumed = runs.ranks("full"), runs.ranks("resumed")
    for a, b in zip(full, resumed):
        assert b["step"] == 6
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
        assert torch.equal(a["residual"], b["residual"])
        for x, y in zip(a["replica_rows"] + list(a["server_residuals"].values()), b["replica_rows"] + list(b["server_residuals"].values())):
            assert torch.equal(x, y)
    # warm-up steps are stock SGD on the mean gradient; later ones are not (sign)
    for t in range(2):
        for name, g0 in full[0]["records"][t]["g"].items():
            mean = (g0 + full[1]["records"][t]["g"][name]) / 2
            torch.testing.assert_close(full[0]["records"][t]["c"][name], mean, rtol=1e-5, atol=1e-6)
    assert float(full[0]["residual"].abs().sum()) > 0


@pytest.mark.parametrize("setting", list(REFUSALS))
def test_zero2_what_it_cannot_honour_is_refused_before_training(cases, setting):
    cases.refused(f"refused-{setting}", REFUSALS[setting][1], marker="refused")


def test_zero2_a_nan_on_one_rank_leaves_every_residual_as_it_was(cases):
    """Rank 1's gradients are NaN at step 2: on both ranks the step is counted as skipped and the worker residual
    after it is the one before it, bit for bit (nothing of the NaN enters it; the gradients reduce to NaN, as stock
    DeepSpeed's would)."""
    ranks = cases.ranks("nan")
    for r in ranks:
        rec = r["records"]
        assert rec[1]["skipped_steps"] == 0 and rec[2]["skipped_steps"] == 1
        assert float(rec[1]["residual"].abs().sum()) > 0
        assert torch.equal(rec[2]["residual"], rec[1]["residual"])
