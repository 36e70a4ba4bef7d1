"""Health and readiness endpoints and proxy trust, in front of the user's WSGI app.

`wrap` puts one small WSGI middleware around the app (standard library only):

- Endpoints. A GET or HEAD whose PATH_INFO is exactly `health_path` answers
  200 `{"status": "ok"}`; exactly `ready_path` answers 200 `{"status": "ready"}` while
  `is_ready()` is true and 503 `{"status": "not ready"}` otherwise. Both are JSON with
  `Cache-Control: no-store`; other methods get 405 with `Allow: GET, HEAD`. The app is not
  called for them. Every other path, and a path that is None (endpoint off), goes to the
  app untouched. Matching is on PATH_INFO alone, so the paths are relative to where the app
  is mounted: with SCRIPT_NAME `/api` (gunicorn's `SCRIPT_NAME` environment variable, or a
  dispatcher), the probe URL is `/api/healthz`. gunicorn refuses requests outside
  SCRIPT_NAME anyway, and this keeps the endpoints working wherever the app is mounted.
- Proxy trust, the one place the client address is decided. Trusting the peer
  (REMOTE_ADDR) decides whether X-Forwarded-For is read at all; the list itself is walked
  from the right, the end a proxy appends to. Each entry names the peer of the hop that
  wrote it: while that is a listed proxy, the walk goes on to the next entry on the left;
  the first entry that is not a listed proxy is the client (the leftmost when all are).
  `*` trusts every peer but lists no proxy, so the rightmost entry, the address the peer
  itself saw, is the client. An entry that is not an address (`unknown`, a host name, an
  obfuscated identifier, garbage) ends the walk: nothing written to the left of it is
  believed, and when it is the rightmost, REMOTE_ADDR stays the peer. Repeated header lines
  reach the app as one value joined with "," in the order they came (gunicorn does this),
  so they are one list and a client line is always left of what the proxy appended. When a
  client is found, REMOTE_ADDR becomes it and the peer's address is kept in
  `environ["microsvc.proxy_addr"]`; REMOTE_PORT is left alone (it still names the peer's
  port). The environ is changed in place, so gunicorn's access log shows the client too.
  From the same trusted peers the rightmost X-Forwarded-Host, when it is a valid host,
  becomes HTTP_HOST. `wsgi.url_scheme` is left as the server set it: gunicorn decides it
  from its `secure_scheme_headers` (X-Forwarded-Proto `https`, ...) for the same peers.
  Forwarded (RFC 7239), X-Forwarded-Port and X-Forwarded-Prefix are not read.

- Queue time, how long a request waited before a worker took it up, in
  `environ["microsvc.queue_time"]` (seconds, a float) with its source in
  `environ["microsvc.queue_source"]`: `proxy` when a trusted peer sent `X-Request-Start`
  (nginx's `t=${msec}`: seconds with milliseconds; also plain seconds, milliseconds,
  microseconds or nanoseconds since the epoch, with or without `t=`, told apart by their
  size), the time from that moment to now; else `kernel` for a TCP connection the server
  hands over (`gunicorn.socket`): the milliseconds since the kernel received the
  request's last data (TCP_INFO `tcpi_last_data_recv`), which covers the listen queue
  and any wait inside the worker. A header from an untrusted peer is ignored; a stamp in
  the future (clocks apart) counts as 0, one more than `MAX_BELIEVED_QUEUE_TIME` old as
  none. Without either source the keys are absent. With `queue_sample_interval`, for a
  server where nothing needs every request's queue time (no access log, no
  `max_queue_time`: the scoreboard shows each worker's latest figure, and the metrics'
  histogram is a sample), the kernel is asked for one request per interval at most: the
  first request once the interval has passed since the last measurement, so requests
  that far apart all have it. A trusted proxy's stamp costs no system call and is read
  for every request.
- Load shedding, with `max_queue_time`: a request whose queue time is above it is
  answered `503` with `Retry-After` at once and the app is not called;
  `environ["microsvc.shed"]` is True and its route for the metrics is `(shed)`. The
  health and readiness paths are answered before and never shed. Each worker logs the
  requests it shed to `gunicorn.error`, at most once every `SHED_LOG_INTERVAL` seconds.

Trust follows gunicorn's `forwarded_allow_ips`, so that gunicorn's scheme and this address
come from the same decision: `*` trusts every peer, and a unix-socket peer (empty
REMOTE_ADDR) is trusted unless `trust_socket_peers` is False. Unlike gunicorn, an
IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, from a dual-stack listener) is matched against
IPv4 networks.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence

from microsvc.wsgi import (
    QUEUE_SOURCE_KEY,
    QUEUE_TIME_KEY,
    ROUTE_KEY,
    SHED_KEY,
    Environ,
    StartResponse,
    WSGIApp,
)

__all__ = [
    "PROXY_ADDR_KEY",
    "QUEUE_SOURCE_KEY",
    "QUEUE_TIME_KEY",
    "ROUTE_KEY",
    "SHED_KEY",
    "SHED_ROUTE",
    "Middleware",
    "StartResponse",
    "TrustedProxies",
    "WSGIApp",
    "kernel_queue_time",
    "parse_request_start",
    "wrap",
]

#: Where a request's original REMOTE_ADDR (the proxy) is kept when it was replaced.
PROXY_ADDR_KEY = "microsvc.proxy_addr"
#: The route a shed request is counted under in the metrics.
SHED_ROUTE = "(shed)"
#: A stamp older than this says more about the clocks than about the queue: ignored.
MAX_BELIEVED_QUEUE_TIME = 3600.0
#: Shortest time between two log lines about shed requests, per worker.
SHED_LOG_INTERVAL = 10.0
#: With no reader of every request's queue time: measure it once per this many seconds.
QUEUE_SAMPLE_INTERVAL = 0.01

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CACHE_SIZE = 1024
_HOST_RE = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _json(status: str) -> bytes:
    return json.dumps({"status": status}).encode()


_OK, _READY, _NOT_READY = _json("ok"), _json("ready"), _json("not ready")
_NOT_ALLOWED = json.dumps({"error": "method not allowed"}).encode()
_OVERLOADED = json.dumps({"error": "overloaded, retry later"}).encode()
_STAMP_RE = re.compile(r"(?:t=)?([0-9]{1,20}(?:\.[0-9]{1,9})?)")
#: TCP_INFO up to tcpi_last_data_recv (milliseconds, a u32 at offset 52).
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
_TCP_INFO_LENGTH = 56
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_AT = 52
_log = logging.getLogger("gunicorn.error")


def parse_request_start(value: str, now: float) -> float | None:
    """Seconds from an `X-Request-Start` stamp to `now` (epoch seconds), or None.

    `t=1732780800.123` (nginx `t=${msec}`), `1732780800` (seconds), `1732780800123`
    (milliseconds), `1732780800123456` (microseconds) and nanoseconds, with or without
    `t=`: the unit is told by the size of the number (seconds below 1e11, milliseconds
    below 1e14, microseconds below 1e17). A stamp after `now` gives 0.0; one more than
    `MAX_BELIEVED_QUEUE_TIME` before it, or text that is no stamp, gives None.
    """
    match = _STAMP_RE.fullmatch(value.strip())
    if match is None:
        return None
    stamp = float(match.group(1))
    if stamp >= 1e17:
        stamp /= 1e9
    elif stamp >= 1e14:
        stamp /= 1e6
    elif stamp >= 1e11:
        stamp /= 1e3
    waited = now - stamp
    if waited > MAX_BELIEVED_QUEUE_TIME:
        return None
    return max(0.0, waited)


def kernel_queue_time(sock: object) -> float | None:
    """Seconds since the kernel received the last data on this TCP connection (Linux
    TCP_INFO `tcpi_last_data_recv`, millisecond resolution at best), or None when `sock`
    is not a TCP socket or the kernel does not say."""
    if sock is None or _TCP_INFO is None:
        return None
    # Asked of any socket: a Unix socket refuses it (and reading `family` first would cost
    # as much as asking).
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LENGTH)  # type: ignore[attr-defined]
    except (OSError, AttributeError, TypeError):
        return None
    if type(info) is not bytes or len(info) < _LAST_DATA_RECV_AT + 4:
        return None
    return float(_LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_AT)[0]) / 1000.0


class TrustedProxies:
    """The peers whose forwarding headers are believed, parsed once.

    `proxies` holds addresses and networks (IPv4 or IPv6, e.g. `10.0.0.0/8`, `::1`) and
    `*` for every peer; empty trusts no IP peer. `*` trusts every peer to say whom it saw,
    but makes no address a listed proxy: only the networks are walked past in
    X-Forwarded-For. `socket_peers`: whether a peer without an IP address (a unix-socket
    connection, empty REMOTE_ADDR) is trusted, as gunicorn does. Raises ValueError for an
    entry that is not an address or network.
    """

    def __init__(self, proxies: Sequence[str], *, socket_peers: bool = True) -> None:
        if isinstance(proxies, str):
            raise TypeError("trusted proxies must be a sequence of addresses, not a string")
        texts = [text.strip() for text in proxies if text.strip()]
        self.everyone = "*" in texts
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(text, strict=False) for text in texts if text != "*"
        )
        self.socket_peers = socket_peers
        self.trusts_anyone = self.everyone or bool(self.networks) or socket_peers
        # Peers and hops repeat (a few proxies, returning clients): parse each once.
        self.peer_is_trusted = functools.lru_cache(maxsize=_CACHE_SIZE)(self._peer_is_trusted)
        self._hop = functools.lru_cache(maxsize=_CACHE_SIZE)(self._parse_hop)

    def contains(self, address: IPAddress) -> bool:
        """Whether this address is in one of the listed networks (`*` lists none)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def _peer_is_trusted(self, remote_addr: str) -> bool:
        if not remote_addr:
            return self.socket_peers
        if self.everyone:
            return True
        try:
            return self.contains(ipaddress.ip_address(remote_addr))
        except ValueError:
            return False

    def _parse_hop(self, text: str) -> tuple[str, bool] | None:
        address = _parse_forwarded_address(text)
        return None if address is None else (str(address), self.contains(address))

    def client_address(self, forwarded_for: str) -> str | None:
        """The client an X-Forwarded-For value names, as sent by a trusted peer.

        Walked from the right: the first address that is not a listed proxy, else the
        leftmost. An invalid entry ends the walk (what is left of it was written by no one
        we trust) and gives the address right of it; None when there is none.
        """
        client = None
        for item in reversed(forwarded_for.split(",")):
            text = item.strip()
            if not text:  # an empty list element (RFC 9110, 5.6.1)
                continue
            hop = self._hop(text)
            if hop is None:
                break
            client, listed = hop
            if not listed:
                break
        return client


def _parse_forwarded_address(text: str) -> IPAddress | None:
    """`1.2.3.4`, `1.2.3.4:port`, `2001:db8::1`, `[2001:db8::1]` or `[2001:db8::1]:port`."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        port_ok = not rest or (rest.startswith(":") and _is_port(rest[1:]))
        if not bracket or ":" not in host or not port_ok:  # brackets hold IPv6 only
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _is_port(port):
            return None
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    # a scope (`fe80::1%eth0`) means nothing on this host and could carry any text
    return None if getattr(address, "scope_id", None) else address


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def _rightmost(value: str) -> str:
    return value.rpartition(",")[2].strip()


class Middleware:
    """The WSGI app `wrap` returns; `app` is the wrapped one. See the module docstring."""

    def __init__(
        self,
        app: WSGIApp,
        *,
        health_path: str | None,
        ready_path: str | None,
        is_ready: Callable[[], bool],
        trusted: TrustedProxies,
        max_queue_time: float | None = None,
        queue_sample_interval: float = 0.0,
    ) -> None:
        if max_queue_time is not None and not max_queue_time > 0:
            raise ValueError(f"max_queue_time must be above 0, not {max_queue_time!r}")
        if not queue_sample_interval >= 0:
            raise ValueError(
                f"queue_sample_interval must be 0 or more, not {queue_sample_interval!r}"
            )
        for path in (health_path, ready_path):
            if path is not None and not (isinstance(path, str) and path.startswith("/")):
                raise ValueError(f"{path!r} is not a path starting with '/'")
        if health_path is not None and health_path == ready_path:
            raise ValueError(f"the health and readiness paths are the same: {health_path!r}")
        self.app = app
        self.is_ready = is_ready
        self.trusted = trusted
        self.max_queue_time = max_queue_time
        # shedding needs every request's queue time
        self.queue_sample_interval = 0.0 if max_queue_time is not None else queue_sample_interval
        self._next_sample = -math.inf
        self._trusts_anyone = trusted.trusts_anyone
        self._retry_after = str(max(1, math.ceil(max_queue_time or 1)))
        self._shed_count = 0
        self._shed_logged_at = -math.inf
        self._endpoints: dict[str, bool] = {}  # path -> is the readiness path
        if health_path is not None:
            self._endpoints[health_path] = False
        if ready_path is not None:
            self._endpoints[ready_path] = True

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        is_ready_path = self._endpoints.get(path)
        if is_ready_path is not None:
            environ[ROUTE_KEY] = path
            return self._answer(is_ready_path, environ, start_response)
        interval = self.queue_sample_interval
        if not interval:
            waited = self._queue_time(environ)
        else:
            waited = None  # not shedding
            stamped = self._trusts_anyone and "HTTP_X_REQUEST_START" in environ
            if not stamped or self._proxy_queue_time(environ) is None:
                now = time.monotonic()
                if now >= self._next_sample:
                    self._next_sample = now + interval
                    self._kernel_queue_time(environ)
        if self._trusts_anyone and (
            "HTTP_X_FORWARDED_FOR" in environ or "HTTP_X_FORWARDED_HOST" in environ
        ):
            self._apply_forwarded(environ)
        limit = self.max_queue_time
        if limit is not None and waited is not None and waited > limit:
            return self._shed(waited, environ, start_response)
        return self.app(environ, start_response)

    def _queue_time(self, environ: Environ) -> float | None:
        """The request's queue time, noted in the environ (see the module docstring)."""
        waited = self._proxy_queue_time(environ)
        if waited is not None:
            return waited
        return self._kernel_queue_time(environ)

    def _proxy_queue_time(self, environ: Environ) -> float | None:
        """The queue time from a trusted proxy's X-Request-Start, noted in the environ."""
        stamp = environ.get("HTTP_X_REQUEST_START")
        if stamp is not None and self._trusts_anyone and isinstance(stamp, str):
            peer = environ.get("REMOTE_ADDR")
            if isinstance(peer, str) and self.trusted.peer_is_trusted(peer):
                waited = parse_request_start(stamp, time.time())
                if waited is not None:
                    environ[QUEUE_TIME_KEY] = waited
                    environ[QUEUE_SOURCE_KEY] = "proxy"
                    return waited
        return None

    def _kernel_queue_time(self, environ: Environ) -> float | None:
        """The queue time the kernel gives for the request's socket, noted in the environ."""
        waited = kernel_queue_time(environ.get("gunicorn.socket"))
        if waited is not None:
            environ[QUEUE_TIME_KEY] = waited
            environ[QUEUE_SOURCE_KEY] = "kernel"
        return waited

    def _shed(
        self, waited: float, environ: Environ, start_response: StartResponse
    ) -> Iterable[bytes]:
        environ[SHED_KEY] = True
        environ[ROUTE_KEY] = SHED_ROUTE
        self._shed_count += 1
        now = time.monotonic()
        if now - self._shed_logged_at >= SHED_LOG_INTERVAL:
            _log.warning(
                "Shed %d request(s) with 503 since the last report: they had waited longer "
                "than --max-queue-time %gs (the last one %.3fs)",
                self._shed_count,
                self.max_queue_time,
                waited,
            )
            self._shed_count, self._shed_logged_at = 0, now
        start_response(
            "503 Service Unavailable",
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(_OVERLOADED))),
                ("Cache-Control", "no-store"),
                ("Retry-After", self._retry_after),
            ],
        )
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [_OVERLOADED]

    def _answer(
        self, is_ready_path: bool, environ: Environ, start_response: StartResponse
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        extra: list[tuple[str, str]] = []
        if method not in ("GET", "HEAD"):
            status, body = "405 Method Not Allowed", _NOT_ALLOWED
            extra.append(("Allow", "GET, HEAD"))
        elif not is_ready_path:
            status, body = "200 OK", _OK
        elif self.is_ready():
            status, body = "200 OK", _READY
        else:
            status, body = "503 Service Unavailable", _NOT_READY
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *extra,
        ]
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    def _apply_forwarded(self, environ: Environ) -> None:
        peer = environ.get("REMOTE_ADDR")
        if not isinstance(peer, str) or not self.trusted.peer_is_trusted(peer):
            return
        forwarded_for = environ.get("HTTP_X_FORWARDED_FOR")
        if isinstance(forwarded_for, str):
            client = self.trusted.client_address(forwarded_for)
            if client is not None:
                environ[PROXY_ADDR_KEY] = peer
                environ["REMOTE_ADDR"] = client
        host = environ.get("HTTP_X_FORWARDED_HOST")
        if isinstance(host, str):
            value = _rightmost(host)
            if _HOST_RE.fullmatch(value):
                environ["HTTP_HOST"] = value


def wrap(
    app: WSGIApp,
    *,
    health_path: str | None,
    ready_path: str | None,
    is_ready: Callable[[], bool],
    trusted_proxies: Sequence[str],
    trust_socket_peers: bool = True,
    max_queue_time: float | None = None,
    queue_sample_interval: float = 0.0,
) -> Middleware:
    """`app` behind microsvc's health and readiness endpoints and proxy trust.

    `health_path` and `ready_path` are answered in front of the app (None: off);
    `is_ready` is asked on each readiness request. `trusted_proxies` are the addresses and
    networks (or `*`) whose X-Forwarded-For and X-Forwarded-Host are believed;
    `trust_socket_peers` whether unix-socket peers are too; the same peers' X-Request-Start
    is believed. `max_queue_time` (seconds, None: off): shed requests that waited longer.
    `queue_sample_interval` (seconds, 0: every request): when only the scoreboard reads the
    queue time, measure it for one request per interval at most (ignored with
    `max_queue_time`). Raises ValueError for a bad path, address or limit. The module
    docstring has the details.
    """
    trusted = TrustedProxies(trusted_proxies, socket_peers=trust_socket_peers)
    return Middleware(
        app,
        health_path=health_path,
        ready_path=ready_path,
        is_ready=is_ready,
        trusted=trusted,
        max_queue_time=max_queue_time,
        queue_sample_interval=queue_sample_interval,
    )
