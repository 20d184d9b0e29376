"""The switch of the CPU-only fast paths (numpy, numba) beside the pure-torch code that every device runs.

Every hot operation is written in torch ops that run on any device; where numpy or numba does the same thing
faster on the CPU, that is a specialisation taken only for CPU tensors and only while fast paths are on. Setting
the environment variable ``DSQ_FAST_PATHS=0`` (or calling `set_enabled(False)`) turns them all off, so that the
test suite can run the code CUDA runs on a machine without a GPU.
"""
import os

import torch

__all__ = ["ENV", "enabled", "set_enabled", "on_cpu"]

ENV = "DSQ_FAST_PATHS"
_enabled = os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)


def on_cpu(*tensors: torch.Tensor) -> bool:
    """Whether the CPU fast paths apply to these tensors: fast paths on, and every tensor on the CPU."""
    return _enabled and all(t.device.type == "cpu" for t in tensors)
