import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def launch(nproc: int, script, args=(), timeout: float = 180.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run `script` under the real `torchrun --standalone` with `nproc` local ranks (gloo on loopback)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(script), *map(str, args)]
    return _run(cmd, timeout, check)


def horovodrun(nproc: int, script, args=(), timeout: float = 180.0, check: bool = True,
               launcher: str = "horovodrun", flags=()) -> subprocess.CompletedProcess:
    """Run `script` under the real `horovodrun` (or `dsq-horovodrun`, with `flags` before the rest) with
    `nproc` local ranks on Gloo."""
    cmd = [str(Path(sys.executable).parent / launcher), *map(str, flags), "-np", str(nproc), "--gloo",
           "-H", f"localhost:{nproc}", sys.executable, str(script), *map(str, args)]
    return _run(cmd, timeout, check)


def deepspeed_launch(nproc: int, script, args=(), timeout: float = 180.0, check: bool = True):
    """Run `script` under the real `deepspeed` launcher with `nproc` local CPU ranks (gloo), on a free port (the
    launcher's default, 29500, would collide with another job's)."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(nproc),
           "--master_port", str(free_port()), str(script), *map(str, args)]
    return _run(cmd, timeout, check)


def free_port() -> int:
    """A TCP port of the loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout, check) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


class Cases:
    """The cases of one launch of a worker (`--cases`, `checks.run_cases`): several runs, each with its own model and
    state, on one process group, so that a launch's start-up (Python, torch and the framework in every process, the
    rendezvous) is paid once. `ranks(name)` are a case's results (its failure, if it failed, in the assertion); `failure(name)`
    the error it raised on rank 0, or None."""

    def __init__(self, out, nproc: int, names, proc=None):
        self.out, self.nproc, self.names, self.proc = out, nproc, list(names), proc

    def failure(self, name: str):
        path = self.out / name / "failed0.txt"
        return path.read_text() if path.exists() else None

    def ranks(self, name: str, prefix: str = "rank"):
        """The case's OUT/name/{prefix}{r}.pt of every rank."""
        assert name in self.names, name
        failed = self.failure(name)
        assert failed is None, f"case {name} failed:\n{failed}"
        return load_ranks(self.out / name, self.nproc, prefix)

    def refused(self, name: str, message: str, marker: str = None) -> None:
        """The case failed with `message` on every rank, and trained nothing. With `marker`, the worker also wrote
        OUT/name/{marker}{rank}.txt with the message where it raised (the DeepSpeed workers: "refused", from
        `deepspeed.initialize` itself, before any step)."""
        for r in range(self.nproc):
            path = self.out / name / f"failed{r}.txt"
            assert path.exists(), f"case {name} did not fail on rank {r}"
            assert message in path.read_text(), path.read_text()[:2000]
            if marker is not None:
                where = self.out / name / f"{marker}{r}.txt"
                assert where.exists() and message in where.read_text(), f"case {name}: not raised at {marker}"
        assert not (self.out / name / "rank0.pt").exists()


def launch_cases(tmp_path, nproc: int, cases: dict, *common, worker, launcher=launch, timeout=600) -> Cases:
    """One launch of `worker` (a test worker whose main is `checks.run_cases`) running every case of `cases`
    ({name: [arguments]}, after the `common` ones), in `tmp_path`/cases/name."""
    out = tmp_path / "cases"
    proc = launcher(nproc, worker, [out, "--cases", json.dumps({k: list(map(str, v)) for k, v in cases.items()}),
                                    *map(str, common)], timeout=timeout)
    return Cases(out, nproc, cases, proc)


def load_ranks(out: Path, nproc: int, name: str = "rank"):
    return [torch.load(out / f"{name}{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(name="horovodrun")
def horovodrun_fixture():
    return horovodrun


@pytest.fixture
def torchrun():
    return launch
