"""The Horovod integration under real horovodrun (Gloo) with 2 and 3 ranks, and its launcher flag."""
import json
import os
import subprocess
import sys

import horovod.torch.compression as hvd_compression
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dsq_plugins as dsq
from dsq_plugins.config import DEFAULT_CANDIDATES
import horovod_ext
from horovod_ext.launcher import split_argv

from .checks import (POLICY, VALID_NAMES, assert_conservation, assert_equals_simulator, assert_policy_equals_simulator,
                     assert_same_update_everywhere)
from .reference import reference
from .conftest import ROOT, horovodrun as launch_horovod, launch_cases, load_ranks

WORKER = ROOT / "tests" / "hvd_worker.py"
EXAMPLE = ROOT / "examples" / "horovod_digits.py"


def run(horovodrun, tmp_path, nproc, *args, name="run", tags=("sign",), **kw):
    out = tmp_path / name
    horovodrun(nproc, WORKER, [out, *args], **kw)
    return {tag: load_ranks(out, nproc, f"{tag}_rank") for tag in tags}


SIM_CASES = [(3, "none,fp16,sign,topk:0.05,randomk:0.1,qsgd:4,int8:64", ()),
             (2, "sign,qsgd:4", ()), (2, "sign", ("--no-server-ef",)), (2, "sign", ("--server-compressor", "none")),
             (2, "topk:0.05", ("--no-worker-ef", "--no-server-ef")), (2, "sign", ("--warmup", "3"))]
SIM_IDS = [f"{n}-{s}-{'_'.join(e)}" for n, s, e in SIM_CASES]
OVER_BUCKETS = ("--compressors", "sign", "--steps", "8", "--nan-at", "4", "--momentum", "0.9")
RESUME = ("--compressors", "sign", "--momentum", "0.9")
OPTIONS = {"op_sum": ("--op", "sum"), "predivide": ("--predivide", "4")}


def sim_case(nproc):
    return {f"sim-{i}": ("--model", "single", "--compressors", specs, "--steps", "6", *extra)
            for i, (n, specs, extra) in zip(SIM_IDS, SIM_CASES) if n == nproc}


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """This file's two-rank runs of tests/hvd_worker.py in one horovodrun launch (`Cases`; in order: the resume
    follows the run it loads)."""
    tmp = tmp_path_factory.mktemp("hvd2")
    return launch_cases(tmp, 2, {
        "over-buckets": OVER_BUCKETS, **sim_case(2),
        "policy": ("--model", "roles", "--compressors", "topk:0.1", "--policy", POLICY, "--steps", "4"),
        **{k: ("--model", "single", "--compressors", "sign", "--steps", "4", *option) for k, option in OPTIONS.items()},
        "accumulation": ("--compressors", "topk:0.1", "--steps", "5", "--accum", "3"),
        "auto": ("--compressors", "auto", "--steps", "18"),
        "full": (*RESUME, "--steps", "8", "--save-at", "4"),
        "resumed": (*RESUME, "--steps", "4", "--first-step", "4", "--load", tmp / "cases" / "full"),
        "stock-sign": ("--mode", "stock", "--compressors", "sign"),
        "stock-fp16": ("--mode", "stock", "--compressors", "fp16", "--steps", "3"),
        "plain-flag": ("--mode", "flag", "--steps", "3"),
    }, worker=WORKER, launcher=launch_horovod)


@pytest.fixture(scope="module")
def three(tmp_path_factory, two):
    return launch_cases(tmp_path_factory.mktemp("hvd3"), 3, {
        "over-buckets": OVER_BUCKETS, **sim_case(3),
        "other-world": (*RESUME, "--steps", "1", "--load", two.out / "full"),
    }, worker=WORKER, launcher=launch_horovod)


# -- in one process: the compressor API and the launcher's argument split ------------------------------------

def test_compression_fits_horovods_api():
    for c in (horovod_ext.Compression.none, horovod_ext.Compression.fp16, horovod_ext.Compression.bf16,
              horovod_ext.Compression.sign, horovod_ext.Compression.int8, horovod_ext.Compression.topk(0.01),
              horovod_ext.Compression.randomk(0.1), horovod_ext.Compression.qsgd(16)):
        assert isinstance(c, hvd_compression.Compressor)
    t = torch.randn(100)
    out, ctx = horovod_ext.Compression.fp16.compress(t)
    assert out.dtype == torch.float16 and horovod_ext.Compression.fp16.decompress(out, ctx).dtype == torch.float32
    assert horovod_ext.Compression.none.compress(t)[0] is t
    for c in (horovod_ext.Compression.sign, horovod_ext.Compression.topk(0.01), horovod_ext.Compression.bf16):
        with pytest.raises(TypeError, match="horovod_ext.DistributedOptimizer"):
            c.compress(t)
    assert horovod_ext.Compression.from_spec("topk:0.01").spec == "topk:0.01"
    assert horovod_ext.Compression.from_spec("fp16") is horovod_ext.Compression.fp16
    with pytest.raises(ValueError, match="valid names: .*sign"):
        horovod_ext.Compression.from_spec("bogus")


def test_launcher_takes_only_its_flags_before_the_command():
    ours, rest = split_argv(["-np", "2", "--dsq-compressor", "sign", "--gloo", "python", "t.py",
                             "--dsq-compressor", "mine"])
    assert ours == ["--dsq-compressor", "sign"]
    assert rest == ["-np", "2", "--gloo", "python", "t.py", "--dsq-compressor", "mine"]
    ours, rest = split_argv(["--dsq-compressor=topk:0.01", "--dsq-no-server-ef", "-np", "2", "python", "t.py"])
    assert ours == ["--dsq-compressor=topk:0.01", "--dsq-no-server-ef"] and rest == ["-np", "2", "python", "t.py"]


def test_bad_flag_exits_before_any_worker_starts(tmp_path):
    """The installed `dsq-horovodrun`, as a user runs it: a bad flag exits 2 with the reason, no worker starts."""
    out = tmp_path / "never"
    cmd = [os.path.join(os.path.dirname(sys.executable), "dsq-horovodrun"), "--dsq-compressor", "bogus", "-np", "2",
           "--gloo", "-H", "localhost:2", sys.executable, str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert VALID_NAMES in proc.stderr
    assert not out.exists(), "a worker started"


@pytest.mark.parametrize("flags,message", [
    (["--dsq-compressor", "topk:2"], "topk"),
    (["--dsq-compressor", "sign", "--dsq-server-compressor", "nope"], "valid names"),
    (["--dsq-compressor", "sign", "--dsq-warmup-steps", "-3"], "warmup_steps"),
    (["--dsq-compresor", "sign"], "unrecognized arguments: --dsq-compresor"),
    (["--dsq-no-server-ef"], "--dsq-compressor is required"),
    (["--dsq-compressor", "sign", "--dsq-policy", "role:head=int8,role:nrom=dense"], "unknown role 'nrom'"),
])
def test_bad_flags_exit_before_horovodrun_starts(monkeypatch, capsys, flags, message):
    """The same launcher's main in this process (its start-up is most of the test's time): exit 2 with the reason,
    before it would hand over to horovodrun."""
    from horovod_ext.launcher import main

    def handed_over(*args):
        raise AssertionError(f"horovodrun would have started: {args}")
    monkeypatch.setattr(os, "execve", handed_over)
    with pytest.raises(SystemExit) as exited:
        main([*flags, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, "train.py"])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


# -- under horovodrun --------------------------------------------------------------------------------------

@pytest.mark.parametrize("nproc", [2, 3])
def test_conservation_and_agreement_over_buckets(request, nproc):
    """Several buckets (bucket_mb=0.01), a NaN on one rank at step 4: skipped on every rank, residuals kept;
    the conservation law over the other steps; every rank applies the same update."""
    ranks = request.getfixturevalue({2: "two", 3: "three"}[nproc]).ranks("over-buckets", "sign_rank")
    assert ranks[0]["buckets"] >= 2
    assert all(r["step"] == 8 and r["skipped_steps"] == 1 for r in ranks)
    assert all(r["class_module"] == "horovod.torch.optimizer" and r["step_after_broadcast"] == 0 for r in ranks)
    assert all("zero_grad() was called after loss.backward()" in r["zero_grad_error"] for r in ranks)
    for r in ranks:
        assert all(torch.isnan(c).all() for c in r["records"][4]["c"].values())
        for kind in (0, 1):      # worker, server residuals unchanged by the skipped step
            for name, e in r["snapshots"][3][kind].items():
                assert torch.equal(e, r["snapshots"][4][kind][name])
    assert any(r["worker_residual"] for r in ranks) and any(r["server_residual"] for r in ranks)
    ok = [t for t in range(8) if t != 4]
    assert_same_update_everywhere([dict(r, records=[r["records"][t] for t in ok]) for r in ranks])
    assert_conservation(ranks, steps=ok)
    totals = ranks[0]["totals"]
    dense = totals["dense_bytes"]
    assert totals["bytes_up_sent"] + totals["bytes_down_sent"] < dense / 8, totals


@pytest.mark.parametrize("nproc,specs,extra", SIM_CASES, ids=SIM_IDS)
def test_optimizer_equals_simulator(request, nproc, specs, extra):
    """One parameter: the optimizer's updates and residuals equal the Simulator's (blocks of 256 elements) on the
    same per-rank gradients, for every compressor and baseline switch."""
    cases = request.getfixturevalue({2: "two", 3: "three"}[nproc])
    tags = [s.replace(":", "_") for s in specs.split(",")]
    runs = {tag: cases.ranks(f"sim-{nproc}-{specs}-{'_'.join(extra)}", f"{tag}_rank") for tag in tags}
    for spec, tag in zip(specs.split(","), tags):
        ranks = runs[tag]
        cfg = dsq.DoubleSqueezeConfig(
            compressor=spec, min_numel=16, server_compressor="none" if "none" in extra else None,
            worker_ef="--no-worker-ef" not in extra, server_ef="--no-server-ef" not in extra,
            warmup_steps=3 if "--warmup" in extra else 0, block_size=256)
        sim = dsq.Simulator(nproc, cfg, key="weight")
        for t, rec in enumerate(ranks[0]["records"]):
            expected = sim.step([ranks[r]["records"][t]["g"]["weight"] for r in range(nproc)])
            for r in ranks:
                torch.testing.assert_close(r["records"][t]["c"]["weight"], expected, rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"{spec} step {t}: {m}")
        zero = torch.zeros(2000)       # a lossless compressor (none) keeps no residual: it would stay zero
        if spec == "none":
            assert not any(r["worker_residual"] or r["server_residual"] for r in ranks)
        for r, rank in enumerate(ranks):
            if cfg.worker_ef:
                torch.testing.assert_close(rank["worker_residual"].get("weight", zero), sim.worker_errors[r],
                                           rtol=1e-6, atol=1e-7)
        if cfg.server_ef:
            server = sum(r["server_residual"].get("weight", zero) for r in ranks)
            torch.testing.assert_close(server, sim.server_error, rtol=1e-6, atol=1e-7)


def test_policy_by_role_from_the_parameters_names(two):
    """DoubleSqueezeConfig(policy=...) in horovod_ext.DistributedOptimizer: the roles from named_parameters'
    names (tok: embedding, ln: norm, head), each parameter exactly as a Simulator with its rule's compressor."""
    ranks = two.ranks("policy", "topk_0.1_rank")
    assert_policy_equals_simulator(ranks)
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks)


@pytest.mark.parametrize("setting", list(OPTIONS))
def test_sum_and_predivide_as_in_horovod(two, setting):
    """op=hvd.Sum gives W times the average; gradient_predivide_factor only splits the scaling (the compressor
    sees g / f, the result is scaled back), so both match the Simulator's average."""
    option = OPTIONS[setting]
    ranks = two.ranks(setting, "sign_rank")
    sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="sign", min_numel=16, block_size=256), key="weight")
    factor = 2 if option[0] == "--op" else 1
    for t, rec in enumerate(ranks[0]["records"]):
        expected = sim.step([ranks[r]["records"][t]["g"]["weight"] for r in range(2)])
        torch.testing.assert_close(rec["c"]["weight"], factor * expected, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation(two):
    """backward_passes_per_step=3: one exchange per step, of the summed gradients of three micro-batches."""
    ranks = two.ranks("accumulation", "topk_0.1_rank")
    assert all(r["step"] == 5 for r in ranks)
    # the recorded gradient is the sum of the three micro-batches' (taken apart from p.grad): every parameter's
    # update and residuals are the Simulator's for it
    config = dsq.DoubleSqueezeConfig(compressor="topk:0.1", min_numel=16, block_size=256)
    assert_equals_simulator(ranks, config, compressors=reference("topk:0.1"))
    assert_conservation(ranks)


def test_auto_decides_the_same_on_every_rank_and_loses_nothing(two):
    """compressor="auto" (its default candidates) on real step times, the decisions taken on Horovod's thread."""
    ranks = two.ranks("auto", "auto_rank")
    assert ranks[0]["auto"]["history"] == ranks[1]["auto"]["history"]
    modes = DEFAULT_CANDIDATES.split(",") + ["dense"]
    assert [m for _, m in ranks[0]["auto"]["history"]][:len(modes)] == modes
    assert ranks[0]["auto"]["flushes"] > 0
    assert_same_update_everywhere(ranks)
    assert_conservation(ranks)


def test_resume_from_state_dict_is_exact(two, three):
    """Save at step 4 of 8 (optimizer state_dict with the residuals, momentum), resume in fresh processes:
    the same parameters and residuals, bit for bit, as the uninterrupted run. A state from another world
    size is refused, saying why."""
    full, resumed = two.ranks("full", "sign_rank"), two.ranks("resumed", "sign_rank")
    for a, b in zip(full, resumed):
        assert b["step"] == 8
        for name in a["params"]:
            assert torch.equal(a["params"][name], b["params"][name]), name
        for kind in ("worker_residual", "server_residual"):
            for name in a[kind]:
                assert torch.equal(a[kind][name], b[kind][name]), (kind, name)
    out = three.out / "other-world"
    # ranks 0 and 1 find a checkpoint of world size 2 and refuse it
    for r in (0, 1):
        assert "world_size=2" in (out / f"error{r}.txt").read_text()


def test_non_summable_compressor_in_stock_optimizer_is_refused(two):
    two.refused("stock-sign", "cannot use it. Use horovod_ext.DistributedOptimizer")
    # a summable one works in the stock optimizer, as Horovod's own fp16 does
    ranks = two.ranks("stock-fp16", "fp16_rank")
    assert not ranks[0]["dsq"]
    assert_same_update_everywhere(ranks)
    mean = (ranks[0]["records"][0]["g"]["0.weight"] + ranks[1]["records"][0]["g"]["0.weight"]) / 2
    torch.testing.assert_close(ranks[0]["records"][0]["c"]["0.weight"], mean, rtol=2e-3, atol=1e-3)


def test_flag_switches_a_script_that_names_no_compressor(horovodrun, tmp_path, two):
    """The same unedited script: plain Horovod under horovodrun (exact averages), DoubleSqueeze under
    dsq-horovodrun --dsq-* (the flag's config reaches every rank; bytes are compressed; TensorBoard)."""
    plain = two.ranks("plain-flag", "sign_rank")
    assert not plain[0]["dsq"]
    mean = (plain[0]["records"][0]["g"]["0.weight"] + plain[1]["records"][0]["g"]["0.weight"]) / 2
    torch.testing.assert_close(plain[0]["records"][0]["c"]["0.weight"], mean, rtol=1e-6, atol=1e-7)

    flags = ["--dsq-compressor", "topk:0.05", "--dsq-server-compressor", "sign", "--dsq-warmup-steps", "2",
             "--dsq-no-server-ef", "--dsq-logdir", tmp_path / "tb"]
    ranks = run(horovodrun, tmp_path, 2, "--mode", "flag", "--steps", "6", name="flag", launcher="dsq-horovodrun",
                flags=flags)["sign"]
    for r in ranks:
        assert r["dsq"] and r["config"]["compressor"] == "topk:0.05" and r["config"]["server_compressor"] == "sign"
        assert r["config"]["warmup_steps"] == 2 and r["config"]["server_ef"] is False
        assert not r["server_residual"]
    assert_same_update_everywhere(ranks)
    # dense during the 2 warm-up steps, compressed after
    assert ranks[0]["totals"]["compressed_tensors"] > 0 and ranks[0]["totals"]["dense_tensors"] > 0

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("bytes_up", "bytes_down", "compression_ratio", "worker_residual_norm", "worker_rel_error",
                "skipped_steps"):
        assert f"dsq/{tag}" in tags
    assert len(events.Scalars("dsq/bytes_up")) == 6
    ratios = [e.value for e in events.Scalars("dsq/compression_ratio")]
    assert max(ratios[:2]) < 1.5 and min(ratios[2:]) > 3, ratios


def test_example_sign_by_flag_within_two_points_of_plain_horovod(horovodrun, tmp_path):
    plain, sign = tmp_path / "plain.json", tmp_path / "sign.json"
    # 2 ranks, as the README's figures (3 on this 2-core machine took 2.5x as long)
    horovodrun(2, EXAMPLE, ["--json", plain], timeout=300)
    proc = horovodrun(2, EXAMPLE, ["--json", sign], timeout=300, launcher="dsq-horovodrun",
                      flags=["--dsq-compressor", "sign"])
    accuracy = json.loads(sign.read_text())["accuracy"]
    assert proc.stdout.strip().splitlines()[-1].endswith(f"final_accuracy={accuracy:.4f}")
    plain, sign = json.loads(plain.read_text()), json.loads(sign.read_text())
    assert not plain["doublesqueeze"] and sign["doublesqueeze"] and sign["config"]["compressor"] == "sign"
    assert plain["accuracy"] > 0.95
    assert sign["accuracy"] >= plain["accuracy"] - 0.02, (sign["accuracy"], plain["accuracy"])
    # sign sends 1/31 of the bytes; late in training, when the model has converged and its gradients are sparse,
    # the quality guard moves the layers on which sign stops contracting to int4:128 (6.8x): 10-12x in all
    assert plain["mb_sent_per_worker"] / sign["mb_sent_per_worker"] > 8


STOCK = ROOT / "tests" / "hvd_stock_script.py"


def test_flag_switches_a_stock_horovod_script(horovodrun, tmp_path):
    """A script that knows nothing of DoubleSqueeze (hvd.DistributedOptimizer only) is switched by
    dsq-horovodrun's flag: its updates equal the Simulator's, the bytes are compressed, the conservation law
    holds; under plain horovodrun the same script averages exactly."""
    flags = ["--dsq-compressor", "sign", "--dsq-block-size", "256"]
    horovodrun(2, STOCK, [tmp_path / "dsq", "--steps", "5"], launcher="dsq-horovodrun", flags=flags)
    ranks = load_ranks(tmp_path / "dsq", 2)
    assert all(r["dsq"] for r in ranks) and ranks[0]["config"]["block_size"] == 256
    sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="sign", block_size=256), key="weight")
    for t, rec in enumerate(ranks[0]["records"]):
        expected = sim.step([ranks[r]["records"][t]["g"]["weight"] for r in range(2)])
        for r in ranks:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], expected, rtol=1e-6, atol=1e-7)
    assert_conservation(ranks)
    totals = ranks[0]["totals"]
    assert totals["dense_bytes"] / totals["payload_bytes"] > 20
    horovodrun(2, STOCK, [tmp_path / "plain", "--steps", "2"])
    plain = load_ranks(tmp_path / "plain", 2)
    assert not plain[0]["dsq"]
    mean = (plain[0]["records"][0]["g"]["weight"] + plain[1]["records"][0]["g"]["weight"]) / 2
    torch.testing.assert_close(plain[0]["records"][0]["c"]["weight"], mean, rtol=1e-6, atol=1e-7)


def test_process_set(horovodrun, tmp_path):
    """3 ranks, a process set {0, 1}: those two run the double pass between them (the Simulator with 2 workers);
    rank 2 steps on its own gradient, as in Horovod."""
    horovodrun(3, STOCK, [tmp_path / "ps", "--steps", "4", "--process-set", "0,1"], launcher="dsq-horovodrun",
               flags=["--dsq-compressor", "sign", "--dsq-block-size", "256"])
    ranks = load_ranks(tmp_path / "ps", 3)
    assert ranks[0]["dsq"] and ranks[0]["world"] == 2 and not ranks[2]["dsq"]
    sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="sign", block_size=256), key="weight")
    for t in range(4):
        expected = sim.step([ranks[r]["records"][t]["g"]["weight"] for r in range(2)])
        for r in ranks[:2]:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(ranks[2]["records"][t]["c"]["weight"], ranks[2]["records"][t]["g"]["weight"])
    assert_conservation(ranks[:2])

