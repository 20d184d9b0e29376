"""tools/run_lanes.py, which `make test` runs its pytest lanes with: the lanes run side by side, each lane's output
is printed whole under its name, and the run fails with the first failed lane's status."""
import os
import signal
import subprocess
import sys
import time

from .conftest import ROOT

RUNNER = ROOT / "tools" / "run_lanes.py"


def lanes(*pairs, timeout=60):
    cmd = [sys.executable, str(RUNNER)]
    for name, command in pairs:
        cmd += ["--lane", name, command]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def meet(me, other, d):
    """A lane that marks its start and waits up to 30 s for the other lane's mark: both see each other only if they
    run at the same time."""
    return (f"echo {me}1; touch {d}/{me}; i=0; while [ ! -e {d}/{other} ] && [ $i -lt 300 ]; do sleep 0.1; "
            f"i=$((i+1)); done; test -e {d}/{other} && echo {me}2")


def test_lanes_run_side_by_side_and_their_output_does_not_interleave(tmp_path):
    proc = lanes(("a", meet("a", "b", tmp_path)), ("b", meet("b", "a", tmp_path)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for name in "ab":
        block = out[out.index(f"===== lane {name}: echo"):out.index(f"===== lane {name}: exit 0")]
        assert f"{name}1\n{name}2\n" in block, out


def test_the_first_failed_lane_sets_the_status_and_the_others_still_finish():
    proc = lanes(("ok", "sleep 0.5; echo done"), ("bad", "exit 3"), ("worse", "exit 5"))
    assert proc.returncode == 3, proc.stdout
    assert "done" in proc.stdout and "lane ok: exit 0" in proc.stdout and "lane worse: exit 5" in proc.stdout


def test_a_lane_killed_by_a_signal_fails_the_run():
    proc = lanes(("ok", "true"), ("killed", "kill -9 $$"))
    assert proc.returncode == 128 + 9, proc.stdout


def test_lane_names_must_differ():
    proc = lanes(("a", "true"), ("a", "true"))
    assert proc.returncode == 2 and "lane names must differ" in proc.stderr


def test_stopped_it_stops_every_lane(tmp_path):
    """SIGTERM to the runner: each lane's process group gets SIGTERM (the lane's own processes with it), and the
    runner exits 128 + 15."""
    marker = tmp_path / "pid"
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--lane", "a", f"sleep 300 & echo $! > {marker}; wait",
                             "--lane", "b", "sleep 300"], stdout=subprocess.PIPE, text=True)
    for _ in range(300):
        if marker.exists() and marker.read_text().strip():
            break
        time.sleep(0.05)
    sleeper = int(marker.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    for _ in range(100):                     # the sleep's parent shell reaps it
        if not os.path.exists(f"/proc/{sleeper}") or open(f"/proc/{sleeper}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the lane's process outlived the runner")
