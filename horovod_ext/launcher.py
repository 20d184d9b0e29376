"""`dsq-horovodrun`: `horovodrun` plus the `--dsq-*` flags that switch `horovod_ext.DistributedOptimizer` to
DoubleSqueeze without editing the training script.

    dsq-horovodrun --dsq-compressor sign [--dsq-server-compressor SPEC] [--dsq-warmup-steps N]
                   [--dsq-block-size N] [--dsq-candidates SPECS] [--dsq-no-server-ef] [--dsq-logdir DIR]
                   HOROVODRUN-ARGS...
                   python train.py ARGS...

The `--dsq-*` flags may stand anywhere before the training command (those after it are the script's own).
They are validated before any worker starts; a bad value exits with status 2 and a message naming the valid
compressors. Then horovodrun runs with the other arguments, unchanged, and the config in the environment.
"""
import argparse
import json
import os
import sys
from typing import List, Tuple

from .flags import ENV_CONFIG, ENV_LOGDIR, add_flags, config_from_flags

__all__ = ["main", "split_argv"]

_VALUED = ("--dsq-compressor", "--dsq-server-compressor", "--dsq-warmup-steps", "--dsq-block-size", "--dsq-logdir",
           "--dsq-candidates")
_SWITCHES = ("--dsq-no-server-ef",)


def _dsq_positions(argv: List[str]) -> List[int]:
    """Indices of the tokens that are `--dsq-*` flags or their values."""
    out, i = [], 0
    while i < len(argv):
        if argv[i].startswith("--dsq-"):
            out.append(i)
            # A misspelt flag keeps its value too, so that argparse names the flag rather than horovodrun
            # mistaking the value for the training command.
            unknown_with_value = ("=" not in argv[i] and argv[i] not in _VALUED + _SWITCHES
                                  and i + 1 < len(argv) and not argv[i + 1].startswith("-"))
            if (argv[i] in _VALUED and i + 1 < len(argv)) or unknown_with_value:
                out.append(i + 1)
                i += 1
        i += 1
    return out


def _horovod_command(argv: List[str]) -> List[str]:
    """The training command horovodrun's own parser finds in `argv`."""
    from horovod.runner import launch
    saved = sys.argv
    try:
        sys.argv = ["horovodrun"] + argv
        return list(launch.parse_args().command)
    finally:
        sys.argv = saved


def split_argv(argv: List[str]) -> Tuple[List[str], List[str]]:
    """(the `--dsq-*` tokens before the training command, horovodrun's argv without them)."""
    dsq = set(_dsq_positions(argv))
    rest = [a for i, a in enumerate(argv) if i not in dsq]
    command = _horovod_command(rest) if rest else []
    kept = [i for i in range(len(argv)) if i not in dsq]
    start = kept[len(kept) - len(command)] if command else len(argv)
    ours = [a for i, a in enumerate(argv) if i in dsq and i < start]
    return ours, [a for i, a in enumerate(argv) if i >= start or i not in dsq]


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="dsq-horovodrun", add_help=False,
                                     description="horovodrun with DoubleSqueeze flags; every other argument is "
                                                 "horovodrun's (see horovodrun --help).")
    add_flags(parser)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        print("\nhorovodrun's own arguments follow.\n", flush=True)
        os.execv(sys.executable, [sys.executable, "-m", "horovod.runner.launch", "--help"])
    ours, horovod_argv = split_argv(argv)
    ns = parser.parse_args(ours)     # an unknown --dsq-* flag exits 2 here, naming the valid ones
    try:
        config = config_from_flags(ns)
    except ValueError as e:
        parser.exit(2, f"dsq-horovodrun: error: {e}\n")
    env = dict(os.environ)
    env.pop(ENV_CONFIG, None)
    env.pop(ENV_LOGDIR, None)
    if config is not None:
        env[ENV_CONFIG] = json.dumps(config.to_dict())
        if ns.dsq_logdir:
            env[ENV_LOGDIR] = os.path.abspath(ns.dsq_logdir)
        print(f"dsq-horovodrun: DoubleSqueeze on: {json.dumps(config.to_dict())}", file=sys.stderr, flush=True)
    os.execve(sys.executable, [sys.executable, "-m", "horovod.runner.launch"] + horovod_argv, env)


if __name__ == "__main__":
    main()
