"""The import path the README shows for the Lightning callback; it lives in `dsq_plugins.frontends.lightning_callback`."""
from .frontends.lightning_callback import DoubleSqueezeCallback

__all__ = ["DoubleSqueezeCallback"]
