"""The DDP example under real torchrun: DoubleSqueeze trains as well as plain DDP on digits, sends far fewer
bytes, and writes the monitor's TensorBoard metrics."""
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import ROOT

EXAMPLE = ROOT / "examples" / "ddp_digits.py"


@pytest.mark.parametrize("nproc", [2, 3])
def test_ddp_digits_sign_within_two_points_of_dense(torchrun, tmp_path, nproc):
    out = tmp_path / "result.json"
    torchrun(nproc, EXAMPLE, ["--methods", "dense,sign", "--json", out, "--logdir", tmp_path / "tb"], timeout=300)
    results = {r["method"]: r for r in json.loads(out.read_text())["results"]}
    dense, sign = results["dense"], results["sign"]
    assert dense["accuracy"] > 0.95
    assert sign["accuracy"] >= dense["accuracy"] - 0.02, (sign["accuracy"], dense["accuracy"])
    assert dense["mb_sent_per_worker"] / sign["mb_sent_per_worker"] > 20

    events = EventAccumulator(str(tmp_path / "tb" / "sign"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("bytes_up", "bytes_down", "compression_ratio", "worker_residual_norm", "server_residual_norm",
                "worker_rel_error", "server_rel_error", "skipped_steps", "compress_ms"):
        assert f"dsq/{tag}" in tags
    assert {"train/loss", "test/accuracy"} <= tags
    ratio = [e.value for e in events.Scalars("dsq/compression_ratio")]
    assert min(ratio) > 20
    assert all(0 < e.value < 1.5 for e in events.Scalars("dsq/worker_rel_error"))
    assert all(e.value == 0 for e in events.Scalars("dsq/skipped_steps"))
    assert len(events.Scalars("dsq/bytes_up")) == sign["steps"]
