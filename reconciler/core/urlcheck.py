"""Which alert URLs may be sent to: http or https only, never a link-local or metadata address
unless `[alerting] allow_link_local` says so. Standard library only.

An alert carries the target's state (and a token in its URL) to whatever the URL names, so a URL
that reads a local file (`file://`), speaks another protocol (`gopher://`, `ftp://`) or reaches a
cloud metadata service (169.254.169.254, fe80::/10, fd00:ec2::254) is refused: in the
configuration before anything runs, and again by the sender at each connection (after DNS: a
host name can resolve to a link-local address).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

SCHEMES = ("http", "https")
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.azure.internal"})
# Metadata services outside the link-local ranges (AWS's IPv6 endpoint is unique-local).
METADATA_ADDRESSES = frozenset({ipaddress.ip_address("fd00:ec2::254")})


def address_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a host literal spells, in any form the resolver accepts (`169.254.169.254`,
    `2852039166`, `0xa9.0xfe.0xa9.0xfe`, `[fe80::1]`); None for a host name."""
    host = host.strip("[]").split("%", 1)[0]  # an IPv6 zone id (fe80::1%eth0) names no other host
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def forbidden_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Link-local (169.254.0.0/16, fe80::/10, also IPv4-mapped) or a known metadata address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_link_local or address in METADATA_ADDRESSES


def refusal(url: str, allow_link_local: bool = False) -> str | None:
    """Why `url` may not receive alerts (a phrase naming the offending part), or None."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname or ""
    except ValueError as exc:
        return f"it is not a URL ({exc})"
    if parts.scheme.lower() not in SCHEMES:
        return f"its scheme {parts.scheme or '(none)'}:// is not http:// or https://"
    if not host:
        return "it names no host"
    if allow_link_local:
        return None
    address = address_of(host)
    if (address is not None and forbidden_address(address)) or host.lower().rstrip(".") in METADATA_HOSTS:
        return (
            f"its host {host} is a link-local or cloud metadata address; set [alerting] "
            "allow_link_local = true if that endpoint is really meant"
        )
    return None


def peer_refusal(peer: str, allow_link_local: bool = False) -> str | None:
    """Why the sender must not talk to the connected `peer` address (after DNS), or None."""
    if allow_link_local:
        return None
    address = address_of(peer)
    if address is not None and forbidden_address(address):
        return (
            f"the alert host resolved to the link-local or metadata address {peer}; set "
            "[alerting] allow_link_local = true if that endpoint is really meant"
        )
    return None
