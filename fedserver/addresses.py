"""HOST:PORT as the daemon's and the dashboard's flags take it, checked without Flower (fedsim's
dashboard parses its address too)."""

from __future__ import annotations

import ipaddress
import re

from fedserver.state import DEFAULT_ADDRESS
from shared.errors import FedserverError

HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")  # a DNS name or an IPv4 address


class AddressError(FedserverError, ValueError):
    """A bad --address or --control-address (exit 2); one line."""


def parse_address(address: str, flag: str = "--address") -> tuple[str, int]:
    """HOST:PORT (IPv6 as [HOST]:PORT) -> (host, port); an AddressError naming `flag` otherwise."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise AddressError(
            f"invalid {flag} {address!r}: give HOST:PORT with a port from 1 to 65535, e.g. {DEFAULT_ADDRESS}"
        )
    if not host:
        raise AddressError(
            f"{flag} {address} has no host: give 127.0.0.1:{port_text} for this machine only, "
            f"0.0.0.0:{port_text} for every interface"
        )
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not _valid_host(bare, bracketed=bare != host):
        raise AddressError(f"invalid {flag} {address!r}: HOST is a name or an IP address (IPv6 as [HOST]:PORT)")
    return bare, int(port_text)


def _valid_host(host: str, bracketed: bool) -> bool:
    if bracketed:
        return isinstance(_ip(host), ipaddress.IPv6Address)
    return HOST_NAME.fullmatch(host) is not None


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an IP address, IPv6 without brackets) is this machine's loopback."""
    ip = _ip(host)
    return host == "localhost" if ip is None else ip.is_loopback
