"""Binding a TCP address: the one place an address is resolved and bound, for the
start-up check of the app's addresses and for the metrics endpoint."""

from __future__ import annotations

import socket

from microsvc.errors import BindError, UsageError
from microsvc.values import split_bind


def bind_tcp(address: str, purpose: str) -> socket.socket:
    """A socket bound to the TCP `address` (HOST:PORT or [IPv6]:PORT), not listening.
    Errors say `cannot <purpose> <address>: ...`: UsageError when the host does not
    resolve (or the address is not TCP), BindError when it cannot be bound."""
    parts = split_bind(address)
    if parts is None:
        raise UsageError(f"cannot {purpose} {address}: not a TCP address")
    host, port = parts
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot {purpose} {address}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot {purpose} {address}: {exc.strerror}") from None
    return sock
