"""The client's address behind trusted proxies, and spoofing from elsewhere."""

from __future__ import annotations

import pytest

from ostiary.protocol.client_ip import client_address
from ostiary.protocol.visibility import parse_networks

TRUSTED = parse_networks(["10.0.0.0/8", "fd00::/8"])


def xff(value: bytes) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"x-forwarded-for", value),)


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        # No proxies configured, or an untrusted peer: the headers are ignored.
        ("198.51.100.1", xff(b"203.0.113.5"), "198.51.100.1"),
        # The rightmost untrusted hop; everything left of it may be the client's own.
        ("10.0.0.5", xff(b"1.2.3.4, 203.0.113.5, 10.0.0.9"), "203.0.113.5"),
        ("10.0.0.5", xff(b"203.0.113.5"), "203.0.113.5"),
        # Two headers are one list.
        ("10.0.0.5", (*xff(b"1.1.1.1"), *xff(b"203.0.113.7")), "203.0.113.7"),
        # forwarded wins over x-forwarded-for; quoted IPv6 with a port.
        (
            "10.0.0.5",
            (
                (b"forwarded", b'for=192.0.2.60;proto=http, for="[2001:db8::1]:4711"'),
                *xff(b"9.9.9.9"),
            ),
            "2001:db8::1",
        ),
        ("10.0.0.5", ((b"forwarded", b"for=192.0.2.43:8080"),), "192.0.2.43"),
        # An unreadable hop: counted against the nearest trusted proxy.
        ("10.0.0.5", xff(b"1.2.3.4, unknown"), "10.0.0.5"),
        ("10.0.0.5", xff(b"1.2.3.4, unknown, 10.0.0.8"), "10.0.0.8"),
        # Every hop trusted: the leftmost.
        ("10.0.0.5", xff(b"10.9.9.9, 10.0.0.8"), "10.9.9.9"),
        # No header at all.
        ("10.0.0.5", (), "10.0.0.5"),
        # An IPv4-mapped trusted peer, and an IPv6 trusted one.
        ("::ffff:10.0.0.5", xff(b"203.0.113.5"), "203.0.113.5"),
        ("fd00::1", xff(b"2001:db8::2"), "2001:db8::2"),
        # A peer that is no address.
        ("unix-socket", xff(b"203.0.113.5"), "unix-socket"),
    ],
)
def test_client_address(peer: str, headers: tuple[tuple[bytes, bytes], ...], expected: str) -> None:
    assert client_address(peer, headers, TRUSTED) == expected


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_address("10.0.0.5", xff(b"203.0.113.5"), ()) == "10.0.0.5"


def test_a_long_chain_is_read_from_the_right_only() -> None:
    chain = b", ".join([b"10.0.0.1"] * 1000)
    assert client_address("10.0.0.5", xff(b"203.0.113.5, " + chain), TRUSTED) == "10.0.0.1"
