"""benchmarks/cluster.py: the refusal without root, a tiny real run on a 2-host cluster (namespaces, bridge, tc), and
that nothing of the cluster is left behind: after a normal end, after SIGTERM, and from a killed earlier run."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
from netns import leftovers  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "cluster.py"
IS_ROOT = os.geteuid() == 0
root_only = pytest.mark.skipif(not IS_ROOT, reason="the cluster needs root (network namespaces, veth, bridge, tc)")
TINY = ["--hosts", "2", "--hidden", "256", "--bandwidth", "1gbit", "--steps", "2", "--warmup", "2",
        "--methods", "dense,dsq-sign", "--phase-timeout", "60"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_refuses_without_root():
    """Not root: exit status 2, one line naming the need for root, and nothing created."""
    if IS_ROOT:
        if not shutil.which("setpriv"):
            pytest.skip("root, and no setpriv to drop to an unprivileged user")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, str(SCRIPT), *TINY]
    else:
        cmd = [sys.executable, str(SCRIPT), *TINY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "needs root" in lines[0], err
    assert out == ""
    if shutil.which("ip"):
        assert leftovers(f"dsqc{proc.pid}") == []        # setpriv execs python: the same pid names the cluster


@root_only
def test_tiny_run_writes_json_and_cleans_up(tmp_path):
    """2 hosts at 1 Gbit/s, dense against dsq-sign, and the pair of both in one job: the JSON has the step times and
    far fewer bytes for sign, and the pair's per-step ratios of two models that both communicated; a stale set from
    a killed run is removed at start, and the run leaves nothing behind."""
    stale = f"dsqc{_dead_pid()}"
    subprocess.run(["ip", "link", "add", f"{stale}br", "type", "bridge"], check=True)
    subprocess.run(["ip", "netns", "add", f"{stale}-h0"], check=True)
    out = tmp_path / "cluster.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = [*TINY[:-3], "dense,dsq-sign,pair:dsq-sign", *TINY[-2:]]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--json", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, text[-4000:]
    assert "removed a stale cluster" in text
    assert leftovers(stale) == [] and leftovers(f"dsqc{proc.pid}") == [], leftovers()
    doc = json.loads(out.read_text())
    assert set(doc["step_time_s"]) == {"dense", "dsq-sign"}
    assert all(t > 0 for t in doc["step_time_s"].values())
    assert set(doc["by_bandwidth"]) == {"1gbit"}
    rows = doc["by_bandwidth"]["1gbit"]["rows"]
    assert rows["dsq-sign"]["bytes_per_step_per_rank"] * 5 < rows["dense"]["bytes_per_step_per_rank"], rows
    assert rows["dense"]["bytes_per_step_per_rank"] > 2e6          # 0.58M fp32 gradients really crossed the wire
    assert 0.5e9 < doc["probes"]["1gbit"]["counted_Bps"] * 8 < 1.1e9
    assert "dsq-sign" in doc["break_even"] and doc["errors"] == {}
    pair = doc["methods"]["pair:dsq-sign"]["1gbit"]          # not a row of the tables: its bytes are both models'
    assert len(pair["ratios"]) == 2 and pair["base_step_time_s"] > 0 and pair["ratio_median"] > 0
    assert pair["ratio_ci95"][0] <= pair["ratio_median"] <= pair["ratio_ci95"][1]
    both = rows["dense"]["bytes_per_step_per_rank"] + rows["dsq-sign"]["bytes_per_step_per_rank"]
    assert 0.8 * both < pair["bytes_per_step_per_rank"] < 1.25 * both, (pair["bytes_per_step_per_rank"], both)


@root_only
def test_sigterm_cleans_up():
    """SIGTERM while the jobs run: the namespaces, veths, bridge and /etc/netns folders go away."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *TINY], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    tag = f"dsqc{proc.pid}"
    end = time.monotonic() + 60
    while not subprocess.run(["ip", "netns", "pids", f"{tag}-h1"], capture_output=True).stdout:
        assert time.monotonic() < end and proc.poll() is None, "no worker started"
        time.sleep(0.2)
    assert leftovers(tag)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert leftovers(tag) == []


@root_only
def test_hsdp_runs_two_nodes_of_two_ranks_and_only_the_replicas_traffic_crosses_the_link(tmp_path):
    """HSDP on 2 "nodes" of 2 ranks (4 hosts, the last two idle): FSDP's own HSDP against DoubleSqueeze across the
    replicas. Inside a node the ranks talk over the node's loopback, so a node's interface carries the replicas'
    all-reduce alone: for stock, a ring of 2 per shard, each rank its shard's gradient (about 2.4 MB a node per
    step; with the node's own reduce-scatter and all-gather on the link it would be 3 times that); sign sends far
    less; the persistent memory per rank shows the residuals the size of the shard and of the owned half."""
    out = tmp_path / "hsdp.json"
    args = ["--hosts", "4", "--hidden", "256", "--bandwidth", "1gbit", "--steps", "2", "--warmup", "2",
            "--methods", "hsdp-stock,hsdp-dsq-sign", "--phase-timeout", "60", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["errors"] == {}
    rows = doc["by_bandwidth"]["1gbit"]["rows"]
    shard_grad = doc["parameters"] * 4 / 2              # bytes of a node's shard of the fp32 gradients
    node = rows["hsdp-stock"]["bytes_per_step_per_rank"]
    assert 0.9 * 2 * shard_grad < node < 1.5 * 2 * shard_grad, (node, shard_grad)
    assert rows["hsdp-dsq-sign"]["bytes_per_step_per_rank"] * 5 < node, rows
    mem = doc["memory_per_rank"]["hsdp-dsq-sign"]
    assert abs(mem["grad_shards"] - shard_grad) < 0.01 * shard_grad, mem
    assert abs(mem["dsq_worker_residual"] - mem["grad_shards"]) < 0.01 * shard_grad, mem     # (block padding)
    assert 0.4 * shard_grad < mem["dsq_server_residual"] < 0.6 * shard_grad, mem
