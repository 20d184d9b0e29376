"""The front ends people train with, for real, on 2 CPU ranks (gloo): the Hugging Face Trainer (with DeepSpeed,
switched on by the config section alone, and in DDP mode with `DoubleSqueezeCallback`, for the hook or with
`DoubleSqueezeAdamW` as the Trainer's optimizer), Lightning's DDPStrategy
with the hook and `DoubleSqueezeCallback`, and Accelerate with the hook registered after `prepare`.

Bytes are the kernel's: each job runs in a network namespace of its own (`unshare --net`, root), where the
loopback carries only that job's traffic.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsq_plugins as dsq

from .checks import assert_conservation
from .conftest import ROOT

ISOLATED = os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None
isolated = pytest.mark.skipif(not ISOLATED, reason="counting a job's bytes needs root (unshare --net)")


def job(script, out, *args, nproc=2, timeout=300, private_net=True):
    """`script` under torchrun with `nproc` ranks (in a private network namespace unless told otherwise: the
    kernel's byte counters then count this job alone); fails with the output."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
              str(ROOT / "tests" / script), str(out), *map(str, args)]
    cmd = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *launch] if private_net else launch
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise AssertionError(f"{' '.join(launch)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                             f"\n--- stderr\n{proc.stderr[-5000:]}")
    return proc


def result(out):
    return json.loads((out / "result.json").read_text())


def ranks(out, n=2):
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)]


def assert_same_state(a, b):
    for ra, rb in zip(a, b):
        for name, p in ra["params"].items():
            assert p.numel() > 0, name
            torch.testing.assert_close(rb["params"][name], p, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
        for kind in ("worker", "server"):
            assert ra[kind].keys() == rb[kind].keys()
            for key in ra[kind]:
                assert torch.equal(ra[kind][key], rb[kind][key]), (kind, key)


# ------------------------------------------------------------------------------------- Hugging Face Trainer
@isolated
@pytest.mark.parametrize("mode", ["deepspeed", "deepspeed-zero2", "deepspeed-zero3", "ddp"])
def test_trainer_trains_with_doublesqueeze_and_resumes_exactly(tmp_path, mode, request):
    """TrainingArguments(deepspeed=config) with the section (the script imports nothing of ours; ZeRO 0, and ZeRO-2
    and ZeRO-3 as the Trainer's documentation configures them: overlap_comm, contiguous_gradients, "auto" bucket
    sizes and persistence threshold) or the DDP Trainer with DoubleSqueezeCallback: loss goes down with and without
    DoubleSqueeze, the kernel counts at least 8x fewer bytes per step with it (2.5x under ZeRO-3, whose parameter
    gathers go int8), residuals exist; a run resumed from its step-4 checkpoint ends with the same
    weights and residuals, bit for bit."""
    stock, full, resumed = tmp_path / "stock", tmp_path / "full", tmp_path / "resumed"
    dsq_flag = ["--mode", mode, "--dsq"]
    if mode == "ddp":
        stock = request.getfixturevalue("ddp_stock")
    else:
        job("hf_worker.py", stock, "--mode", mode, "--steps", "8")
    job("hf_worker.py", full, *dsq_flag, "--steps", "8", "--save-steps", "4")
    a, b = result(stock), result(full)
    assert not a["dsq"] and b["dsq"] and b["step"] == 8
    for r in (a, b):
        assert r["losses"][-1] < r["losses"][0] - 0.3, r["losses"]
    fewer = 2.5 if mode == "deepspeed-zero3" else 8
    assert a["bytes_per_step"] > fewer * b["bytes_per_step"], (a["bytes_per_step"], b["bytes_per_step"])
    assert b["worker_residual_norm"] > 0 and b["dense"] > 15 * b["payload"]

    checkpoint = full / "trainer" / "checkpoint-4"
    assert all((checkpoint / ("global_step4" if mode.startswith("deepspeed") else "") / f"doublesqueeze_rank_{r:05d}.pt").exists()
               for r in range(2))
    shutil.copytree(checkpoint, resumed / "trainer" / "checkpoint-4")
    job("hf_worker.py", resumed, *dsq_flag, "--steps", "8", "--save-steps", "4", "--resume")
    assert result(resumed)["step"] == 8
    assert_same_state(ranks(full), ranks(resumed))
    if mode == "ddp":          # resumed by 3 processes: the residuals redistributed, their mass kept
        three = tmp_path / "three"
        shutil.copytree(checkpoint, three / "trainer" / "checkpoint-4")
        job("hf_worker.py", three, *dsq_flag, "--steps", "5", "--resume", nproc=3)
        assert_mass_kept([torch.load(checkpoint / f"doublesqueeze_rank_{r:05d}.pt", weights_only=False)
                          for r in range(2)], [torch.load(three / f"loaded{r}.pt", weights_only=False)
                                               for r in range(3)])
    if mode == "deepspeed-zero3":          # resumed by 3 processes from a universal checkpoint
        three = tmp_path / "universal"
        universal = three / "trainer" / "checkpoint-4"
        shutil.copytree(checkpoint, universal)
        to_universal(universal / "global_step4", universal / "global_step4_universal")
        job("hf_worker.py", three, *dsq_flag, "--steps", "6", "--resume", "--universal", nproc=3)
        assert result(three)["step"] == 6
        mean = sum(torch.load(full / f"saved{r}_step4.pt", weights_only=False)["residual"] for r in range(2)) / 2
        assert float(mean.abs().sum()) > 0.1
        for r in range(3):
            loaded = torch.load(three / f"loaded{r}.pt", weights_only=False)
            assert loaded["step"] == 4 and torch.equal(loaded["residual"], mean), r


@pytest.fixture(scope="module")
def ddp_stock(tmp_path_factory):
    """The DDP Trainer without DoubleSqueeze, 8 steps: the bytes and losses the DDP cases compare with."""
    out = tmp_path_factory.mktemp("ddp_stock")
    job("hf_worker.py", out, "--mode", "ddp", "--steps", "8")
    return out


@isolated
def test_trainer_with_doublesqueeze_adamw_as_its_optimizer_trains_and_resumes_exactly(tmp_path, ddp_stock):
    """Trainer(optimizers=(DoubleSqueezeAdamW(..., warmup_steps=2), None)) and DoubleSqueezeCallback(trainer), DDP:
    the callback attaches the optimizer to the Trainer's DDP model, so the kernel counts at least 8x fewer bytes per
    step than the stock Trainer (int4 gradients for a warm-up step, then sign on the momentum), the loss goes down
    as the stock run's, every rank holds the same weights; resumed from its step-4 checkpoint (every rank's optimizer
    state in its own file) it ends with the same weights and momentum residuals, bit for bit; resumed by 3
    processes, every rank's momentum worker residual is the saved ranks' mean."""
    full, resumed, three = tmp_path / "full", tmp_path / "resumed", tmp_path / "three"
    job("hf_worker.py", full, "--mode", "ddp", "--dsq-adamw", "--steps", "8", "--save-steps", "4")
    a, b = result(ddp_stock), result(full)
    assert b["dsq"] and b["step"] == 6            # the momentum collective's steps: 8 less the 2 of warm-up
    assert b["losses"][-1] < b["losses"][0] - 0.3 and b["losses"][-1] < a["losses"][-1] + 0.3, (a, b)
    assert a["bytes_per_step"] > 8 * b["bytes_per_step"], (a["bytes_per_step"], b["bytes_per_step"])
    assert b["worker_residual_norm"] > 0 and b["dense"] > 15 * b["payload"]
    final = ranks(full)
    for name, p in final[0]["params"].items():
        assert torch.equal(final[1]["params"][name], p), name

    checkpoint = full / "trainer" / "checkpoint-4"
    saved = [torch.load(checkpoint / f"doublesqueeze_adamw_rank_{r:05d}.pt", weights_only=False) for r in range(2)]
    assert all(sd["world_size"] == 2 for sd in saved)
    for out, nproc, steps in ((resumed, 2, "8"), (three, 3, "5")):
        shutil.copytree(checkpoint, out / "trainer" / "checkpoint-4")
        job("hf_worker.py", out, "--mode", "ddp", "--dsq-adamw", "--steps", steps, "--save-steps", "4", "--resume",
            nproc=nproc)
    assert_same_state(final, ranks(resumed))
    mean = {k: sum(sd["optimizer"]["doublesqueeze"]["momentum"]["worker_residuals"][k] for sd in saved) / 2
            for k in saved[0]["optimizer"]["doublesqueeze"]["momentum"]["worker_residuals"]}
    assert mean and sum(float(v.abs().sum()) for v in mean.values()) > 0
    from dsq_plugins.engine.plan import expand_owned
    numels = [p.numel() for p in final[0]["params"].values()]      # keys: the optimizer's parameter order
    server = {k: sum(expand_owned(k, sd["optimizer"]["doublesqueeze"]["momentum"]["server_residuals"][k], numels[k],
                                  1024, 2, r) for r, sd in enumerate(saved)
                     if k in sd["optimizer"]["doublesqueeze"]["momentum"]["server_residuals"])
              for k in set().union(*(sd["optimizer"]["doublesqueeze"]["momentum"]["server_residuals"] for sd in saved))}
    loaded = [torch.load(three / f"loaded{r}.pt", weights_only=False) for r in range(3)]
    for r in range(3):
        assert loaded[r]["worker"].keys() == mean.keys()
        assert all(torch.equal(loaded[r]["worker"][k], v) for k, v in mean.items()), r
    assert server and any(float(s.abs().sum()) > 0 for s in server.values())
    for k, s in server.items():                # the owners' blocks, put in place and summed: the saved sum
        assert torch.equal(sum(expand_owned(k, x["server"][k], numels[k], 1024, 3, r) for r, x in enumerate(loaded)
                               if k in x["server"]), s), k
    new = ranks(three, 3)
    for name, p in new[0]["params"].items():
        assert torch.equal(new[1]["params"][name], p) and torch.equal(new[2]["params"][name], p), name
    assert result(three)["step"] == 3            # the momentum collective: 2 steps saved, 1 more on 3 ranks


def to_universal(folder: Path, universal: Path) -> None:
    """What the README says a user does: DeepSpeed's `ds_to_universal`, our files copied beside its output, and
    `latest_universal` naming it."""
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(folder), "--output_folder", str(universal), "--inject_missing_state"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for f in folder.glob("doublesqueeze_rank_*.pt"):
        shutil.copy(f, universal / f.name)
    (folder.parent / "latest_universal").write_text(universal.name)


def assert_mass_kept(saved, loaded):
    """The ranks' `loaded` residuals hold the mass of the `saved` states: every worker residual is the saved mean,
    and the server residuals, put in place, sum to the saved ones."""
    from dsq_plugins.engine.plan import expand_owned
    W0, W, B = len(saved), len(loaded), saved[0]["config"]["block_size"]
    numels = saved[0]["numels"]
    assert saved[0]["worker_residuals"] and all(r["worker"] for r in loaded)
    for key in saved[0]["worker_residuals"]:
        mean = sum(sd["worker_residuals"][key] for sd in saved) / W0
        for r in loaded:
            assert torch.equal(r["worker"][key], mean), key
    for key, n in numels.items():
        before = sum(expand_owned(key, sd["server_residuals"][key], n, B, W0, i) for i, sd in enumerate(saved))
        after = sum(expand_owned(key, r["server"][key], n, B, W, i) for i, r in enumerate(loaded))
        assert torch.equal(before, after), key


# ------------------------------------------------------------------------------------------------- Lightning
def torchrun_job(script, out, *args, timeout=300):
    return job(script, out, *args, timeout=timeout, private_net=False)


def test_lightning_ddp_strategy_with_the_hook_equals_simulator_and_resumes(tmp_path):
    """DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...) as Lightning documents PowerSGD, the state built before
    the process group: the updates equal the Simulator's on the ranks' own gradients, the conservation law holds,
    and a fit resumed from the step-3 checkpoint (DoubleSqueezeCallback) ends with the same weights and
    residuals. (On the CPU Lightning drops communication hooks; the callback registers ours.)"""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun_job("lightning_worker.py", full, "--steps", "6", "--save-every", "3")
    a = [torch.load(full / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(r["step"] == 6 for r in a)
    sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="sign", min_numel=16, block_size=256), key=0)
    for t in range(6):
        expected = sim.step([a[r]["records"][t]["g"]["weight"] for r in range(2)])
        for r in a:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], expected, rtol=1e-5, atol=1e-6)
    assert_conservation(a, atol=2e-5)
    torchrun_job("lightning_worker.py", resumed, "--steps", "6", "--resume", full / "ckpt" / "step=3.ckpt")
    b = [torch.load(resumed / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for ra, rb in zip(a, b):
        assert rb["step"] == 6
        assert torch.equal(ra["params"]["weight"], rb["params"]["weight"])
        assert torch.equal(ra["worker_residual"]["weight"], rb["worker_residual"]["weight"])
    # on 3 ranks from the same checkpoint: the residuals redistributed, the conservation law holds across the resume
    three = tmp_path / "three"
    job("lightning_worker.py", three, "--steps", "5", "--devices", "3", "--resume", full / "ckpt" / "step=3.ckpt",
        nproc=3, private_net=False)
    c = [torch.load(three / f"rank{r}.pt", weights_only=False) for r in range(3)]
    assert all(r["step"] == 5 and len(r["records"]) == 2 for r in c)
    applied = sum(a[0]["records"][t]["c"]["weight"] for t in range(3)) + \
        sum(c[0]["records"][t]["c"]["weight"] for t in range(2))
    true = sum(sum(r["records"][t]["g"]["weight"] for r in a) / 2 for t in range(3)) + \
        sum(sum(r["records"][t]["g"]["weight"] for r in c) / 3 for t in range(2))
    held = sum(r["worker_residual"]["weight"] for r in c) / 3 + sum(r["server_residual"]["weight"] for r in c)
    torch.testing.assert_close(applied, true - held, rtol=0, atol=2e-5)
    assert float(a[0]["worker_residual"]["weight"].abs().sum()) > 1.0


# ------------------------------------------------------------------------------------------------ Accelerate
def test_accelerate_prepare_then_register_the_hook(tmp_path):
    """accelerator.prepare(model) gives the DDP model; registering the hook on it is all it takes: the updates equal
    the Simulator's (topk, blocks of 256) and the conservation law holds."""
    torchrun_job("accelerate_worker.py", tmp_path, "--steps", "5")
    a = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert "MULTI_CPU" in a[0]["distributed_type"] and all(r["step"] == 5 for r in a)
    sim = dsq.Simulator(2, dsq.DoubleSqueezeConfig(compressor="topk:0.1", min_numel=16, block_size=256), key=0)
    for t in range(5):
        expected = sim.step([a[r]["records"][t]["g"]["weight"] for r in range(2)])
        for r in a:
            torch.testing.assert_close(r["records"][t]["c"]["weight"], expected, rtol=1e-6, atol=1e-7)
    assert_conservation(a)

