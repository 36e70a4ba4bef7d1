"""Binding a TCP address: the one place an address is resolved and bound, for the
start-up check of the app's addresses and for the metrics endpoint; which resolved
addresses overlap; the listening sockets a master takes over instead of binding; and
deferred accepts on the listeners microsvc's engine serves."""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from microsvc.config.values import split_bind
from microsvc.errors import BindError, UsageError

#: Where Linux says whether an IPv6 wildcard socket also takes IPv4 (0: it does).
BINDV6ONLY = "/proc/sys/net/ipv6/bindv6only"
#: How long the kernel holds a new TCP connection whose client has sent nothing yet
#: before a worker may accept it (TCP_DEFER_ACCEPT; see `defer_accept`).
DEFER_ACCEPT_SECONDS = 1
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True)
class TCPAddress:
    """A bind address as written (`text`) and as the kernel sees it."""

    text: str
    family: int
    sockaddr: tuple[str, int] | tuple[str, int, int, int]

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return ipaddress.ip_address(self.sockaddr[0].partition("%")[0])

    @property
    def port(self) -> int:
        return self.sockaddr[1]


def resolve_tcp(address: str, purpose: str, *, like_gunicorn: bool = False) -> TCPAddress:
    """The address `address` (HOST:PORT or [IPv6]:PORT) binds to. With `like_gunicorn`,
    resolved as gunicorn resolves its binds: IPv6 for an IPv6 literal, else IPv4.
    UsageError `cannot <purpose> <address>: ...` when it does not resolve."""
    parts = split_bind(address)
    if parts is None:
        raise UsageError(f"cannot {purpose} {address}: not a TCP address")
    host, port = parts
    family = 0
    if like_gunicorn:
        family = socket.AF_INET6 if _is_ipv6_literal(host) else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot {purpose} {address}: {exc.strerror}") from None
    found_family, _, _, _, sockaddr = infos[0]
    return TCPAddress(address, found_family, sockaddr)  # type: ignore[arg-type]


def _is_ipv6_literal(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6, host)
    except (OSError, ValueError):
        return False
    return True


def bind_tcp(address: str, purpose: str, *, like_gunicorn: bool = False) -> socket.socket:
    """A socket bound to the TCP `address` (HOST:PORT or [IPv6]:PORT), not listening.
    Errors say `cannot <purpose> <address>: ...`: UsageError when the host does not
    resolve (or the address is not TCP), BindError when it cannot be bound."""
    resolved = resolve_tcp(address, purpose, like_gunicorn=like_gunicorn)
    sock = socket.socket(resolved.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(resolved.sockaddr)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot {purpose} {address}: {exc.strerror}") from None
    return sock


def overlap(first: TCPAddress, second: TCPAddress, *, dual_stack: bool | None = None) -> bool:
    """Whether the two addresses cannot both be bound: the same port (not 0), and the
    same address or a wildcard that covers the other. An IPv6 wildcard covers IPv4 too
    on a dual-stack system (`dual_stack`; None: as this machine is set up)."""
    if first.port != second.port or first.port == 0:
        return False
    one, two = _unmapped(first.ip), _unmapped(second.ip)
    if one.version == two.version:
        return one == two or one.is_unspecified or two.is_unspecified
    if dual_stack is None:
        dual_stack = _dual_stack()
    six = one if one.version == 6 else two
    return dual_stack and six.is_unspecified


def _unmapped(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _dual_stack() -> bool:
    try:
        with open(BINDV6ONLY) as file:
            return file.read().strip() == "0"
    except (OSError, ValueError):
        return True  # the kernel's default


def check_overlaps(
    app_binds: Sequence[str], metrics_bind: str | None, *, reuse_port: bool = False
) -> None:
    """UsageError when two TCP addresses among the app's binds and the metrics address
    would take the same port on the same address (wildcards included). With
    `reuse_port` (SO_REUSEPORT on every app socket) app addresses may share a port with
    each other, never with the metrics address."""
    app = [
        resolve_tcp(bind, "listen on", like_gunicorn=True)
        for bind in app_binds
        if split_bind(bind) is not None
    ]
    for index, first in enumerate(app):
        for second in app[index + 1 :] if not reuse_port else ():
            if overlap(first, second):
                raise UsageError(
                    f"--bind {first.text} and --bind {second.text} overlap "
                    f"({_show(first)} and {_show(second)}); give each a port of its own"
                )
    if metrics_bind is None:
        return
    metrics = resolve_tcp(metrics_bind, "serve metrics on")
    for bind in app:
        if overlap(metrics, bind):
            raise UsageError(
                f"--metrics-bind {metrics.text} overlaps the app address --bind {bind.text} "
                f"({_show(metrics)} and {_show(bind)}); give the metrics endpoint a port "
                "of its own"
            )


def _show(address: TCPAddress) -> str:
    host = str(address.ip)
    return (
        f"[{host}]:{address.port}"
        if address.family == socket.AF_INET6
        else f"{host}:{address.port}"
    )


def inherited_listeners(environ: Mapping[str, str] | None = None) -> list[int] | None:
    """The listening sockets gunicorn will take over instead of binding its addresses:
    those a master passes to the master it re-executes on USR2 (GUNICORN_FD with
    GUNICORN_PID), or systemd's socket activation (LISTEN_FDS for this process).
    None when there are none."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") == str(os.getpid()) and env.get("LISTEN_FDS", "").isdigit():
        count = int(env["LISTEN_FDS"])
        if count:
            return list(range(3, 3 + count))
    if env.get("GUNICORN_PID") and env.get("GUNICORN_FD"):
        try:
            return [int(fd) for fd in env["GUNICORN_FD"].split(",")]
        except ValueError:
            return None
    return None


def defer_accept(listeners: Sequence[object], seconds: int = DEFER_ACCEPT_SECONDS) -> int:
    """Has the kernel hold each TCP listener's new connections until their first bytes
    arrive (or `seconds` pass; Linux's TCP_DEFER_ACCEPT, nginx's `deferred`); returns
    how many listeners it was set on. A worker then accepts only connections with a
    request to serve: a sync worker cannot take connections that are still silent while
    the other workers idle, and then serve their requests one after another. A client
    that connects and sends nothing is accepted after `seconds`, and its wait for a
    first request begins then. Unix sockets, and systems without the option, are left
    as they are."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return 0
    done = 0
    for listener in listeners:
        sock = getattr(listener, "sock", listener)  # gunicorn's listeners wrap a socket
        if not isinstance(sock, socket.socket) or sock.family not in _TCP_FAMILIES:
            continue
        try:
            sock.setsockopt(socket.IPPROTO_TCP, option, seconds)
        except OSError:
            continue
        done += 1
    return done
