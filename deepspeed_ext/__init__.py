"""DoubleSqueeze for DeepSpeed: a "doublesqueeze" section in the DeepSpeed config JSON that installs compressed,
error-compensated gradient communication in the engine.

    import deepspeed_ext
    engine, optimizer, _, _ = deepspeed_ext.initialize(model=model, optimizer=optimizer, config="ds_config.json")

with ``"doublesqueeze": {"enabled": true, "compressor": "sign"}`` in the config. Without the section (or with
``"enabled": false``) this is exactly `deepspeed.initialize`. `deepspeed_ext.install(engine, config)` does the
same for an engine built elsewhere.
"""
import functools

import deepspeed

from .config import SECTION, DoubleSqueezeSection, read_section
from .engine import DeepSpeedMonitor, install

__all__ = ["DeepSpeedMonitor", "DoubleSqueezeSection", "SECTION", "initialize", "install", "read_section"]


@functools.wraps(deepspeed.initialize)
def initialize(*args, **kwargs):
    """`deepspeed.initialize`, same arguments and return values, plus DoubleSqueeze when the config's
    "doublesqueeze" section enables it. The section is validated before the engine is built (a bad key or
    value raises ValueError naming the valid ones)."""
    given = kwargs.get("config", kwargs.get("config_params"))
    ds_args = kwargs.get("args", args[0] if args else None)
    if given is None and ds_args is not None:
        given = getattr(ds_args, "deepspeed_config", None)
    read_section(given)
    result = deepspeed.initialize(*args, **kwargs)
    engine = result[0]
    section = read_section(engine.config)
    if section is not None:
        install(engine, section)
    return result
