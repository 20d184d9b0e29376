import os
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
    """Run `script` under the real `deepspeed` launcher with `nproc` local CPU ranks (gloo)."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(nproc), str(script),
           *map(str, args)]
    return _run(cmd, timeout, check)


def _run(cmd, timeout, check) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def load_ranks(out: Path, nproc: int, name: str = "rank"):
    return [torch.load(out / f"{name}{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(name="horovodrun")
def horovodrun_fixture():
    return horovodrun


@pytest.fixture
def torchrun():
    return launch
