"""The quality yardstick, short: the byte-level transformer LM on the standard library's sources, 2 ranks under the
real torchrun and DDP (`benchmarks/quality.py`), against dense DDP at equal steps.

These fail if what made the old default lose came back: under SGD with momentum at lr 0.3 (where per-block sign
under error feedback let its residuals grow to 10-20 times the gradient and trailed dense by 12%, or diverged) the
default's residual stays below the gradient and its loss within a margin of dense's; under AdamW the default and
`DoubleSqueezeAdamW` stay within a margin of dense's loss, the latter at over 10x fewer bytes.
"""
import json
import subprocess
import sys

import pytest

from .conftest import ROOT

QUALITY = ROOT / "benchmarks" / "quality.py"


def yardstick(tmp_path, opt, steps, methods, lr=None, warmup=0, seeds=None, first_seed_only=()):
    """{method: run} of one launch; with `seeds`, {(method, seed): run}."""
    out = tmp_path / f"{opt}.json"
    cmd = [sys.executable, str(QUALITY), "--task", "lm", "--opt", opt, "--steps", str(steps), "--warmup", str(warmup),
           "--eval-every", str(steps), "--json", str(out), "--methods", *methods]
    if lr is not None:
        cmd += ["--lr", str(lr)]
    if seeds:
        cmd += ["--seeds", *map(str, seeds)]
    if first_seed_only:
        cmd += ["--first-seed-only", *first_seed_only]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["runs"][f"lm-{opt}"]
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    return {(r["method"], r["seed"]) if seeds else r["method"]: r for r in rows}


SGD_SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def sgd(tmp_path_factory):
    # 70 steps, the learning rate warming up to 0.3 over 21. At this rate the early trajectory is chaotic: one seed's
    # gap between two methods that train equally well swings by +-4% (measured 2026-12-05, the default against dense
    # on seeds 0-3: +3.5%, +0.1%, -3.5%, -0.0%), so the loss is judged on the mean over three seeds (+0.03%) and the
    # residual on every seed (0.08-0.10 of the gradient; sign without the guard: 3.8 on seed 0, 5-7 on seeds 1-3).
    return yardstick(tmp_path_factory.mktemp("sgd"), "sgd", 70, ["dense", "default", "sign@guard=0"], warmup=21,
                     seeds=SGD_SEEDS, first_seed_only=["sign@guard=0"])


def mean_gap(runs, method, seeds=SGD_SEEDS) -> float:
    """The mean over seeds of a method's relative gap to dense on the same seed."""
    return sum(runs[method, s]["val_loss"] / runs["dense", s]["val_loss"] - 1 for s in seeds) / len(seeds)


def test_default_under_sgd_momentum_keeps_its_residual_below_the_gradient_and_trains_like_dense(sgd):
    for s in SGD_SEEDS:
        dense, default = sgd["dense", s], sgd["default", s]
        assert not dense["diverged"] and not default["diverged"], s
        assert default["residual_ratio"] < 1.0, (s, default["residual_ratio"])
        assert default["dense_bytes_per_step"] / default["bytes_per_step"] > 6
    assert mean_gap(sgd, "default") < 0.03, [(sgd["default", s]["val_loss"], sgd["dense", s]["val_loss"])
                                             for s in SGD_SEEDS]


def test_the_failure_the_default_avoids_is_visible_to_these_checks(sgd):
    """Block sign without the guard: its residual grows far past the gradient and it trails dense (what the two
    checks above would catch if the default regressed to it)."""
    sign, dense = sgd["sign@guard=0", SGD_SEEDS[0]], sgd["dense", SGD_SEEDS[0]]
    assert sign["diverged"] or sign["residual_ratio"] > 3.0, sign["residual_ratio"]
    assert sign["diverged"] or sign["val_loss"] > dense["val_loss"] * 1.03


def test_default_and_doublesqueeze_adamw_under_adamw(tmp_path):
    runs = yardstick(tmp_path, "adamw", 80, ["dense", "default", "adamw:sign@warmup=16"])
    dense = runs["dense"]["val_loss"]
    assert runs["default"]["val_loss"] < dense * 1.02, (runs["default"]["val_loss"], dense)
    wrapped = runs["adamw:sign@warmup=16"]
    assert wrapped["val_loss"] < dense * 1.03, (wrapped["val_loss"], dense)
    assert wrapped["dense_bytes_per_step"] / wrapped["bytes_per_step"] > 10
