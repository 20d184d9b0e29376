"""The DDP example under real torchrun: DoubleSqueeze trains as well as plain DDP on digits, sends far fewer
bytes, and writes the monitor's TensorBoard metrics."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import ROOT

EXAMPLE = ROOT / "examples" / "ddp_digits.py"


def test_ddp_digits_sign_within_two_points_of_dense(torchrun, tmp_path, nproc=2):
    out = tmp_path / "result.json"
    torchrun(nproc, EXAMPLE, ["--methods", "dense,sign", "--json", out, "--logdir", tmp_path / "tb"], timeout=300)
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    dense, sign = results["dense"], results["sign"]
    assert dense["accuracy"] > 0.95
    assert sign["accuracy"] >= dense["accuracy"] - 0.02, (sign["accuracy"], dense["accuracy"])
    # sign sends 1/31 of the bytes; late in training, when the model has converged and its gradients are sparse,
    # the quality guard moves the layers on which sign stops contracting to int4:128 (6.8x): 10-12x in all
    assert dense["mb_sent_per_worker"] / sign["mb_sent_per_worker"] > 8

    events = EventAccumulator(str(tmp_path / "tb" / "sign"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("bytes_up", "bytes_down", "compression_ratio", "worker_residual_norm", "server_residual_norm",
                "worker_rel_error", "server_rel_error", "skipped_steps", "compress_ms"):
        assert f"dsq/{tag}" in tags
    assert {"train/loss", "test/accuracy"} <= tags
    ratio = [e.value for e in events.Scalars("dsq/compression_ratio")]
    assert ratio[0] > 20 and min(ratio) > 6         # sign, then int4:128 where the guard moved a layer
    assert all(0 < e.value < 1.5 for e in events.Scalars("dsq/worker_rel_error"))
    assert all(e.value == 0 for e in events.Scalars("dsq/skipped_steps"))
    assert len(events.Scalars("dsq/bytes_up")) == sign["steps"]


DEMO = ROOT / "examples" / "demo.py"


def test_demo_four_ranks_five_methods(torchrun, tmp_path):
    """`make demo`'s script, shortened: every method trains, bytes follow from the payload sizes, the modelled
    times add the bytes over each link to the measured time, and the plots and TensorBoard logs are written."""
    proc = torchrun(4, DEMO, ["--epochs", "3", "--hidden", "128", "--block-size", "512", "--outdir", tmp_path],
                    timeout=300)
    out = json.loads((tmp_path / "results.json").read_text())
    runs = {r["method"]: r for r in out["results"]}
    assert list(runs) == ["dense", "dsq-sign", "dsq-topk:0.01", "sign-no-ef", "sign-1pass-ef"]
    for name in runs:
        assert name in proc.stdout
    w, steps = 4, runs["dense"]["steps"]
    assert steps == 3 * (1347 // w // 32)                     # 1347 training images, 336 per rank, 32 per step
    params = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    # dense: a ring all-reduce of fp32 gradients sends 2 (W - 1) / W of them per step
    assert runs["dense"]["mb_sent_per_worker"] * 1e6 == pytest.approx(steps * 2 * (w - 1) * params * 4 / w, rel=1e-3)
    dense_mb = runs["dense"]["mb_sent_per_worker"]
    # The busiest rank's bytes: 51 blocks of 512 over 4 owners, the busiest owns more than a quarter of them, and
    # the three biases (1% of the elements, 266 floats) travel uncompressed, each to and from its one owner.
    for name in ("dsq-sign", "sign-no-ef"):                   # 1 bit per element plus scales, headers, biases
        assert 15 < dense_mb / runs[name]["mb_sent_per_worker"] < 32
    assert dense_mb / runs["dsq-topk:0.01"]["mb_sent_per_worker"] > 15
    # single-pass EF: sign uplink, dense (fp32) downlink: about half of dense, less the imbalance of owners
    assert 1.5 < dense_mb / runs["sign-1pass-ef"]["mb_sent_per_worker"] < 2.0
    for r in runs.values():
        assert r["accuracy"] > 0.3 and r["final_loss"] < 2.3   # chance is 0.1 and ln(10) = 2.30
        assert r["curve"]["step"] == list(range(1, steps + 1))         # one record per step
        for link, bps in (("100 Mbit/s", 100e6), ("1 Gbit/s", 1e9)):
            expected = r["measured_seconds"] + r["mb_sent_per_worker"] * 1e6 * 8 / bps
            assert r["modelled_seconds"][link] == pytest.approx(expected)
    for png in ("loss_vs_steps.png", "accuracy_vs_mb.png", "loss_vs_modelled_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tmp_path / "tb" / "dsq-sign"))
    events.Reload()
    assert {"train/loss", "test/accuracy", "dsq/bytes_up", "dsq/worker_residual_norm"} <= set(events.Tags()["scalars"])


def test_demo_rejects_unknown_method(torchrun, tmp_path):
    proc = torchrun(1, DEMO, ["--methods", "dense,bogus", "--outdir", tmp_path], check=False)
    assert proc.returncode != 0
    assert "unknown method(s) bogus" in proc.stderr
