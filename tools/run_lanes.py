"""Runs commands side by side, one per lane, and fails if any of them fails: `make test` runs its pytest lanes with it.

Most of the suite is real multi-process training that starts torch and a framework in every process; run one test
after another, it keeps 1.5 of 2 cores busy on average. Two lanes of pytest, each over its own test files, keep
both busy; their launches then take turns on the cores, so the suite ran 13% faster (2026-12-08), not 25%.

Usage: ``python tools/run_lanes.py --lane NAME 'command' --lane NAME 'command' ...``. Each command runs under
``sh -c`` in a process group of its own, its output to a file; a lane's output is printed whole, under its name, as
the lane ends, so that no two lanes' lines interleave. The exit status is 0 when every lane exited 0, and else
that of the first lane, in the order given, that did not: a lane whose pytest collected no tests (exit 5) fails
the run. Interrupted (SIGINT, SIGTERM), it stops every lane's process group (SIGTERM, then SIGKILL after 10 s).
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lane", nargs=2, action="append", metavar=("NAME", "COMMAND"), required=True,
                    help="a lane's name and its shell command (repeat for each lane)")
    args = ap.parse_args(argv)
    names = [name for name, _ in args.lane]
    if len(set(names)) != len(names):
        ap.error(f"lane names must differ: {names}")

    lanes = {}

    def stop_all(signum, frame):
        """SIGTERM to every lane's process group, SIGKILL to what is left 10 s later."""
        running = [proc for _, proc, _, _ in lanes.values() if proc.poll() is None]
        for proc in running:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)          # what the lane's shell started and left behind
            except ProcessLookupError:
                pass
        sys.exit(128 + signum)

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    for name, command in args.lane:
        log = tempfile.TemporaryFile(prefix=f"lane-{name}-")
        proc = subprocess.Popen(["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        lanes[name] = (command, proc, log, time.monotonic())
        print(f"lane {name} started", flush=True)

    status, walls, pending = {}, {}, set(names)
    while pending:
        pid, code = os.wait()
        name = next((n for n in pending if lanes[n][1].pid == pid), None)
        if name is None:
            continue
        command, proc, log, start = lanes[name]
        proc.returncode = os.waitstatus_to_exitcode(code)
        status[name], walls[name] = proc.returncode, time.monotonic() - start
        pending.discard(name)
        log.seek(0)
        sys.stdout.write(f"\n===== lane {name}: {command}\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(log.read())
        sys.stdout.write(f"===== lane {name}: exit {proc.returncode} after {walls[name]:.0f} s\n")
        sys.stdout.flush()
        log.close()

    print("\n" + "\n".join(f"lane {n}: exit {status[n]}, {walls[n]:.0f} s" for n in names))
    failed = [status[n] for n in names if status[n] != 0]
    if not failed:
        return 0
    return failed[0] if failed[0] > 0 else 128 - failed[0]          # killed by signal N: 128 + N, as a shell says


if __name__ == "__main__":
    sys.exit(main())
