"""Free TCP ports for servers a Ray node shares a machine with (a leaf: stdlib only).

`free_ports(n)` chooses n distinct ports at once, held open together while choosing, below the
kernel's ephemeral range and above Ray's worker ports, each free on every IPv4 address and on
IPv6. Choosing ports one at a time (bind port 0, close, bind port 0 again) can return the same
port twice, and a port in the ephemeral range can be taken by any process binding port 0 before
the server that was meant to use it starts (both seen: Serve's HTTP and gRPC proxies given one
port; a Ray agent on the port chosen for Serve's gRPC proxy).
"""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports, held open together while choosing, so they differ.

    They are chosen below the kernel's ephemeral range and above Ray's worker ports: a Ray node
    starts many processes that bind port 0 (agents, workers, exporters), and one of them could
    otherwise take a port between this choice and its use (seen once in CI: Serve's gRPC proxy
    failed to bind [::]:PORT). Each is free on every IPv4 address and on IPv6 (Serve binds
    [::]); past 200 tries per port, the kernel's choice is the fallback.
    """
    low = _ephemeral_low()
    rng = secrets.SystemRandom()
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(200 * n):
            if len(ports) == n:
                break
            port = rng.randrange(RAY_WORKER_PORTS_END + 1, max(low, RAY_WORKER_PORTS_END + 2))
            if port not in ports and _hold(port, held):
                ports.append(port)
        while len(ports) < n:
            s = socket.socket()
            held.append(s)
            s.bind((HOST, 0))
            ports.append(int(s.getsockname()[1]))
        return ports
    finally:
        for s in held:
            s.close()


RAY_WORKER_PORTS_END = 19999  # Ray's workers take ports 10002-19999 (`ray start --max-worker-port`)


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 where it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _hold(port: int, held: list[socket.socket]) -> bool:
    """Bind `port` on 0.0.0.0 and, where there is IPv6, on [::] (v6 only); keep the sockets in
    `held` when both bind (nothing listens: a bind only reserves)."""
    mine = []
    try:
        v4 = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        mine.append(v4)
        v4.bind(("0.0.0.0", port))
        if socket.has_ipv6:
            try:
                v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            except OSError:  # no IPv6 in this kernel
                v6 = None
            if v6 is not None:
                mine.append(v6)
                v6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                v6.bind(("::", port))
    except OSError:
        for s in mine:
            s.close()
        return False
    held.extend(mine)
    return True
