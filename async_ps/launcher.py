"""``dsq-async-ps``: start the parameter server and N local workers running a training command.

One machine (server in this process, workers as child processes)::

    dsq-async-ps --num-workers 4 --compressor sign --max-staleness 8 -- python train.py ARGS

Several server processes on this machine (each owns one key range, with its own checkpoint directory
``--checkpoint-dir/server-I``; a server that dies is restarted from its checkpoint, up to ``--max-restarts``)::

    dsq-async-ps --num-servers 2 --num-workers 4 --checkpoint-dir ckpt -- python train.py ARGS

Several machines (one server per machine, then the workers, given every server's address)::

    dsq-async-ps --role server --bind tcp://0.0.0.0:5555 --num-workers 8 ...      # prints DSQ_PS_TOKEN to share
    dsq-async-ps --role server --num-servers 2 --server-index 1 --bind tcp://0.0.0.0:5555 ...   # on host B
    DSQ_PS_TOKEN=... dsq-async-ps --role worker --server tcp://A:5555,tcp://B:5555 --num-workers 4 -- python train.py

The launcher prints the server address (``tcp://HOST:PORT``) first, gives each worker ``DSQ_PS_ADDR``,
``DSQ_PS_TOKEN``, ``DSQ_PS_WORKER`` (its id), ``DSQ_PS_NUM_WORKERS`` and ``DSQ_PS_RESTART`` (how many times it
was restarted), restarts a worker that exits non-zero or is killed, up to ``--max-restarts`` times per worker
(torchrun's flag name; a restarted worker rejoins with a full pull), shows a progress bar, stops every child on
Ctrl-C or SIGTERM, and exits 0 only when every worker exited 0 (1 when a worker failed for good, 130 on Ctrl-C).
"""
import argparse
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

from dsq_plugins.compression.registry import get_compressor

from .protocol import DEFAULT_KEY_ELEMS, Limits
from .server import MODES, STALENESS_POLICIES, ParameterServer
from .worker import ENV_ADDR, ENV_NUM_WORKERS, ENV_TOKEN, ENV_WORKER

__all__ = ["main", "parse_args"]

log = logging.getLogger("async_ps.launcher")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dsq-async-ps", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("all", "server", "worker"), default="all",
                   help="all: server + local workers (default); server: only the server; worker: only workers")
    p.add_argument("--num-workers", type=int, default=1, help="local workers to start (role all/worker); with "
                   "role server, the number of workers the job expects")
    p.add_argument("--compressor", default="sign", help="uplink compressor spec (default sign)")
    p.add_argument("--server-compressor", default=None, help="downlink compressor spec (default: --compressor)")
    p.add_argument("--block-size", type=int, default=4096,
                   help="elements per compressed block (a multiple of 8; default 4096)")
    p.add_argument("--max-staleness", type=int, default=8, help="staleness bound in versions (default 8)")
    p.add_argument("--staleness-policy", choices=STALENESS_POLICIES, default="inverse",
                   help="step scale: inverse = 1/(1+tau) (default), constant = 1")
    p.add_argument("--mode", choices=MODES, default="async", help="async (default) or sync (a barrier per round)")
    p.add_argument("--bind", default=None, help="server endpoint (default tcp://127.0.0.1:0, any free port)")
    p.add_argument("--server", default=None,
                   help="role worker: the server's tcp://HOST:PORT (several servers: comma-separated, any order)")
    p.add_argument("--num-servers", type=int, default=1,
                   help="server processes, each owning one key range (role all: started here; default 1, in "
                        "this process)")
    p.add_argument("--server-index", type=int, default=0, help="role server: which key range this server owns")
    p.add_argument("--key-elems", type=int, default=DEFAULT_KEY_ELEMS,
                   help=f"elements per key, rounded up to whole blocks (default {DEFAULT_KEY_ELEMS})")
    p.add_argument("--threads", type=int, default=None, help="shard threads per server (default: up to 4)")
    p.add_argument("--worker-prefix", default=None,
                   help="worker ids are PREFIX0, PREFIX1, ... (default: '' for role all, HOSTNAME- for role worker)")
    p.add_argument("--heartbeat-timeout", type=float, default=10.0, help="seconds before a silent worker is dropped")
    p.add_argument("--max-restarts", type=int, default=0, help="restarts allowed per worker (default 0)")
    p.add_argument("--logdir", default=None, help="TensorBoard directory of the server")
    p.add_argument("--checkpoint-dir", default=None, help="where the server checkpoints")
    p.add_argument("--checkpoint-every-s", type=float, default=60.0, help="seconds between checkpoints (60)")
    p.add_argument("--checkpoint-every-pushes", type=int, default=None, help="applied pushes between checkpoints")
    p.add_argument("--resume", action="store_true", help="start the server from the checkpoint in --checkpoint-dir")
    p.add_argument("--max-frame-mb", type=float, default=1024.0,
                   help="largest frame the server reads, MiB (a bigger one closes that peer's connection)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the training command each worker runs")
    args = p.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if args.role != "server" and not args.command:
        p.error("give the training command after --, e.g. `dsq-async-ps --num-workers 2 -- python train.py`")
    if args.role == "worker" and not args.server:
        p.error("--role worker needs --server tcp://HOST:PORT")
    if args.role == "worker" and not os.environ.get(ENV_TOKEN):
        p.error(f"--role worker needs {ENV_TOKEN} (printed by the server's launcher) in the environment")
    if args.num_workers < 1 or args.max_restarts < 0:
        p.error("--num-workers must be >= 1 and --max-restarts >= 0")
    if args.num_servers < 1 or not 0 <= args.server_index < args.num_servers:
        p.error(f"--server-index must be in [0, --num-servers), got {args.server_index} of {args.num_servers}")
    if args.server_index and args.role != "server":
        p.error("--server-index is for --role server (role all starts every server itself)")
    if args.key_elems < 1 or (args.threads is not None and args.threads < 1):
        p.error("--key-elems and --threads must be >= 1")
    if args.max_staleness < 1:
        p.error(f"--max-staleness must be >= 1 (versions), got {args.max_staleness}")
    for flag, spec in (("--compressor", args.compressor), ("--server-compressor", args.server_compressor)):
        try:
            spec is None or get_compressor(spec)
        except ValueError as e:
            p.error(f"{flag}: {e}")
    return args


class _Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise _Interrupted(signal.Signals(signum).name)


class WorkerGroup:
    """The local worker processes: each in its own process group, restarted up to `max_restarts` times."""

    def __init__(self, command: List[str], env: dict, ids: List[str], max_restarts: int):
        self.command, self.env, self.ids, self.max_restarts = command, env, ids, max_restarts
        self.procs: Dict[str, subprocess.Popen] = {}
        self.restarts = {w: 0 for w in ids}
        self.finished = set()
        self.failed: Optional[str] = None

    def start(self, wid: str) -> None:
        env = dict(self.env, **{ENV_WORKER: wid, "DSQ_PS_RESTART": str(self.restarts[wid])})
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen(self.command, env=env, start_new_session=True)
        self.procs[wid] = proc
        _say(f"worker {wid} started (pid {proc.pid})")

    def poll(self) -> None:
        for wid, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is None or wid in self.finished:
                continue
            if rc == 0:
                self.finished.add(wid)
                continue
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            if self.restarts[wid] < self.max_restarts:
                self.restarts[wid] += 1
                _say(f"worker {wid} died ({how}); restart {self.restarts[wid]}/{self.max_restarts}")
                self.start(wid)
            else:
                _say(f"worker {wid} failed ({how}) and has no restarts left")
                self.failed = self.failed or wid

    @property
    def done(self) -> bool:
        return self.failed is not None or len(self.finished) == len(self.ids)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every running worker's process group, then SIGKILL whatever is left after `grace` seconds."""
        running = [p for p in self.procs.values() if p.poll() is None]
        for p in running:
            _killpg(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in running:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(p, signal.SIGKILL)
                p.wait(timeout=5)


def _killpg(proc: subprocess.Popen, sig) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


_PREFIX = ""            # role server of several: which one speaks


def _say(msg: str) -> None:
    print(f"dsq-async-ps: {_PREFIX}{msg}", file=sys.stderr, flush=True)


def _progress(disable: bool):
    from tqdm import tqdm
    return tqdm(desc="pushes", unit="push", disable=disable, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)


def _update(bar, st: dict) -> None:
    bar.update(st["applied"] - bar.n)
    bar.set_postfix(version=st["version"], live=st["live"], done=st["done"], rejected=st["rejected"],
                    skipped=st["skipped"], errors=st["errors"], refresh=False)


def _public_address(address: str, bind: str) -> str:
    """``tcp://0.0.0.0:P`` is where the server listens, not an address to connect to: name this host instead."""
    if address.startswith("tcp://0.0.0.0:") or address.startswith("tcp://*:"):
        return f"tcp://{socket.gethostname()}:{address.rsplit(':', 1)[1]}"
    return address


# The flags a child server gets from the launcher as they are.
_SERVER_FLAGS = ("compressor", "server_compressor", "block_size", "max_staleness", "staleness_policy", "mode",
                 "heartbeat_timeout", "num_workers", "checkpoint_every_s", "checkpoint_every_pushes", "max_frame_mb",
                 "key_elems", "threads")


class ServerGroup:
    """Role all with ``--num-servers N > 1``: N child launchers of role server, one key range each. A server that
    dies is restarted (with ``--resume`` from its checkpoint directory, when there is one; on the address it had)
    up to `max_restarts` times; the workers reconnect to it while the others go on."""

    def __init__(self, args, token: str):
        self.args, self.token = args, token
        self.n = args.num_servers
        self.procs: List[Optional[subprocess.Popen]] = [None] * self.n
        self.addresses: List[Optional[str]] = [None] * self.n
        self.restarts = [0] * self.n
        self.failed: Optional[int] = None

    def _command(self, i: int, resume: bool) -> List[str]:
        a = self.args
        cmd = [sys.executable, "-m", "async_ps.launcher", "--role", "server", "--num-servers", str(self.n),
               "--server-index", str(i), "--bind", self.addresses[i] or a.bind or "tcp://127.0.0.1:0",
               "--no-progress"]
        for name in _SERVER_FLAGS:
            value = getattr(a, name)
            if value is not None:
                cmd += [f"--{name.replace('_', '-')}", str(value)]
        for name in ("checkpoint_dir", "logdir"):
            if getattr(a, name):
                cmd += [f"--{name.replace('_', '-')}", os.path.join(getattr(a, name), f"server-{i}")]
        if resume or a.resume:
            cmd.append("--resume")
        return cmd

    def start(self, i: int, resume: bool = False) -> str:
        env = dict(os.environ, **{ENV_TOKEN: self.token})
        proc = subprocess.Popen(self._command(i, resume), env=env, stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
        line = proc.stdout.readline().strip()
        if not line.startswith("tcp://"):
            proc.wait(timeout=30)
            raise RuntimeError(f"server {i} did not start (exit code {proc.returncode})")
        self.procs[i], self.addresses[i] = proc, line
        _say(f"server {i} of {self.n} started (pid {proc.pid}) at {line}")
        return line

    def start_all(self) -> str:
        for i in range(self.n):
            self.start(i)
        return ",".join(self.addresses)

    def poll(self) -> None:
        for i, proc in enumerate(self.procs):
            rc = proc.poll()
            if rc is None or rc == 0:
                continue
            how = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
            if self.restarts[i] < self.args.max_restarts:
                self.restarts[i] += 1
                resume = bool(self.args.checkpoint_dir)
                how_back = (" from its checkpoint" if resume
                            else " (no --checkpoint-dir: its keys restart from a worker)")
                _say(f"server {i} died ({how}); restart {self.restarts[i]}/{self.args.max_restarts}{how_back}")
                self.start(i, resume=resume)
            elif self.failed is None:
                _say(f"server {i} failed ({how}) and has no restarts left")
                self.failed = i

    def stop(self, grace: float = 15.0) -> None:
        """Give the servers `grace` seconds to see every worker leave and exit on their own, then SIGTERM."""
        deadline = time.monotonic() + grace
        for p in self.procs:
            if p is not None and p.poll() is None:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _killpg(p, signal.SIGTERM)
        for p in self.procs:
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _killpg(p, signal.SIGKILL)
                    p.wait(timeout=5)


def _server(args, token: str) -> ParameterServer:
    return ParameterServer(
        bind=args.bind or "tcp://127.0.0.1:0", token=token, compressor=args.compressor,
        server_compressor=args.server_compressor, max_staleness=args.max_staleness,
        staleness_policy=args.staleness_policy, mode=args.mode, heartbeat_timeout=args.heartbeat_timeout,
        num_workers=args.num_workers, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every_s=args.checkpoint_every_s if args.checkpoint_dir else None,
        checkpoint_every_pushes=args.checkpoint_every_pushes, resume=args.resume, logdir=args.logdir,
        limits=Limits(max_frame_bytes=int(args.max_frame_mb * 2 ** 20)), block_size=args.block_size,
        num_servers=args.num_servers, server_index=args.server_index, key_elems=args.key_elems,
        threads=args.threads).start()


def main(argv=None) -> int:
    args = parse_args(argv)
    global _PREFIX
    if args.role == "server" and args.num_servers > 1:
        _PREFIX = f"server {args.server_index}: "
    logging.basicConfig(level=logging.WARNING, format="dsq-async-ps %(name)s: %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    server = group = servers = bar = None
    rc = 1
    try:
        if args.role == "server" or (args.role == "all" and args.num_servers == 1):
            token = os.environ.get(ENV_TOKEN) or secrets.token_hex(16)
            server = _server(args, token)
            address = _public_address(server.address, args.bind or "")
            print(address, flush=True)
            if args.role == "server" and not os.environ.get(ENV_TOKEN):
                _say(f"workers need: export {ENV_TOKEN}={token}")
        elif args.role == "all":
            token = os.environ.get(ENV_TOKEN) or secrets.token_hex(16)
            servers = ServerGroup(args, token)
            address = servers.start_all()
            print(address, flush=True)
        else:
            token, address = os.environ[ENV_TOKEN], args.server
            print(address, flush=True)
        bar = _progress(args.no_progress or server is None)
        if args.role in ("all", "worker"):
            prefix = args.worker_prefix if args.worker_prefix is not None else (
                "" if args.role == "all" else f"{socket.gethostname()}-")
            env = dict(os.environ, **{ENV_ADDR: address, ENV_TOKEN: token})
            if args.role == "all":
                env[ENV_NUM_WORKERS] = str(args.num_workers)
            group = WorkerGroup(args.command, env, [f"{prefix}{i}" for i in range(args.num_workers)],
                                args.max_restarts)
            for wid in group.ids:
                group.start(wid)
        while True:
            if servers is not None:
                servers.poll()
                if servers.failed is not None:
                    rc = 1
                    break
            if group is not None:
                group.poll()
                if group.done:
                    rc = 1 if group.failed else 0
                    break
            if server is not None:
                st = server.status()
                _update(bar, st)
                if group is None and st["done"] >= args.num_workers and st["live"] == 0:
                    rc = 0
                    break
            time.sleep(0.2)
    except _Interrupted as e:
        _say(f"{e}: stopping the workers and the server")
        rc = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if group is not None:
            group.stop()
        if servers is not None:
            servers.stop(grace=15.0 if rc == 0 else 0.0)
        if bar is not None:
            if server is not None:
                _update(bar, server.status())
            bar.close()
        verdict = "done" if rc == 0 else "FAILED" if rc == 1 else "interrupted"
        if server is not None:
            server.stop()
            st, errors = server.status(), dict(server.errors)
            restarts = sum(group.restarts.values()) if group else 0
            _say(f"{verdict}: version {st['version']}, "
                 f"{st['applied']} pushes applied, {st['rejected']} rejected as stale, {st['skipped']} skipped, "
                 f"{server.counters['dropped']} workers dropped (heartbeat), {server.counters['rejoined']} rejoined, "
                 f"{restarts} restarts, protocol errors {errors or 0}, bytes up {st['bytes_up']} "
                 f"down {st['bytes_down']}")
        elif group is not None or servers is not None:
            restarts = sum(group.restarts.values()) if group else 0
            more = f", {sum(servers.restarts)} server restarts" if servers is not None else ""
            _say(f"{verdict}: {restarts} restarts{more}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
