"""Server checkpoints on disk: one file, written atomically, read back without unpickling arbitrary objects.

A checkpoint holds one server's keys of the model ``x`` and of the initial model ``x0`` (lists of 1-D tensors in
key order; ``keys`` says which tensor and elements each is), the layout, which server of how many it is, its number
(``number``, see the server's durability), the version (steps applied), the counters, and per worker its downlink
copy ``x_hat_j`` of the same keys (so its downlink residual is ``x - x_hat_j``), its pull count and its push
counters. It is written with `torch.save` and read with
``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""
import os
from pathlib import Path
from typing import Optional

import torch

__all__ = ["FILENAME", "save", "load"]

FILENAME = "async_ps.pt"
FORMAT = 2


def save(directory, state: dict) -> Path:
    """Write `state` to ``directory/async_ps.pt`` atomically (a temporary file, then a rename): a crash while
    saving leaves the previous checkpoint intact."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILENAME
    tmp = directory / f".{FILENAME}.{os.getpid()}.tmp"
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load(directory) -> Optional[dict]:
    """The last checkpoint in `directory`, or None when there is none."""
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
    return state
