"""Error feedback: a residual memory keyed by tensor name or bucket, usable on the worker or the server side.

    v = x + e[key]        (compensate)
    e[key] <- v - C(v)    (update, with C(v) the decompressed message; or `swap` in a tensor that holds it)

so that what the compressor dropped is sent later instead of lost.
"""
from typing import Dict, Hashable, List, Optional, Sequence, Union

import torch

__all__ = ["ErrorFeedback"]


class ErrorFeedback:
    """Residuals by key. With ``enabled=False`` it keeps nothing and `compensate` is the identity (the
    no-error-feedback baselines)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.residuals: Dict[Hashable, torch.Tensor] = {}

    def compensate(self, key: Hashable, x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`x + e[key]`, written into `out` if given (a scratch tensor of x's size and dtype, reused from step to
        step), else a new tensor; `x` itself when there is nothing to add."""
        e = self.residuals.get(key) if self.enabled else None
        if e is None:
            return x
        if e.shape != x.shape or e.dtype != x.dtype:
            raise ValueError(f"residual {key!r} is {tuple(e.shape)} {e.dtype} but the tensor is "
                             f"{tuple(x.shape)} {x.dtype}: was the state loaded from another model or run?")
        return torch.add(x, e, out=out) if out is not None else x + e

    def update(self, key: Hashable, compensated: torch.Tensor, sent: Union[torch.Tensor, Sequence[torch.Tensor]]
               ) -> None:
        """`e[key] <- compensated - sent`, where `sent` is the decompressed message, or its consecutive pieces
        (one per shard). The residual is overwritten in place once it exists (no allocation per step)."""
        if not self.enabled:
            return
        pieces = [sent] if isinstance(sent, torch.Tensor) else list(sent)
        e = self.residuals.get(key)
        if e is None or e.shape != compensated.shape or e.dtype != compensated.dtype or e is compensated:
            e = self.residuals[key] = torch.empty(compensated.shape, dtype=compensated.dtype,
                                                  device=compensated.device)
        flat_v, flat_e = compensated.reshape(-1), e.view(-1)        # any shape; pieces are flat stretches
        start = 0
        for piece in pieces:
            end = start + piece.numel()
            torch.sub(flat_v[start:end], piece.reshape(-1), out=flat_e[start:end])
            start = end
        if start != compensated.numel():
            raise ValueError(f"residual {key!r}: the sent pieces hold {start} elements, the tensor "
                             f"{compensated.numel()}")

    def swap(self, key: Hashable, left: torch.Tensor) -> torch.Tensor:
        """Make `left` (what a message left behind, e.g. `BlockCodec.encode_residual`'s ``out``) the residual of
        `key`, without a copy, once the message counts as sent; returns the tensor it replaces (for the next
        message's ``out``), or a new one of `left`'s shape where there was none. Disabled: keeps nothing and
        returns `left`."""
        if not self.enabled:
            return left
        old = self.residuals.get(key)
        self.residuals[key] = left
        if old is None or old.shape != left.shape or old.dtype != left.dtype or old.device != left.device:
            old = torch.empty_like(left)
        return old

    def add(self, key: Hashable, x: torch.Tensor) -> None:
        """`e[key] += x` in place (a copy of `x` where there was no residual yet): mass that must be sent later,
        e.g. updates a restarted server lost. Disabled: keeps nothing."""
        if not self.enabled:
            return
        e = self.residuals.get(key)
        if e is None:
            self.residuals[key] = x.clone()
        else:
            e.add_(x)

    def get(self, key: Hashable) -> Optional[torch.Tensor]:
        return self.residuals.get(key)

    def norms(self) -> List[torch.Tensor]:
        """The L2 norm of each residual, as 0-d float32 tensors on the residuals' devices (nothing is copied to the
        host: the caller synchronises once, for all of them)."""
        return [torch.linalg.vector_norm(e.float()) for e in self.residuals.values()]

    def norm(self) -> float:
        """L2 norm over all residuals."""
        if not self.residuals:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(self.norms())))

    def __len__(self):
        return len(self.residuals)

    def state_dict(self) -> dict:
        return {"enabled": self.enabled, "residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, sd: dict) -> None:
        self.enabled = sd["enabled"]
        self.residuals = {k: v.clone() for k, v in sd["residuals"].items()}
