"""DoubleSqueeze under PyTorch FSDP2: ``dsq_plugins.fsdp.install(model, config)`` after the `fully_shard` calls
(implemented in `dsq_plugins.frontends.fsdp`)."""
from .frontends.fsdp import Downlink, FSDPDoubleSqueezeState, install

__all__ = ["Downlink", "FSDPDoubleSqueezeState", "install"]
