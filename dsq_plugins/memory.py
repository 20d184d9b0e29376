"""Error feedback: a residual memory keyed by tensor name or bucket, usable on the worker or the server side.

    v = x + e[key]        (compensate)
    e[key] <- v - C(v)    (update, with C(v) the decompressed message)

so that what the compressor dropped is sent later instead of lost.
"""
from typing import Dict, Hashable, Optional

import torch

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Residuals by key. With ``enabled=False`` it keeps nothing and `compensate` is the identity (the
    no-error-feedback baselines)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.residuals: Dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, x: torch.Tensor) -> torch.Tensor:
        """`x + e[key]` as a new tensor (or `x` itself when there is nothing to add)."""
        e = self.residuals.get(key) if self.enabled else None
        if e is None:
            return x
        if e.shape != x.shape or e.dtype != x.dtype:
            raise ValueError(f"residual {key!r} is {tuple(e.shape)} {e.dtype} but the tensor is "
                             f"{tuple(x.shape)} {x.dtype}: was the state loaded from another model or run?")
        return x + e

    def update(self, key: Hashable, compensated: torch.Tensor, sent: torch.Tensor) -> None:
        """`e[key] <- compensated - sent`, where `sent` is the decompressed message."""
        if self.enabled:
            self.residuals[key] = compensated - sent

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        return self.residuals.get(key)

    def norm(self) -> float:
        """L2 norm over all residuals."""
        if not self.residuals:
            return 0.0
        return float(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(e.float()) for e in self.residuals.values()])))

    def __len__(self):
        return len(self.residuals)

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.enabled = sd["enabled"]
        self.residuals = {k: v.clone() for k, v in sd["residuals"].items()}
