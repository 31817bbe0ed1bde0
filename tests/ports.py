"""Loopback ports for the servers tests start, never the same one twice in a process.

Binding port 0 and closing the socket hands back a port the kernel may give out again on the next
call: a 3-member etcd cluster needs 6 ports, and about one cluster in 800 got two members on the
same port (measured: 24 of 20000 six-port draws had a duplicate), so one member never started.
Here each process walks its own stretch of a range below the kernel's ephemeral ports (so neither
port-0 binds nor outgoing connections land in it), the start picked from the pid so concurrent
test processes walk apart, hands out each port at most once, and checks that nothing holds it by
binding it (without SO_REUSEADDR, so a port with connections still in TIME_WAIT is skipped too).
A race with another process that is left (it binds the port between our check and our server's
start) is caught by the server start: LocalEtcd retries on "address already in use".

Kept free of pytest and of the other test helpers: bench/fleet.py imports it too.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

LOW = 20000


def _high() -> int:
    """The first port of the kernel's ephemeral range (32768 unless configured otherwise)."""
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768
    return first if first > LOW + 1000 else 32768


HIGH = _high()
_lock = threading.Lock()
_given: set[int] = set()
_next: list[int] = []  # the next port to try; empty until the first call (the pid may change after a fork)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    """A loopback port nothing listens on, never handed out before in this process."""
    span = HIGH - LOW
    with _lock:
        if not _next:
            _next.append(LOW + (os.getpid() * 7919) % span)  # 7919 (prime) spreads neighbouring pids apart
        for _ in range(span):
            port = _next[0]
            _next[0] = LOW + (port - LOW + 1) % span
            if port in _given:
                continue
            _given.add(port)  # also when taken by someone else: it is not worth trying again
            if _bindable(port):
                return port
    raise RuntimeError(f"no free loopback port left in {LOW}-{HIGH - 1} for this process")


def free_ports(n: int) -> list[int]:
    return [free_port() for _ in range(n)]
