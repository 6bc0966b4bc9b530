"""client_ip: the rate-limit key of a request, safe behind proxies."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from .. import _validate
from ..exceptions import ConfigurationError

__all__ = ["KeyFunc", "client_ip"]

#: A key function: the ASGI scope in, the rate-limit key out (None: do not limit).
KeyFunc = Callable[[Any], "str | None"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Longest peer string used as a key when it is not an IP address (a unix socket path, say).
MAX_PEER_KEY = 64


def _parse_ip(text: str) -> IPAddress | None:
    """An address from ``1.2.3.4``, ``1.2.3.4:80``, ``2001:db8::1`` or ``[2001:db8::1]:443``."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text.startswith("["):
        end = text.find("]")
        host = text[1:end] if end > 0 else ""
    elif text.count(":") == 1:
        host = text.partition(":")[0]
    else:
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def client_ip(
    trusted_proxies: Iterable[str] = (),
    *,
    header: str = "x-forwarded-for",
    max_hops: int = 16,
    max_length: int = 1024,
    ipv6_prefix: int = 64,
) -> KeyFunc:
    """A key function giving the client's IP address, trusting only the proxies you name.

    The peer address (``scope["client"]``) is the key unless the peer is one of
    ``trusted_proxies``. Then the ``X-Forwarded-For`` hops are read right to
    left and the first address that is not a trusted proxy is the key (the
    rightmost untrusted hop: the one your own proxy saw). Hops to its left are
    written by the client and ignored.

    Failure mode: never raises on a request. A header that is too long (over
    ``max_length`` bytes or ``max_hops`` hops), holds something that is not an
    address where an address is needed, or comes from an untrusted peer is
    ignored: the key falls back to the peer address. Keys are bounded: an IPv6
    client is keyed by its ``/ipv6_prefix`` network (a /64 is what one
    subscriber usually holds), IPv4-mapped IPv6 addresses by their IPv4 form.

    Args:
        trusted_proxies: Addresses or CIDR networks of your proxies / load
            balancers, e.g. ``["10.0.0.0/8", "127.0.0.1"]``. Empty (default):
            the header is never read.
        header: The forwarding header (lower case).
        max_hops: Most hops read.
        max_length: Most header bytes read.
        ipv6_prefix: Prefix length IPv6 clients are grouped by (128: per address).

    Raises:
        ValueError: a trusted proxy that is not an address or network, or an out-of-range bound.
    """
    if isinstance(trusted_proxies, str):
        trusted_proxies = [trusted_proxies]
    networks: list[Network] = []
    for proxy in trusted_proxies:
        try:
            networks.append(ipaddress.ip_network(proxy, strict=False))
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"trusted_proxies takes IP addresses or CIDR networks like '10.0.0.0/8'; got {proxy!r}"
            ) from exc
    _validate.int_range("ipv6_prefix", ipv6_prefix, minimum=1, maximum=128)
    _validate.count("max_hops", max_hops)
    _validate.count("max_length", max_length)
    header_name = header.lower().encode("latin-1")
    trusted_nets = tuple(networks)

    def normalize(ip: IPAddress) -> str:
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            if ipv6_prefix < 128:
                return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
        return str(ip)

    def is_trusted(ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in trusted_nets)

    # Bounded caches: a peer string maps to (key, trusted) once; attackers can
    # only churn the cache, never grow it.
    @functools.lru_cache(maxsize=4096)
    def peer_info(peer: Any) -> tuple[str, bool]:
        peer = str(peer)
        ip = _parse_ip(peer)
        if ip is None:
            return peer[:MAX_PEER_KEY], False
        return normalize(ip), is_trusted(ip)

    @functools.lru_cache(maxsize=4096)
    def hop_info(hop: str) -> tuple[str, bool] | None:
        ip = _parse_ip(hop)
        if ip is None:
            return None
        return normalize(ip), is_trusted(ip)

    def key(scope: Any) -> str:  # noqa: PLR0911 - each early return is one fallback to the peer
        client = scope.get("client")
        if not client:
            return "unknown"
        peer_key, peer_trusted = peer_info(client[0])
        if not peer_trusted:
            return peer_key
        values = [value for name, value in scope.get("headers", ()) if name == header_name]
        if not values:
            return peer_key
        raw = b",".join(values)
        if len(raw) > max_length:
            return peer_key
        hops = raw.split(b",")
        if len(hops) > max_hops:
            return peer_key
        found = peer_key
        for hop in reversed(hops):
            info = hop_info(hop.strip().decode("latin-1"))
            if info is None:
                return peer_key  # garbage where an address was needed
            found, trusted = info
            if not trusted:
                return found
        return found  # every hop is a trusted proxy: the leftmost is the client

    return key
