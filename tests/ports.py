"""Free TCP ports for the tests' servers, below the kernel's ephemeral range.

A port found by binding to 0 comes from the range the kernel also gives outgoing connections, and
a deployment opens dozens of them between the pick and its dashboard's bind: one of them may take
the port, and the start fails with "address already in use". Ports below that range are never
handed out that way, and none is handed out twice in one test session.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from federated_learning.bus.embedded import free_port as ephemeral_free_port

PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 20_000
TRIES = 200
_given: set[int] = set()
_random = random.SystemRandom()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default elsewhere)."""
    try:
        low, high = (int(part) for part in PORT_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999
    return low, high


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now, outside the ephemeral range when it
    leaves room below, and not given before in this process."""
    low, _ = ephemeral_range()
    if low - LOWEST >= 1_000:
        for _ in range(TRIES):
            port = _random.randrange(LOWEST, low)
            if port in _given:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _given.add(port)
            return port
    port = ephemeral_free_port(host)
    _given.add(port)
    return port
