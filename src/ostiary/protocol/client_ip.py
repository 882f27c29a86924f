"""The client's address: the socket peer, or what trusted proxies say it is.

``forwarded`` (RFC 7239, preferred) or ``x-forwarded-for`` is believed only when the
socket peer is inside ``[auth] trusted_proxies``; then the client is the rightmost
address in the chain that is not itself a trusted proxy (everything left of it
could have been written by the client). From any other peer the headers are
ignored, so a client cannot spoof its address by sending them (DESIGN §5a).
"""

from __future__ import annotations

import ipaddress

from .visibility import Network

__all__ = ["client_address"]

Header = tuple[bytes, bytes]
#: Hops read from a forwarding chain at most (a longer one is read from the right).
MAX_HOPS = 32


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # forwarded: "[2001:db8::1]:4711"
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # "192.0.2.1:4711"
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: tuple[Network, ...]
) -> bool:
    return any(address in network for network in trusted)


def _chain(headers: tuple[Header, ...]) -> list[str] | None:
    """The forwarding chain, left to right: ``forwarded``'s ``for=`` values if the
    request has that header, else ``x-forwarded-for``'s; None if neither."""
    forwarded: list[str] = []
    xff: list[str] = []
    seen_forwarded = seen_xff = False
    for name, value in headers:
        if name == b"forwarded":
            seen_forwarded = True
            for element in value.decode("latin-1").split(","):
                for pair in element.split(";"):
                    key, _, val = pair.strip().partition("=")
                    if key.lower() == "for":
                        forwarded.append(val)
        elif name == b"x-forwarded-for":
            seen_xff = True
            xff.extend(value.decode("latin-1").split(","))
    if seen_forwarded:
        return forwarded
    return xff if seen_xff else None


def client_address(peer: str, headers: tuple[Header, ...], trusted: tuple[Network, ...]) -> str:
    """The address limits and logs count a request against (see the module doc)."""
    if not trusted or not peer:
        return peer
    socket_peer = _address(peer)
    if socket_peer is None or not _trusted(socket_peer, trusted):
        return peer
    chain = _chain(headers)
    if not chain:
        return peer
    nearest = str(socket_peer)
    for hop in reversed(chain[-MAX_HOPS:]):
        address = _address(hop)
        if address is None:
            # A hop no one can read ("unknown", an obfuscated name): nothing left of
            # it can be believed, so count the request against the nearest proxy.
            return nearest
        if not _trusted(address, trusted):
            return str(address)
        nearest = str(address)
    # Every hop is a trusted proxy: the leftmost is as far as we can see.
    return nearest
