"""The import path the README shows for the Hugging Face Trainer callback; it lives in `dsq_plugins.frontends.hf_trainer`."""
from .frontends.hf_trainer import DoubleSqueezeCallback

__all__ = ["DoubleSqueezeCallback"]
