"""Where the client may send a request: the one URL policy for token realms and redirects.

Host names are not resolved for these checks; literals are read as the C
resolver reads them, so every spelling of an address is caught.
"""

from __future__ import annotations

import ipaddress
import socket

from yarl import URL

from ._reference import Reference, is_loopback_host

__all__ = ["check_target", "origin", "schemes_for"]


def schemes_for(registry: Reference, insecure: bool) -> tuple[str, ...]:
    """The schemes ``registry`` may be reached by, in the order tried.

    HTTPS, then plain HTTP (after HTTPS fails to connect) only for a loopback
    registry or one marked ``insecure``. A public registry is never downgraded.
    """
    return ("https", "http") if insecure or registry.is_loopback else ("https",)


def origin(u: URL) -> tuple[str, str, int | None]:
    """Scheme, host and port: credentials never cross a change of these."""
    return (u.scheme, u.host or "", u.port)


def _literal_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a host literal names as the resolver reads it, or None for a name.

    Covers what ``ipaddress`` alone misses: the legacy IPv4 forms the C resolver
    accepts (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``,
    ``169.254.43518``) and IPv4-mapped IPv6 (``::ffff:169.254.169.254``).
    """
    h = host.strip("[]").split("%", 1)[0]
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(h)
    except ValueError:
        if not h or not all(c.isalnum() or c == "." for c in h) or not h[0].isdigit():
            return None
        try:
            ip = ipaddress.IPv4Address(socket.inet_aton(h))
        except (OSError, ValueError):
            return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _is_link_local(host: str) -> bool:
    ip = _literal_ip(host)
    if ip is None:
        return False
    return ip.is_link_local or ip.is_multicast or ip.is_unspecified


def _is_private(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    ip = _literal_ip(h)
    if ip is None:
        return False
    return ip.is_private or ip.is_loopback


def check_target(
    url: URL, registry: Reference, insecure: bool, *, credentials: bool = True
) -> str | None:
    """Why the client must not send a request for ``registry`` to ``url``; None if it may.

    Every target must be http(s) with a host, not link-local, multicast or
    unspecified, and not private or loopback unless the registry is. A
    target that ``credentials`` are sent to (a token realm) must also be
    https unless the registry is loopback or ``insecure``, and must carry no
    user info of its own. A redirect passes ``credentials=False``: it drops
    ``Authorization`` on any change of origin (so on any change of scheme),
    and what it serves is verified by digest.

    The reason reads after the URL: ``f"{url} {reason}"``.
    """
    if url.scheme not in ("http", "https") or not url.host:
        return "is not an http(s) URL"
    if credentials:
        if url.scheme == "http" and "http" not in schemes_for(registry, insecure):
            return "is not https"
        if url.scheme == "http" and not insecure and not is_loopback_host(url.host):
            # A loopback registry (a tunnel, a port-forward) may send its realm elsewhere:
            # credentials never cross the network in clear text unless told so.
            return "is plain http to a host that is not loopback"
        if url.user or url.password:
            return "carries user info"
    if _is_link_local(url.host):
        return "is a link-local address"
    if _is_private(url.host) and not _is_private(registry.host):
        return "is a private address and the registry is public"
    return None
