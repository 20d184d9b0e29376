"""The import path the README shows for the Lightning callbacks; they live in `dsq_plugins.frontends.lightning_callback`."""
from .frontends.lightning_callback import DoubleSqueezeCallback, FSDPDoubleSqueezeCallback

__all__ = ["DoubleSqueezeCallback", "FSDPDoubleSqueezeCallback"]
