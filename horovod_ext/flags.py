"""The `dsq-horovodrun` flags, and how they reach the workers: one environment variable holding the config
as JSON (horovodrun exports the launcher's environment to every worker, local or remote) and one for the
TensorBoard folder."""
import argparse
import json
import os
from typing import Optional

from dsq_plugins.config import DoubleSqueezeConfig
from dsq_plugins.registry import available_compressors

__all__ = ["ENV_CONFIG", "ENV_LOGDIR", "add_flags", "config_from_flags", "config_from_env", "logdir_from_env"]

ENV_CONFIG = "DSQ_HOROVOD_CONFIG"
ENV_LOGDIR = "DSQ_HOROVOD_LOGDIR"


def add_flags(parser: argparse.ArgumentParser) -> None:
    valid = ", ".join(available_compressors())
    group = parser.add_argument_group("DoubleSqueeze (switches horovod_ext.DistributedOptimizer on)")
    group.add_argument("--dsq-compressor", metavar="SPEC",
                       help=f"worker compressor: one of {valid} (with ':ARG' where it takes one, e.g. topk:0.01), "
                            f"a sparsifier+quantiser (topk:0.01+int4), or auto (dense or a candidate, per bucket, "
                            f"from measured step times)")
    group.add_argument("--dsq-candidates", metavar="SPECS",
                       help="with --dsq-compressor auto: the compressors it may choose, comma-separated "
                            "(default sign,grouptopk:0.03+sign)")
    group.add_argument("--dsq-server-compressor", metavar="SPEC",
                       help="server (downlink) compressor; default: the same as --dsq-compressor")
    group.add_argument("--dsq-warmup-steps", metavar="N", type=int,
                       help="steps averaged densely before compression starts (default 0)")
    group.add_argument("--dsq-block-size", metavar="N", type=int,
                       help="elements per compressed block (a multiple of 8; default 4096)")
    group.add_argument("--dsq-no-server-ef", action="store_true",
                       help="drop the server residual (the server re-compresses without memory)")
    group.add_argument("--dsq-logdir", metavar="DIR", help="rank 0 writes TensorBoard metrics here")


def config_from_flags(ns: argparse.Namespace) -> Optional[DoubleSqueezeConfig]:
    """The config the flags ask for (None without `--dsq-compressor`). Raises ValueError on a bad value,
    naming the valid compressors."""
    others = [f for f in ("dsq_server_compressor", "dsq_warmup_steps", "dsq_block_size", "dsq_logdir",
                          "dsq_candidates")
              if getattr(ns, f) is not None]
    if ns.dsq_compressor is None:
        if others or ns.dsq_no_server_ef:
            raise ValueError("--dsq-compressor is required with the other --dsq-* flags")
        return None
    kwargs = {"compressor": ns.dsq_compressor, "server_compressor": ns.dsq_server_compressor,
              "server_ef": not ns.dsq_no_server_ef}
    if ns.dsq_warmup_steps is not None:
        kwargs["warmup_steps"] = ns.dsq_warmup_steps
    if ns.dsq_block_size is not None:
        kwargs["block_size"] = ns.dsq_block_size
    if ns.dsq_candidates is not None:
        kwargs["candidates"] = ns.dsq_candidates
    return DoubleSqueezeConfig(**kwargs)


def config_from_env(environ=os.environ) -> Optional[DoubleSqueezeConfig]:
    """The config `dsq-horovodrun` handed to this worker, or None."""
    text = environ.get(ENV_CONFIG)
    if not text:
        return None
    try:
        d = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{ENV_CONFIG} is not valid JSON ({e}): {text!r}") from None
    return DoubleSqueezeConfig.from_dict(d)


def logdir_from_env(environ=os.environ) -> Optional[str]:
    return environ.get(ENV_LOGDIR) or None
