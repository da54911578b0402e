"""The tests' free ports stay out of the range outgoing connections take their ports from."""

import socket

from tests.ports import ephemeral_range, free_port


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    assert 0 < low <= high
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    if low >= 21_000:
        assert all(port < low for port in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
