"""The DeepSpeed integration with real multi-process DeepSpeed (gloo, CPU) under torchrun and the deepspeed
launcher, 2 and 3 ranks. Updates are recovered from the weights and compared with the Simulator run on
gradients that plain torch computes on a copy of the model."""
import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import deepspeed_ext
import dsq_plugins as dsq
from dsq_plugins.config import DEFAULT_CANDIDATES
from deepspeed_ext.config import read_section

from .checks import (POLICY, VALID_NAMES, assert_conservation, assert_policy_equals_simulator,
                     assert_same_update_everywhere)
from .conftest import ROOT, Cases, deepspeed_launch, launch_cases, load_ranks

WORKER = ROOT / "tests" / "ds_worker.py"
EXAMPLE = ROOT / "examples" / "deepspeed_digits.py"
EXAMPLE_CONFIG = ROOT / "examples" / "ds_config_doublesqueeze.json"


def run(torchrun, tmp_path, nproc, *args, name="run", launcher=None, **kw):
    out = tmp_path / name
    proc = (launcher or torchrun)(nproc, WORKER, [out, *args], **kw)
    return (load_ranks(out, nproc) if (out / "rank0.pt").exists() else None), proc


# The two-rank cases of this file's tests, in one launch (`conftest.Cases`)
REFUSALS = {"zero1-overlap_comm": (("--stage", "1", "--overlap-comm"),
                                   "does not support zero_optimization.overlap_comm"),
            "zero0-fp16": (("--stage", "0", "--fp16"), "fp16 at ZeRO stage 0 (DeepSpeed does not scale the loss there")}
AVERAGING = {"predivide": (("--predivide", "4"), 1.0), "prescale": (("--prescale",), 1.0), "sum": (("--sum",), 2.0)}
TWO_RANK_CASES = {
    "stage0-sign": ("--model", "single", "--compressor", "sign", "--steps", "5"),
    "auto": ("--model", "single", "--compressor", "auto", "--steps", "18"),
    "policy": ("--model", "roles", "--compressor", "topk:0.1", "--steps", "4",
               "--dsq", json.dumps({"policy": POLICY, "guard": 0})),
    "policy-bad": ("--model", "roles", "--compressor", "sign", "--steps", "1",
                   "--dsq", json.dumps({"policy": {"blocks.*": "int8"}})),
    **{f"averaging-{k}": ("--model", "single", "--steps", "3", *option) for k, (option, _) in AVERAGING.items()},
    "clip": ("--model", "single", "--steps", "3", "--clip", "0.05"),
    "bf16-zero1": ("--stage", "1", "--bf16", "--steps", "4"),
    "stock": ("--model", "single", "--compressor", "stock", "--steps", "2"),
    # last: the fp16 case answers DeepSpeed's fp16 capability query for the rest of the process
    **{f"refused-{k}": args for k, (args, _) in REFUSALS.items()},
}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Cases:
    tmp = tmp_path_factory.mktemp("ds2")
    return launch_cases(tmp, 2, {
        # the resumes: in order, each after the run it loads
        "zero0-accumulation": ("--stage", "0", "--accum", "2"),
        "resume-full": ("--stage", "1", "--steps", "6", "--save-at", "3"),
        "resume-resumed": ("--stage", "1", "--steps", "3", "--first-step", "3", "--load",
                           tmp / "cases" / "resume-full" / "ckpt"),
        "zero0-saved": ("--stage", "0", "--steps", "2", "--save-at", "2"),
        **TWO_RANK_CASES}, worker=WORKER)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory, two_ranks) -> Cases:
    tmp = tmp_path_factory.mktemp("ds3")
    return launch_cases(tmp, 3, {
        "stage0-sign": ("--model", "single", "--compressor", "sign", "--steps", "5"),
        "stage0-topk:0.05": ("--model", "single", "--compressor", "topk:0.05", "--steps", "5"),
        "zero1-accumulation": ("--stage", "1", "--accum", "3", "--steps", "4", "--tensorboard", tmp / "tb",
                               "--explicit"),
        "zero0-resumed-from-2": ("--stage", "0", "--steps", "2", "--first-step", "2", "--load",
                                 two_ranks.out / "zero0-saved" / "ckpt")}, worker=WORKER)


def simulate(ranks, cfg, name="weight", scale=1.0):
    """The Simulator's updates (times `scale`) on the ranks' reference gradients (the workers use blocks of 256)."""
    w = len(ranks)
    sim = dsq.Simulator(w, dataclasses.replace(cfg, block_size=256), key=name)
    return [scale * sim.step([r["records"][t]["g"][name] for r in ranks]) for t in range(len(ranks[0]["records"]))]


# -- the config section, in one process ------------------------------------------------------------------------

@pytest.mark.parametrize("section,message", [
    ({"enabled": True, "compresor": "sign"},
     "compresor: Extra inputs are not permitted. Valid keys: enabled, compressor"),
    ({"enabled": True, "compressor": "bogus"}, VALID_NAMES),
    ({"enabled": True, "warmup_steps": -1}, "warmup_steps: Input should be greater than or equal to 0"),
    ({"enabled": True, "bucket_mb": 0}, "bucket_mb"),
    ({"enabled": "maybe"}, "enabled: Input should be a valid boolean"),
    ("sign", 'must be an object'),
    ({"enabled": True, "compressor": "sign", "candidates": "topk"}, "candidates is for compressor='auto'"),
    ({"enabled": True, "compressor": "auto", "candidates": "sign,bogus"}, "unknown compressor 'bogus'"),
    ({"enabled": True, "policy": {"role:embeding": "int8"}}, "unknown role 'embeding' in policy selector"),
    ({"enabled": True, "policy": "role:norm=bogus"}, VALID_NAMES),
])
def test_bad_section_is_refused_before_the_engine_is_built(section, message, tmp_path):
    with pytest.raises(ValueError) as err:
        read_section({"doublesqueeze": section})
    assert message in str(err.value)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "doublesqueeze": section}))
    with pytest.raises(ValueError) as err:      # fails before deepspeed.initialize touches anything
        deepspeed_ext.initialize(model=nn.Linear(2, 2), config=str(path))
    assert message in str(err.value)


def test_section_absent_or_disabled_means_stock():
    assert read_section({"train_batch_size": 8}) is None
    assert read_section({"doublesqueeze": {"enabled": False}}) is None
    with pytest.warns(UserWarning, match="is ignored"):
        assert read_section({"doublesqueeze": {"enabled": False, "compressor": "sign"}}) is None
    cfg = read_section({"doublesqueeze": {"enabled": True, "compressor": "topk:0.01"}}).to_config()
    assert cfg == dsq.DoubleSqueezeConfig(compressor="topk:0.01")


# -- real multi-process DeepSpeed --------------------------------------------------------------------------------

@pytest.mark.parametrize("nproc,spec", [(2, "sign"), (3, "sign"), (3, "topk:0.05")])
def test_stage0_equals_simulator_and_conserves(request, nproc, spec):
    ranks = request.getfixturevalue({2: "two_ranks", 3: "three_ranks"}[nproc]).ranks(f"stage0-{spec}")
    cfg = dsq.DoubleSqueezeConfig(compressor=spec, min_numel=16)
    for t, expected in enumerate(simulate(ranks, cfg)):
        for r in ranks:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], expected, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {t}: {m}")
    assert all(r["step"] == 5 and r["optimizer"] == "SGD" for r in ranks)
    assert_conservation(ranks)
    t = ranks[0]["totals"]
    assert t["bytes_up_sent"] + t["bytes_down_sent"] < t["dense_bytes"] / 4


def test_auto_from_the_config_section(two_ranks):
    """"compressor": "auto" in the section (which DeepSpeed's own config models would drop as the Trainer's
    placeholder): measured choices, the same on both ranks, nothing lost across the switches."""
    ranks = two_ranks.ranks("auto")
    assert ranks[0]["config"]["compressor"] == "auto"
    assert ranks[0]["auto"]["history"] == ranks[1]["auto"]["history"]
    modes = DEFAULT_CANDIDATES.split(",") + ["dense"]
    assert [m for _, m in ranks[0]["auto"]["history"]][:len(modes)] == modes
    assert ranks[0]["auto"]["flushes"] > 0
    assert_conservation(ranks)


def test_policy_from_the_config_section(two_ranks):
    """"policy" in the section: roles from the engine's module (embedding, head, norm) and a name pattern, each
    parameter exactly as a Simulator with its rule's compressor; a pattern that matches no parameter fails at
    install, before the first step, naming the parameters."""
    ranks = two_ranks.ranks("policy")
    assert_policy_equals_simulator(ranks)
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks)
    two_ranks.refused("policy-bad", "policy pattern 'blocks.*' matches no parameter of the model")


def test_zero1_under_deepspeed_launcher_matches_zero0_under_torchrun(torchrun, tmp_path, two_ranks):
    """Same gradients, same updates: ZeRO 1 (optimizer partitions, the config as a file, launched by
    `deepspeed`) ends with the weights of ZeRO 0 (torchrun), bit for bit."""
    zero0 = two_ranks.ranks("zero0-accumulation")
    zero1, _ = run(torchrun, tmp_path, 2, "--stage", "1", "--accum", "2", "--config-file", name="zero1",
                   launcher=deepspeed_launch)
    assert zero1[0]["optimizer"] == "DeepSpeedZeroOptimizer" and zero1[0]["step"] == 6
    for a, b in zip(zero0, zero1):
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
    assert_conservation(zero1, atol=2e-5)


def test_accumulation_monitor_and_three_ranks_zero1(three_ranks):
    """3 ranks, ZeRO 1, 3 micro-batches per step, through the explicit deepspeed_ext.initialize: one exchange per
    optimizer step; the metrics land in DeepSpeed's own TensorBoard output beside its tags."""
    tb = three_ranks.out.parent / "tb"
    ranks = three_ranks.ranks("zero1-accumulation")
    assert all(r["step"] == 4 for r in ranks)
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks, atol=2e-5)
    events = EventAccumulator(str(tb / "job"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert "Train/Samples/lr" in tags
    for tag in ("bytes_up", "bytes_down", "compression_ratio", "worker_residual_norm", "server_residual_norm",
                "worker_rel_error", "skipped_steps"):
        assert f"dsq/{tag}" in tags
    samples = [e.step for e in events.Scalars("dsq/bytes_up")]
    assert samples == [8 * 3 * 3 * k for k in range(1, 5)]        # x-axis: DeepSpeed's global samples


@pytest.mark.parametrize("setting", list(AVERAGING))
def test_averaging_settings_as_in_deepspeed(two_ranks, setting):
    """gradient_predivide_factor and prescale_gradients only move the scaling (same average); the "sum"
    all-reduce op gives W times the average."""
    scale = AVERAGING[setting][1]
    ranks = two_ranks.ranks(f"averaging-{setting}")
    for t, expected in enumerate(simulate(ranks, dsq.DoubleSqueezeConfig(compressor="sign", min_numel=16),
                                          scale=scale)):
        torch.testing.assert_close(ranks[0]["records"][t]["c"]["weight"], expected, rtol=1e-5, atol=1e-6)


def test_clipping_applies_to_the_decompressed_average(two_ranks):
    ranks = two_ranks.ranks("clip")
    for t, c in enumerate(simulate(ranks, dsq.DoubleSqueezeConfig(compressor="sign", min_numel=16))):
        expected = c * min(1.0, 0.05 / (float(c.norm()) + 1e-6))
        assert float(c.norm()) > 0.05
        torch.testing.assert_close(ranks[0]["records"][t]["c"]["weight"], expected, rtol=1e-4, atol=1e-6)


def test_bf16_gradients(two_ranks):
    """bf16 parameters and gradients under ZeRO 1: residuals in float32, and every step's update close to the
    Simulator's on the fp32 reference gradients (bf16 rounding of the gradients and of the weights apart: the
    same direction, within 10% in norm, and far from the zero update a hook that kept everything would give). The
    rounding flips the sign of the odd element near zero: one flip of a 64-element bias costs 0.03 of cosine, so the
    bound is 0.9."""
    ranks = two_ranks.ranks("bf16-zero1")
    assert all(r["step"] == 4 and r["skipped_steps"] == 0 for r in ranks)
    assert_same_update_everywhere(ranks)
    assert all(e.dtype == torch.float32 for r in ranks for e in r["worker_residual"].values())
    assert all(torch.isfinite(p).all() for r in ranks for p in r["params"].values())
    cfg = dsq.DoubleSqueezeConfig.from_dict(ranks[0]["config"])
    for name in ranks[0]["records"][0]["c"]:
        sim = dsq.Simulator(2, cfg, key=name)
        for t, rec in enumerate(ranks[0]["records"]):
            expected = sim.step([r["records"][t]["g"][name] for r in ranks]).double()
            got = rec["c"][name].double()
            cos = float(got @ expected) / (float(got.norm() * expected.norm()) + 1e-30)
            assert cos > 0.9, f"{name} step {t}: cosine {cos:.3f} with the Simulator's update"
            assert abs(float(got.norm()) / float(expected.norm()) - 1) < 0.1, (name, t)


def test_stock_when_section_absent(two_ranks):
    ranks = two_ranks.ranks("stock")
    assert not ranks[0]["dsq"]
    mean = (ranks[0]["records"][0]["g"]["weight"] + ranks[1]["records"][0]["g"]["weight"]) / 2
    torch.testing.assert_close(ranks[0]["records"][0]["c"]["weight"], mean, rtol=1e-5, atol=1e-6)


def test_checkpoint_resume_is_exact_and_on_another_world_size_keeps_the_mass(two_ranks, three_ranks):
    """ZeRO 1 resumes bit for bit on as many ranks. At ZeRO 0 (where DeepSpeed loads a checkpoint on another number
    of ranks) 3 ranks resume from 2 ranks' files with the residuals redistributed: the conservation law holds across
    the resume (the updates of both runs sum to their mean gradients minus the residuals at the end)."""
    full, resumed = two_ranks.ranks("resume-full"), two_ranks.ranks("resume-resumed")
    for a, b in zip(full, resumed):
        assert b["step"] == 6
        for kind in ("params", "worker_residual", "server_residual"):
            for name in a[kind]:
                assert torch.equal(a[kind][name], b[kind][name]), (kind, name)
    zero0 = two_ranks.ranks("zero0-saved")
    three = three_ranks.ranks("zero0-resumed-from-2")
    assert "residuals start from zero" not in three_ranks.proc.stderr
    assert all(r["step"] == 4 for r in three)
    for name, c0 in three[0]["records"][0]["c"].items():
        applied = sum(run_["records"][t]["c"][name] for run_ in (zero0[0], three[0]) for t in range(2))
        true = sum(sum(r["records"][t]["g"][name] for r in ranks) / len(ranks) for ranks in (zero0, three)
                   for t in range(2))
        worker = sum(r["worker_residual"].get(name, torch.zeros_like(c0)) for r in three) / 3
        server = sum(r["server_residual"].get(name, torch.zeros_like(c0)) for r in three)
        torch.testing.assert_close(applied, true - worker - server, rtol=0, atol=2e-5 * (1 + float(true.abs().max())))
    assert sum(float(e.abs().sum()) for r in zero0 for e in r["worker_residual"].values()) > 1.0


@pytest.mark.parametrize("setting", list(REFUSALS))
def test_a_section_the_engine_cannot_honour_fails_before_training(two_ranks, setting):
    """A script that calls deepspeed.initialize with the section on a stage or setting it does not fit: the reason
    is raised from deepspeed.initialize itself (NotImplementedError), before any step; nothing trains dense."""
    two_ranks.refused(f"refused-{setting}", REFUSALS[setting][1], marker="refused")
    assert two_ranks.failure(f"refused-{setting}").startswith("NotImplementedError")


def test_section_with_settings_but_not_enabled_warns():
    with pytest.warns(UserWarning, match='ignored because it does not say "enabled": true'):
        assert read_section({"doublesqueeze": {"compressor": "sign"}}) is None


def test_example_sign_within_two_points_of_stock(torchrun, tmp_path):
    out = tmp_path / "results.json"
    deepspeed_launch(2, EXAMPLE, ["--deepspeed_config", EXAMPLE_CONFIG, "--compare-stock", "--json", out],
                     timeout=400)
    results = json.loads(out.read_text())
    stock, sign = results["stock"], results["doublesqueeze"]
    assert stock["accuracy"] > 0.95
    assert sign["accuracy"] >= stock["accuracy"] - 0.02, (sign["accuracy"], stock["accuracy"])
    # sign sends 1/31 of the bytes; late in training, when the model has converged and its gradients are sparse,
    # the quality guard moves the layers on which sign stops contracting to int4:128 (6.8x): 10-12x in all
    assert stock["mb_sent_per_worker"] / sign["mb_sent_per_worker"] > 8
