"""DoubleSqueeze for DeepSpeed: a "doublesqueeze" section in the DeepSpeed config JSON that installs compressed,
error-compensated gradient communication in the engine.

    {"train_micro_batch_size_per_gpu": 32, ..., "doublesqueeze": {"enabled": true, "compressor": "sign"}}

The section alone switches it on in any program that calls `deepspeed.initialize` (a script, the Hugging Face
Trainer, Lightning's DeepSpeedStrategy): installing this package puts an import hook in place (`dsq_autohook`,
off with ``DSQ_AUTOHOOK=0``) that wraps `deepspeed.initialize` when DeepSpeed is imported. The explicit forms::

    import deepspeed_ext
    engine, optimizer, _, _ = deepspeed_ext.initialize(model=model, optimizer=optimizer, config="ds_config.json")
    deepspeed_ext.install(engine, config)              # an engine built elsewhere

Without the section (or with ``"enabled": false``) all of these are exactly `deepspeed.initialize`. A section
with settings but without ``"enabled": true`` is ignored with a warning, as DeepSpeed's own sections are off by
default.

Momentum instead of gradients: pass a `dsq_plugins.DoubleSqueezeAdamW` as `deepspeed.initialize`'s `optimizer`
(ZeRO stage 0, fp32; no section) and the optimizer moves every byte (`deepspeed_ext/adamw.py`).
"""
import functools

import deepspeed

from .adamw import install_optimizer, uses_doublesqueeze_adamw
from .config import SECTION, DoubleSqueezeSection, read_section
from .engine import DeepSpeedMonitor, install

__all__ = ["DeepSpeedMonitor", "DoubleSqueezeSection", "SECTION", "initialize", "initialize_with", "install",
           "install_optimizer", "read_section"]


def _config_argument(args, kwargs):
    given = kwargs.get("config", kwargs.get("config_params"))
    ds_args = kwargs.get("args", args[0] if args else None)
    if given is None and ds_args is not None:
        given = getattr(ds_args, "deepspeed_config", None)
    return given


def initialize_with(original, *args, **kwargs):
    """`original` (DeepSpeed's own `initialize`) with DoubleSqueeze installed when the config's section enables
    it, or with a `DoubleSqueezeAdamW` optimizer given the communication. The section is validated before the
    engine is built (a bad key or value raises ValueError naming the valid ones); a section the engine cannot
    honour (fp16 at ZeRO 0, pipeline parallelism, ...) raises before any step."""
    read_section(_config_argument(args, kwargs))
    result = original(*args, **kwargs)
    engine = result[0]
    section = read_section(engine.config)
    if uses_doublesqueeze_adamw(engine):
        if section is not None:
            raise ValueError("the \"doublesqueeze\" section compresses the gradients and DoubleSqueezeAdamW the "
                             "momentum: choose one (the optimizer's config= and warmup_config= say how it "
                             "compresses)")
        install_optimizer(engine)
    elif section is not None and getattr(engine, "doublesqueeze", None) is None:
        install(engine, section)
    return result


@functools.wraps(getattr(deepspeed, "_dsq_original_initialize", deepspeed.initialize))
def initialize(*args, **kwargs):
    """`deepspeed.initialize`, same arguments and return values, plus DoubleSqueeze when the config's
    "doublesqueeze" section enables it."""
    return initialize_with(getattr(deepspeed, "_dsq_original_initialize", deepspeed.initialize), *args, **kwargs)
