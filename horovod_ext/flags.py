"""The `dsq-horovodrun` flags, and how they reach the workers: one environment variable holding the config
as JSON (horovodrun exports the launcher's environment to every worker, local or remote) and one for the
TensorBoard folder."""
import argparse
import json
import os
from typing import Optional

from dsq_plugins.config import DEFAULT_CANDIDATES, DoubleSqueezeConfig
from dsq_plugins.compression.registry import available_compressors

__all__ = ["ENV_CONFIG", "ENV_LOGDIR", "add_flags", "config_from_flags", "config_from_env", "logdir_from_env"]

ENV_CONFIG = "DSQ_HOROVOD_CONFIG"
ENV_LOGDIR = "DSQ_HOROVOD_LOGDIR"
_D = DoubleSqueezeConfig()          # every default is DoubleSqueezeConfig's


def add_flags(parser: argparse.ArgumentParser) -> None:
    valid = ", ".join(available_compressors())
    group = parser.add_argument_group("DoubleSqueeze (switches horovod_ext.DistributedOptimizer on)")
    group.add_argument("--dsq-compressor", metavar="SPEC",
                       help=f"worker compressor: 'default' ({_D.compressor}), one of {valid} (with ':ARG' where it "
                            f"takes one, e.g. topk:0.01), a sparsifier+quantiser (topk:0.01+int4), or auto (dense or "
                            f"a candidate, per bucket, from measured step times)")
    group.add_argument("--dsq-candidates", metavar="SPECS",
                       help=f"with --dsq-compressor auto: the compressors it may choose, comma-separated "
                            f"(default {DEFAULT_CANDIDATES})")
    group.add_argument("--dsq-guard", metavar="F", type=float,
                       help=f"the quality guard: a tensor whose compression keeps less than F of the compressor's "
                            f"nominal contraction moves to --dsq-fallback, then dense (default {_D.guard}; 0: off)")
    group.add_argument("--dsq-fallback", metavar="SPEC",
                       help=f"where the guard moves a failing tensor (default {_D.fallback}; 'dense': straight to "
                            f"dense)")
    group.add_argument("--dsq-server-compressor", metavar="SPEC",
                       help="server (downlink) compressor; default: the same as --dsq-compressor")
    group.add_argument("--dsq-warmup-steps", metavar="N", type=int,
                       help=f"steps averaged densely before compression starts (default {_D.warmup_steps})")
    group.add_argument("--dsq-block-size", metavar="N", type=int,
                       help=f"elements per compressed block (a multiple of 8; default {_D.block_size})")
    group.add_argument("--dsq-policy", metavar="RULES",
                       help="per-tensor compressors, 'selector=spec,...' with selectors role:embedding, role:head, "
                            "role:norm, role:bias, role:matrix or parameter-name patterns, specs a compressor or "
                            "dense (e.g. 'role:embedding=int8,role:norm=dense'); the first rule matching decides")
    group.add_argument("--dsq-no-server-ef", action="store_true",
                       help="drop the server residual (the server re-compresses without memory)")
    group.add_argument("--dsq-logdir", metavar="DIR", help="rank 0 writes TensorBoard metrics here")


def config_from_flags(ns: argparse.Namespace) -> Optional[DoubleSqueezeConfig]:
    """The config the flags ask for (None without `--dsq-compressor`). Raises ValueError on a bad value,
    naming the valid compressors."""
    others = [f for f in ("dsq_server_compressor", "dsq_warmup_steps", "dsq_block_size", "dsq_logdir",
                          "dsq_candidates", "dsq_guard", "dsq_fallback", "dsq_policy")
              if getattr(ns, f, None) is not None]
    if ns.dsq_compressor is None:
        if others or ns.dsq_no_server_ef:
            raise ValueError("--dsq-compressor is required with the other --dsq-* flags")
        return None
    compressor = _D.compressor if ns.dsq_compressor.strip() == "default" else ns.dsq_compressor
    kwargs = {"compressor": compressor, "server_compressor": ns.dsq_server_compressor,
              "server_ef": not ns.dsq_no_server_ef}
    if getattr(ns, "dsq_guard", None) is not None:
        kwargs["guard"] = ns.dsq_guard
    if getattr(ns, "dsq_fallback", None) is not None:
        kwargs["fallback"] = None if ns.dsq_fallback.strip() == "dense" else ns.dsq_fallback
    if ns.dsq_warmup_steps is not None:
        kwargs["warmup_steps"] = ns.dsq_warmup_steps
    if ns.dsq_block_size is not None:
        kwargs["block_size"] = ns.dsq_block_size
    if ns.dsq_candidates is not None:
        kwargs["candidates"] = ns.dsq_candidates
    if getattr(ns, "dsq_policy", None) is not None:
        kwargs["policy"] = ns.dsq_policy
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
