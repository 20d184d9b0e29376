"""DeepSpeed's fp16 loss scaler and DoubleSqueeze's residuals.

Under ``"fp16"`` DeepSpeed multiplies the loss by a loss scale ``S`` (dynamic by default: halved when a gradient
overflows, doubled after ``loss_scale_window`` clean steps), so the gradients DoubleSqueeze compresses are ``S * g``
and its residuals hold mass in those units. Two rules keep the algorithm's meaning:

* **Units.** `LossScaleUnits` remembers the scale of the last reduction. When a step's scale differs, every
  residual is first multiplied by ``S_new / S_old`` (a power of two for DeepSpeed's scaler: exact), so that what the
  residuals deliver, in gradient units, is unchanged.
* **Overflow.** A step whose gradients overflow on some rank is skipped by DeepSpeed on every rank; DoubleSqueeze
  then changes no residual (the batch is dropped, nothing else is). Where every gradient is known before the first
  reduction (ZeRO 0 and 1), the ranks agree on overflow first, with one all-reduce of a flag, and nothing is
  compressed (`agree_on_overflow`); where buckets are reduced during backward (ZeRO 2 and 3), each uplink message
  carries its sender's non-finite flag, the owners' reduced partitions become NaN so that DeepSpeed's overflow check
  fires on every rank, and the residual is restored from its copy at the step's first reduction.
"""
from dataclasses import dataclass
from typing import Callable, List, Optional

import deepspeed.comm as ds_dist
import torch

__all__ = ["LossScaleUnits", "agree_on_overflow"]


@dataclass
class LossScaleUnits:
    """The loss scale the residuals are in units of: that of the last reduction (None: no reduction yet)."""

    scale: Optional[float] = None

    def follow(self, optimizer, rescale: Callable[[float], None]) -> None:
        """At a step's first reduction: if `optimizer.loss_scale` changed since the last one, ``rescale(new / old)``
        (multiply every residual by it); then remember the new scale."""
        scale = float(optimizer.loss_scale)
        if self.scale is not None and scale != self.scale:
            rescale(scale / self.scale)
        self.scale = scale


def agree_on_overflow(grads: List[torch.Tensor], group) -> bool:
    """Whether some rank of `group` has an Inf/NaN in its `grads` (one all-reduce of a flag: every rank gets the
    same answer). If so, every gradient is set to Inf, so that DeepSpeed's own overflow check skips the step and
    lowers the scale on every rank, as it would after its dense all-reduce."""
    if not grads:
        return False
    flag = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any().to(torch.float32).reshape(1)
    ds_dist.all_reduce(flag, op=ds_dist.ReduceOp.MAX, group=group)
    if not bool(flag.item()):
        return False
    for g in grads:
        g.fill_(float("inf"))
    return True
