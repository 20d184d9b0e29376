"""The DDP communication hook under real torchrun + gloo with 2 and 3 ranks."""

import pytest
import torch

import dsq_plugins as dsq
from .checks import (POLICY, assert_conservation, assert_equals_simulator, assert_policy_equals_simulator,
                     assert_same_update_everywhere)
from .conftest import ROOT, launch_cases, load_ranks
from .reference import reference

WORKER = ROOT / "tests" / "ddp_worker.py"


def run(torchrun, tmp_path, nproc, *args, name="run"):
    out = tmp_path / name
    torchrun(nproc, WORKER, [out, *args])
    return load_ranks(out, nproc)


SIM_CASES = [(3, "none,fp16,sign,topk:0.05,randomk:0.1,qsgd:4,int8:64", ()),
             (2, "sign,qsgd:4,grouptopk:0.1+sign,topk:0.1+int4", ()),
             (2, "sign", ("--no-server-ef",)), (2, "sign", ("--server-compressor", "none")),
             (2, "topk:0.05", ("--no-worker-ef", "--no-server-ef")), (2, "sign", ("--warmup", "3"))]
SIM_IDS = [f"{n}-{s}-{'_'.join(e)}" for n, s, e in SIM_CASES]
RESUME = ("--compressor", "sign", "--momentum", "0.9")
SAVED = ("--compressor", "sign", "--steps", "3", "--save-at", "3")        # the run the other resumes load


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """This file's two-rank runs, in one launch (`Cases`; in order: a resume follows the run it loads)."""
    tmp = tmp_path_factory.mktemp("ddp2")
    out = tmp / "cases"
    return launch_cases(tmp, 2, {
        "auto": ("--compressor", "auto", "--candidates", "sign;topk:0.1+int4", "--steps", "16"),
        "small-buckets": ("--compressor", "topk:0.1", "--steps", "6", "--momentum", "0.9", "--bucket-mb", "0.01"),
        "accumulation": ("--compressor", "topk:0.1", "--steps", "6", "--accum", "3"),
        **{f"sim-{i}": ("--model", "single", "--compressor", specs, "--steps", "6", *extra)
           for i, (n, specs, extra) in zip(SIM_IDS, SIM_CASES) if n == 2},
        "warmup": ("--compressor", "sign", "--warmup", "3", "--steps", "5"),
        "policy": ("--model", "roles", "--compressor", "topk:0.1", "--policy", POLICY, "--attach", "--guard", "0",
                   "--steps", "5", "--min-numel", "16"),
        "policy-pattern": ("--model", "roles", "--compressor", "sign", "--attach", "--policy", "blocks.*.attn.*=sign",
                           "--steps", "1"),
        "policy-role": ("--model", "roles", "--compressor", "sign", "--policy", "role:embedding=int8", "--steps", "1"),
        "full": (*RESUME, "--steps", "8", "--save-at", "4"),
        **{f"resumed-{how}": (*RESUME, "--load", out / "full", "--first-step", "4", "--steps", "4",
                              *(["--pickled"] if how == "pickled" else [])) for how in ("state_dict", "pickled")},
        "saved": SAVED,
        "other-config": ("--compressor", "topk:0.1", "--load", out / "saved", "--expect-load-error"),
    }, worker=WORKER)


@pytest.fixture(scope="module")
def three(tmp_path_factory, two):
    """The three-rank runs, in one launch (after `two`, whose saved states two of them load)."""
    return launch_cases(tmp_path_factory.mktemp("ddp3"), 3, {
        "rebuild": ("--compressor", "sign", "--steps", "10"),
        "many-buckets": ("--model", "deep", "--compressor", "sign", "--steps", "4", "--bucket-mb", "0.004"),
        "nan": ("--compressor", "sign", "--steps", "6", "--nan-at", "3", "--nan-rank", "1"),
        **{f"sim-{i}": ("--model", "single", "--compressor", specs, "--steps", "6", *extra)
           for i, (n, specs, extra) in zip(SIM_IDS, SIM_CASES) if n == 3},
        "saved": SAVED,
        "other-world": ("--compressor", "sign", "--load", two.out / "saved", "--load-rank", "0",
                        "--expect-load-error"),
        "resharded-from-2": ("--compressor", "sign", "--steps", "3", "--first-step", "3",
                             "--load", two.out / "saved", "--load-all"),
    }, worker=WORKER)


def test_conservation_across_bucket_rebuild(three):
    """3 ranks (2 ranks: test_bucket_layout_does_not_change_training)."""
    ranks = three.ranks("rebuild")
    assert all(r["buckets_seen"] >= 2 for r in ranks), "expected several DDP buckets"
    assert all(r["step"] == 10 and r["skipped_steps"] == 0 for r in ranks)
    assert any(r["worker_residual"] for r in ranks) and any(r["server_residual"] for r in ranks)
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks)


def test_auto_decides_the_same_on_every_rank_and_loses_nothing(two):
    """compressor="auto" on real step times: both ranks explore sign, topk:0.1+int4 and dense in the same order and
    choose the same (else their collectives would not match), and the conservation law holds across the switches
    (a bucket that goes dense sends its residuals along)."""
    ranks = two.ranks("auto")
    a, b = ranks[0]["auto"], ranks[1]["auto"]
    assert a["history"] == b["history"] and a["times"] == b["times"]
    modes = [m for _, m in a["history"]]
    assert modes[:3] == ["sign", "topk:0.1+int4", "dense"], a
    assert a["flushes"] > 0 and a["switches"] >= 2
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks)


def test_bucket_layout_does_not_change_training(torchrun, tmp_path, two):
    """Block semantics: the same run under DDP buckets of 10 kB (several, rebuilt after step 0) and of 25 MB (one)
    gives the same updates and weights; the state is built before init_process_group (Lightning's way)."""
    common = ["--compressor", "topk:0.1", "--steps", "6", "--momentum", "0.9"]
    small = two.ranks("small-buckets")
    one = run(torchrun, tmp_path, 2, *common, "--bucket-mb", "25", "--state-before-init", name="one")
    assert small[0]["buckets_seen"] >= 2 and one[0]["buckets_seen"] == 1
    for r in range(2):
        for t, (a, b) in enumerate(zip(small[r]["records"], one[r]["records"])):
            for name in a["c"]:
                torch.testing.assert_close(a["c"][name], b["c"][name], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"rank {r} step {t} {name}: {m}")
        for name, p in small[r]["params"].items():
            torch.testing.assert_close(p, one[r]["params"][name], rtol=1e-5, atol=1e-6)
    assert_conservation(one)


def test_many_buckets_do_not_deadlock(three):
    """24 tensors in buckets of 4 kB (a weight or two each), 3 ranks on gloo: the communication thread serves them
    all in order (torch's PowerSGD hook deadlocks on gloo with more than one bucket)."""
    ranks = three.ranks("many-buckets")
    assert ranks[0]["buckets_seen"] >= 8
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks)


def test_gradient_accumulation_with_no_sync(two):
    """Three micro-batches under no_sync: the hook runs once per optimiser step, on the accumulated gradient, and
    every parameter's update and residuals are the Simulator's for those gradients."""
    ranks = two.ranks("accumulation")
    assert all(r["step"] == 6 for r in ranks)
    config = dsq.DoubleSqueezeConfig(compressor="topk:0.1", min_numel=16, block_size=256)
    assert_equals_simulator(ranks, config, keys=ranks[0]["keys"], compressors=reference("topk:0.1"))
    assert_conservation(ranks)


@pytest.mark.parametrize("nproc,specs,extra", SIM_CASES, ids=SIM_IDS)
def test_hook_equals_simulator(request, nproc, specs, extra):
    """One parameter, buckets of blocks of 256: the hook's updates and residuals equal the Simulator's on the same
    per-rank gradients, for every compressor and baseline switch (one run per compressor)."""
    cases = request.getfixturevalue({2: "two", 3: "three"}[nproc])
    name = f"sim-{nproc}-{specs}-{'_'.join(extra)}"
    for spec in specs.split(","):
        ranks = load_ranks(cases.out / name / spec.replace(":", "_") if "," in specs else cases.out / name, nproc)
        check_against_simulator(ranks, nproc, spec, extra)


def check_against_simulator(ranks, nproc, spec, extra):
    cfg = dsq.DoubleSqueezeConfig(
        compressor=spec, min_numel=16, block_size=256,
        server_compressor="none" if "none" in extra else None,
        worker_ef="--no-worker-ef" not in extra, server_ef="--no-server-ef" not in extra,
        warmup_steps=3 if "--warmup" in extra else 0)
    # sign and top-k against plain-torch references (the others: the library's compressors, which
    # test_compressors.py checks against references of their own)
    refs = None
    if spec in ("sign", "topk:0.05"):
        worker, server = reference(spec)
        refs = (worker, cfg.server if "none" in extra else server)
    sim = dsq.Simulator(nproc, cfg, key=0, compressors=refs)
    for t, rec in enumerate(ranks[0]["records"]):
        grads = [ranks[r]["records"][t]["g"]["weight"] for r in range(nproc)]
        expected = sim.step(grads)
        torch.testing.assert_close(rec["c"]["weight"], expected, rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{spec} step {t}: {m}")
    zero = torch.zeros(2000)       # a lossless compressor (none) keeps no residual: it would stay zero
    if spec == "none":
        assert not any(r["worker_residual"] or r["server_residual"] for r in ranks)
    if cfg.worker_ef:
        for r in range(nproc):
            torch.testing.assert_close(ranks[r]["worker_residual"].get("weight", zero), sim.worker_errors[r],
                                       rtol=1e-6, atol=1e-7)
    if cfg.server_ef:
        server = sum(ranks[r]["server_residual"].get("weight", zero) for r in range(nproc))
        torch.testing.assert_close(server, sim.server_error, rtol=1e-6, atol=1e-7)
    if cfg.worker_ef and cfg.server_ef:
        assert_conservation(ranks)


def test_warmup_is_dense_then_compressed(two):
    ranks = two.ranks("warmup")
    for t, rec in enumerate(ranks[0]["records"][:3]):
        for name, c in rec["c"].items():
            mean = (ranks[0]["records"][t]["g"][name] + ranks[1]["records"][t]["g"][name]) / 2
            torch.testing.assert_close(c, mean)
    assert all(not s[0] for s in ranks[0]["snapshots"][:3]), "residuals appeared during warm-up"
    # After warm-up the update is compressed: sign gives one magnitude per block (256 elements, the worker's).
    c = ranks[0]["records"][4]["c"]["2.weight"]
    assert all(block.abs().unique().numel() == 1 for block in c.view(-1, 256))
    assert_conservation(ranks)


@pytest.mark.parametrize("how", ["state_dict", "pickled"])
def test_resume_is_bit_identical(two, how):
    full, resumed = two.ranks("full"), two.ranks(f"resumed-{how}")
    for r in range(2):
        assert resumed[r]["step"] == 8
        for name, p in full[r]["params"].items():
            assert torch.equal(p, resumed[r]["params"][name]), f"rank {r} {name} differs after resume"
        for name, e in full[r]["worker_residual"].items():
            assert torch.equal(e, resumed[r]["worker_residual"][name])


def test_state_from_other_world_size_or_config_is_refused(two, three):
    msg = (three.out / "other-world" / "error2.txt").read_text()
    assert "world_size=2" in msg and "world_size=3" in msg
    msg = (two.out / "other-config" / "error0.txt").read_text()
    assert "compressor" in msg and "sign" in msg and "topk:0.1" in msg


def _total(ranks, steps, key):
    """Per parameter, the sum over `steps` of the records' mean over ranks of `key` ("c" or "g")."""
    names = ranks[0]["records"][0]["c"]
    return {n: sum(sum(r["records"][t][key][n] for r in ranks) / len(ranks) for t in steps) for n in names}


@pytest.mark.parametrize("resumed_on", [3, 1])
def test_resume_on_another_number_of_ranks_keeps_the_residuals_mass(torchrun, tmp_path, two, three, resumed_on):
    """2 ranks save after step 3; `resumed_on` ranks resume from every rank's state (`load_resharded`) and train 3
    more steps. The mass the residuals held is delivered, not dropped: over both runs, the updates applied sum to
    the mean gradients minus the residuals at the end (the conservation law across the resume). Starting the
    residuals afresh breaks it by the saved residuals' mass."""
    saved = two.ranks("saved")
    if resumed_on == 3:
        resumed = three.ranks("resharded-from-2")
    else:
        resumed = run(torchrun, tmp_path, resumed_on, "--compressor", "sign", "--steps", "3", "--first-step", "3",
                      "--load", two.out / "saved", "--load-all", name="resumed")
    assert all(r["step"] == 6 for r in resumed)
    assert_same_update_everywhere(resumed)
    applied = {n: a + b for (n, a), b in zip(_total(saved, range(3), "c").items(),
                                            _total(resumed, range(3), "c").values())}
    true = {n: a + b for (n, a), b in zip(_total(saved, range(3), "g").items(),
                                         _total(resumed, range(3), "g").values())}
    mass = 0.0
    for n, c0 in applied.items():
        worker = sum(r["worker_residual"].get(n, torch.zeros_like(c0)) for r in resumed) / resumed_on
        server = sum(r["server_residual"].get(n, torch.zeros_like(c0)) for r in resumed)
        torch.testing.assert_close(applied[n], true[n] - worker - server, rtol=0, atol=1e-5 * (1 + float(
            true[n].abs().max())), msg=lambda m: f"conservation across the resume broken for {n}: {m}")
    for r in saved:
        mass += sum(float(e.abs().sum()) for e in r["worker_residual"].values())
    assert mass > 1.0, "the saved run held little residual: the test would not see it dropped"


def test_resharded_states_keep_the_mass_block_by_block(three):
    """`reshard_state_dicts` on 3 saved ranks' states, for 2, 4 and 3 ranks: every new rank's worker residual is
    the old mean; the new owners' server residuals, put in place, sum to the old sum block by block; 3 ranks get
    their own states back unchanged."""
    from dsq_plugins.engine.plan import expand_owned
    from dsq_plugins.engine.reshard import reshard_state_dicts
    old = [torch.load(three.out / "saved" / f"ckpt_rank{r}.pt", weights_only=False)["dsq"] for r in range(3)]
    B = old[0]["config"]["block_size"]
    numels = old[0]["numels"]
    old_server = {k: sum(expand_owned(k, sd["server_residuals"][k], numels[k], B, 3, r) for r, sd in enumerate(old)
                         if k in sd["server_residuals"]) for k in numels}
    assert any(float(s.abs().sum()) > 0 for s in old_server.values())
    for W in (2, 4):
        new = [reshard_state_dicts(list(reversed(old)), W, r) for r in range(W)]
        for k in old[0]["worker_residuals"]:
            mean = sum(sd["worker_residuals"][k] for sd in old) / 3
            for sd in new:
                torch.testing.assert_close(sd["worker_residuals"][k], mean, rtol=0, atol=0)
        for k, total in old_server.items():
            placed = sum(expand_owned(k, sd["server_residuals"][k], numels[k], B, W, r) for r, sd in enumerate(new))
            torch.testing.assert_close(placed, total, rtol=0, atol=0)
        assert all(sd["step"] == old[0]["step"] and sd["world_size"] == W for sd in new)
    assert [reshard_state_dicts(old, 3, r) for r in range(3)] == old
    with pytest.raises(ValueError, match="every rank of one run"):
        reshard_state_dicts(old[:2], 2, 0)


def test_nan_gradient_is_skipped_on_all_ranks(three):
    ranks = three.ranks("nan")
    for r in ranks:
        assert r["skipped_steps"] == 1 and r["totals"]["skipped"] >= 1
        assert all(torch.isnan(c).all() for c in r["records"][3]["c"].values()), "the skipped step must be NaN"
        before, after = r["snapshots"][2], r["snapshots"][3]
        for part in (0, 1):
            assert before[part].keys() == after[part].keys()
            for name in before[part]:
                assert torch.equal(before[part][name], after[part][name]), "a NaN step touched a residual"
        for s in r["snapshots"][3:]:
            assert all(torch.isfinite(e).all() for part in s for e in part.values())
    assert_conservation(ranks, steps=[0, 1, 2, 4, 5])


def test_policy_by_role_and_name_equals_simulator(two):
    """DoubleSqueezeConfig(policy=...) under DDP with the model attached: every parameter is compressed with the
    compressor its first matching rule names (by role: embedding, head, norm; by name: fc.weight), the others with
    the config's, each exactly as a Simulator with that compressor (plain-torch references for sign and top-k),
    residuals included; a "dense" rule sends the LayerNorm uncompressed (no residual)."""
    ranks = two.ranks("policy")
    report = ranks[0]["policy"]
    assert report["rules"] == [["role:embedding", "int8"], ["role:head", "topk:0.25"], ["role:norm", "dense"],
                               ["fc.weight", "sign"]]
    assert report["tensors"] == {"tok.weight": "int8", "head.weight": "topk:0.25", "ln.weight": "dense",
                                 "ln.bias": "dense", "fc.weight": "sign"}, report
    assert_policy_equals_simulator(ranks, keys=ranks[0]["keys"])
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks)


def test_policy_that_cannot_apply_is_refused_before_the_first_step(two):
    """A name pattern that matches no parameter, and a role that needs names without the model attached, fail at
    the first hook call, before anything is compressed, naming what to do."""
    two.refused("policy-pattern", "policy pattern 'blocks.*.attn.*' matches no parameter of the model")
    two.refused("policy-pattern", "tok.weight")
    two.refused("policy-role", "role 'embedding' needs the parameters' names")
    two.refused("policy-role", "DoubleSqueezeState(config, module=model)")
