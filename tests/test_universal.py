"""A DeepSpeed run resumed on another number of ranks through DeepSpeed's universal checkpoint, at ZeRO 1, 2 and 3:
2 ranks train with the "doublesqueeze" section and `engine.save_checkpoint` (torch's Adam, which `ds_to_universal`
converts), DeepSpeed's own `ds_to_universal` converts the checkpoint, the DoubleSqueeze files are copied beside it,
and 3 ranks load it with ``"checkpoint": {"load_universal": true}`` and go on training.

What the resumed ranks hold is checked against what the saved ranks held (their own records, not the files the
library wrote): the mean of the worker residuals, the server residuals summed over owners (ZeRO-1), the copy of the
parameters every rank computes with (ZeRO-2, where it differs from the exact parameters by the owners' residuals),
and the step. The residuals' mass is what the conservation law holds: a resume that reset them would fail here.
"""
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, launch_cases

DS_WORKER = ROOT / "tests" / "ds_worker.py"
ZERO3_WORKER = ROOT / "tests" / "ds_zero3_worker.py"
COMMON = ("--model", "multi", "--adam")
SAVED_AT = 3
CONVERT = """
import sys
from deepspeed.checkpoint import ds_to_universal as u
for folder in sys.argv[1:]:
    sys.argv = ["ds_to_universal", "--input_folder", f"{folder}/step{STEP}", "--output_folder",
                f"{folder}/step{STEP}_universal", "--inject_missing_state"]
    u.main(u.parse_arguments())
""".replace("STEP", str(SAVED_AT))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{stage: (the 2 saved ranks' results, the 3 resumed ranks' results)}, and the resumes' stderr."""
    tmp = tmp_path_factory.mktemp("universal")
    saved = {"z1": ("--stage", "1"), "z2": ("--stage", "2")}
    two = launch_cases(tmp / "two", 2, saved, *COMMON, "--steps", SAVED_AT, "--save-at", SAVED_AT, worker=DS_WORKER)
    two3 = launch_cases(tmp / "two3", 2, {"z3": ()}, *COMMON, "--steps", SAVED_AT, "--save-at", SAVED_AT,
                        worker=ZERO3_WORKER)
    folders = {"z1": two.out / "z1" / "ckpt", "z2": two.out / "z2" / "ckpt", "z3": two3.out / "z3" / "ckpt"}
    proc = subprocess.run([sys.executable, "-c", CONVERT, *map(str, folders.values())], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for folder in folders.values():         # what ds_to_universal leaves to the user: our files, latest_universal
        universal = folder / f"step{SAVED_AT}_universal"
        for f in (folder / f"step{SAVED_AT}").glob("doublesqueeze_rank_*.pt"):
            (universal / f.name).write_bytes(f.read_bytes())
        (folder / "latest_universal").write_text(universal.name)
    resume = ("--universal", "--steps", 2, "--first-step", SAVED_AT)
    three = launch_cases(tmp / "three", 3, {
        **{z: ("--stage", z[1], "--load", folders[z]) for z in ("z1", "z2")},
        "z2-round-robin": ("--stage", "2", "--load", folders["z2"], "--round-robin")}, *COMMON, *resume,
        worker=DS_WORKER)
    three3 = launch_cases(tmp / "three3", 3, {"z3": ("--load", folders["z3"])}, *COMMON, *resume, worker=ZERO3_WORKER)
    return {"z1": (two.ranks("z1"), three.ranks("z1")), "z2": (two.ranks("z2"), three.ranks("z2")),
            "z3": (two3.ranks("z3"), three3.ranks("z3")), "cases": three}, three.proc.stderr + three3.proc.stderr


def resumed_and_trained(new) -> None:
    for r in new:
        assert r["loaded"]["step"] == SAVED_AT
        losses = r["losses"] if "losses" in r else [x["loss"] for x in r["records"]]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_no_resume_started_its_residuals_from_zero(runs):
    assert "residuals start from zero" not in runs[1]


def test_zero1_resumed_on_three_ranks_keeps_both_residuals_mass(runs):
    old, new = runs[0]["z1"]
    resumed_and_trained(new)
    for name in old[0]["worker_residual"]:
        mean = sum(r["worker_residual"][name] for r in old) / len(old)
        assert float(mean.abs().sum()) > 0.1, name
        for r in new:
            assert torch.equal(r["loaded"]["worker_residual"][name], mean), name
    for name in old[0]["server_residual"]:          # each owner's blocks in place, zero elsewhere
        before = sum(r["server_residual"][name] for r in old)
        after = sum(r["loaded"]["server_residual"][name] for r in new)
        torch.testing.assert_close(after, before, rtol=0, atol=0, msg=name)
    assert any(float(r["server_residual"][n].abs().sum()) > 0 for r in old for n in r["server_residual"])


def test_zero2_resumed_on_three_ranks_keeps_the_residual_mass_and_the_copy(runs):
    """The worker residual of the one parameter group, in its flat layout (the parameters one after another, then
    padding to a multiple of the ranks): the saved mean on every resumed rank, the padding zero. The model every
    rank computes with is the saved copy, not the exact parameters DeepSpeed loaded (they differ by the owners'
    residuals, which are not zero)."""
    old, new = runs[0]["z2"]
    resumed_and_trained(new)
    real = sum(p.numel() for p in old[0]["params"].values())
    mean = sum(r["residual"][:real] for r in old) / len(old)
    assert float(mean.abs().sum()) > 0.1 and not any(r["residual"][real:].any() for r in old)
    assert any(float(s.abs().sum()) > 0 for r in old for s in r["server_residuals"].values())
    for r in new:
        assert torch.equal(r["loaded"]["residual"][:real], mean)
        assert not r["loaded"]["residual"][real:].any()
        for name, p in old[0]["params"].items():
            assert torch.equal(r["loaded"]["params"][name], p), name


def test_zero2_resume_on_another_number_of_ranks_under_round_robin_gradients_is_refused(runs):
    """round_robin_gradients orders each group's parameters by the number of ranks, so the residual's positions do
    not carry over: the load says so (ValueError) instead of mixing parameters."""
    failure = runs[0]["cases"].failure("z2-round-robin")
    assert failure is not None and failure.startswith("ValueError"), failure
    assert "round_robin_gradients" in failure


def test_zero3_resumed_on_three_ranks_keeps_the_residual_mass(runs):
    """The worker residual, laid out as the parameters' flat forms one after another whatever the number of ranks:
    the saved mean on every resumed rank; the parameters are the exact ones saved."""
    old, new = runs[0]["z3"]
    resumed_and_trained(new)
    mean = sum(r["residual"] for r in old) / len(old)
    assert float(mean.abs().sum()) > 0.1
    for r in new:
        assert torch.equal(r["loaded"]["residual"], mean)
        for name, p in old[0]["records"][-1]["after"].items():
            assert torch.equal(r["loaded"]["params"][name], p), name
