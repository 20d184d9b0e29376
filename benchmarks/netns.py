"""A cluster of N hosts on one machine: network namespaces joined by a Linux bridge, every link shaped with `tc`.

Host i is the namespace ``<tag>-h<i>`` with one interface ``eth0`` (address 10.201.0.<i+1>/24, loopback up too),
the end of a veth pair whose other end ``<tag>v<i>`` is a port of the bridge ``<tag>br`` in the root namespace.
The bridge has no address, so the cluster's traffic never reaches the root namespace's routes. Each host gets its
own /etc/hosts (``/etc/netns/<namespace>/hosts``, which `ip netns exec` mounts over /etc/hosts) in which this
machine's host name resolves to that host's address, as on a real cluster: Gloo inside Horovod 0.28 binds its
process-set contexts to the address of the host name (here otherwise 127.0.0.1, and the ranks could not connect).
``<tag>`` is ``dsqc<pid of the creating process>``: names are unique per run, and a set whose creator is gone
(a killed run) is recognised and removed by `remove_stale()`.

Shaping (`Cluster.shape`) puts a token-bucket filter on both directions of every host's link: on ``eth0`` inside
the namespace (what the host sends) and on the bridge port (what the host receives), so each host has a full-duplex
link of the given rate, as behind a switch. Rates are tc rates (bits per second of whole frames, Ethernet header
included, as counted by /proc/net/dev). The bucket (`burst`) holds at least 64 KiB + one MTU, because veth passes
TSO/GSO super-packets of up to 64 KiB whole: a smaller bucket drops or stalls them.

Everything here needs root (ip, tc). `Cluster` is a context manager; `close()` is idempotent and removes every
namespace, veth and the bridge it created.
"""
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import List, Optional

PREFIX = "dsqc"
SUBNET = "10.201.0"
ETC_NETNS = Path("/etc/netns")
_NAME = re.compile(rf"^{PREFIX}(\d+)(?:-h\d+|br|v\d+)$")

__all__ = ["Cluster", "PREFIX", "parse_rate", "remove_stale", "leftovers"]


def _ip(*args, check=True, ns: Optional[str] = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def parse_rate(text: str) -> float:
    """'100mbit', '1gbit', '10gbit', '500kbit' (tc's decimal units) -> bits per second."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(k|m|g)?bit\s*", text.lower())
    if not m:
        raise ValueError(f"bad bandwidth {text!r}: expected e.g. 100mbit, 1gbit, 10gbit")
    return float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"cluster" in cmdline or b"netns" in cmdline or b"pytest" in cmdline


def _names():
    """(namespaces, links) in the root namespace that carry the prefix."""
    nss = [line.split()[0] for line in _ip("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", _ip("ip", "-o", "link", check=False).stdout, re.M)]
    return [n for n in nss if _NAME.match(n)], [n for n in links if _NAME.match(n)]


def leftovers(tag: Optional[str] = None) -> List[str]:
    """Our namespaces, links and /etc/netns folders still present (of one run `tag`, or of any run)."""
    nss, links = _names()
    etc = [d.name for d in ETC_NETNS.glob(f"{PREFIX}*")] if ETC_NETNS.is_dir() else []
    mine = lambda n: tag is None or (_NAME.match(n) and f"{PREFIX}{_NAME.match(n).group(1)}" == tag)  # noqa: E731
    return [n for n in nss + links if mine(n)] + [str(ETC_NETNS / n) for n in etc if mine(n)]


def remove_stale() -> List[str]:
    """Remove the namespaces, veths, bridges and /etc/netns folders left by runs whose process is gone; returns
    what was removed."""
    nss, links = _names()
    removed = []
    for d in ETC_NETNS.glob(f"{PREFIX}*") if ETC_NETNS.is_dir() else []:
        m = _NAME.match(d.name)
        if m and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    for name in nss + links:
        if not _alive(int(_NAME.match(name).group(1))):
            args = ("ip", "netns", "del", name) if name in nss else ("ip", "link", "del", name)
            if _ip(*args, check=False).returncode == 0:
                removed.append(name)
    return removed


class Cluster:
    """`hosts` namespaces on one bridge. Attributes: `namespaces`, `addresses` (host i's IPv4), `ifname`
    ('eth0', the name of every host's interface inside its namespace), `tag`."""

    ifname = "eth0"

    def __init__(self, hosts: int, tag: Optional[str] = None):
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.namespaces = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.ports = [f"{self.tag}v{i}" for i in range(hosts)]
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(hosts)]
        self.rate_bps: Optional[float] = None
        self._up = False

    def __enter__(self):
        self.create()
        return self

    def __exit__(self, *exc):
        self.close()

    def create(self) -> None:
        self._up = True           # from the first command on, close() has something to remove
        _ip("ip", "link", "add", self.bridge, "type", "bridge")
        _ip("ip", "link", "set", self.bridge, "up")
        for i, (ns, port) in enumerate(zip(self.namespaces, self.ports)):
            _ip("ip", "netns", "add", ns)
            etc = ETC_NETNS / ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(f"127.0.0.1 localhost\n{self.addresses[i]} {socket.gethostname()}\n"
                                       + "".join(f"{a} {n}\n" for a, n in zip(self.addresses, self.namespaces)))
            inner = f"{self.tag}n{i}"
            _ip("ip", "link", "add", port, "type", "veth", "peer", "name", inner)
            _ip("ip", "link", "set", inner, "netns", ns)
            _ip("ip", "link", "set", inner, "name", self.ifname, ns=ns)
            _ip("ip", "addr", "add", f"{self.addresses[i]}/24", "dev", self.ifname, ns=ns)
            _ip("ip", "link", "set", self.ifname, "up", ns=ns)
            _ip("ip", "link", "set", "lo", "up", ns=ns)
            _ip("ip", "link", "set", port, "master", self.bridge)
            _ip("ip", "link", "set", port, "up")

    def shape(self, rate: Optional[str]) -> None:
        """Shape every link to `rate` (e.g. '100mbit') both ways, or remove the shaping (None)."""
        for ns, port in zip(self.namespaces, self.ports):
            for dev, where in ((self.ifname, ns), (port, None)):
                if rate is None:
                    _ip("tc", "qdisc", "del", "dev", dev, "root", check=False, ns=where)
                    continue
                bps = parse_rate(rate)
                burst = max(65536 + 1600, int(bps / 8 * 0.001))      # >= one GSO packet, >= 1 ms at the rate
                limit = max(2 * burst, int(bps / 8 * 0.02))           # queue: about 20 ms at the rate
                _ip("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst),
                    "limit", str(limit), ns=where)
        self.rate_bps = parse_rate(rate) if rate else None

    def counters(self, i: int) -> dict:
        """Host i's kernel counters (bytes): tx = what the host sent, rx = what it received (read on the bridge
        port in the root namespace, where the directions are swapped)."""
        d = Path("/sys/class/net") / self.ports[i] / "statistics"
        return {"tx": int((d / "rx_bytes").read_text()), "rx": int((d / "tx_bytes").read_text())}

    def exec_prefix(self, i: int) -> List[str]:
        return ["ip", "netns", "exec", self.namespaces[i]]

    def close(self) -> None:
        if not self._up:
            return
        for ns in self.namespaces:
            _ip("ip", "netns", "del", ns, check=False)       # takes its veth end, and so the pair, with it
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)
        for port in self.ports:
            if Path(f"/sys/class/net/{port}").exists():
                _ip("ip", "link", "del", port, check=False)
        _ip("ip", "link", "del", self.bridge, check=False)
        self._up = False
