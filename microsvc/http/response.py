"""Writing a response: `start_response`, the `write()` callable, framing (Content-Length,
chunked, or close-delimited for HTTP/1.0) and the checks on what the application sends."""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from typing import Any, Final, cast

from microsvc.http.errors import ConnectionLost, ResponseError
from microsvc.http.meter import flask_route
from microsvc.http.parser import Message
from microsvc.wsgi import Environ, ExcInfo

WriteCallable = Callable[[bytes], None]

# RFC 9110 5.6.2: a field name is a token.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
# RFC 9110 5.5: a field value is VCHAR, obs-text, SP and HTAB: no CR, LF, NUL or controls.
_FIELD_VALUE: Final = re.compile(r"[ \t\x21-\x7e\x80-\xff]*")
# RFC 9112 4: three digits, then a single space and a reason phrase (PEP 3333).
_STATUS: Final = re.compile(r"[0-9]{3}(?: [ \t\x21-\x7e\x80-\xff]*)?")
# Hop-by-hop fields belong to the connection, which is this server's to describe.
_HOP_BY_HOP: Final = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    )
)

_date_cache: Final[list[Any]] = [0, b"", b""]


def http_date() -> bytes:
    """The Date header's value, formatted once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _set_date(now)
    value: bytes = _date_cache[1]
    return value


def _date_line() -> bytes:
    """The whole Date header line."""
    now = int(_time())
    if _date_cache[0] != now:
        _set_date(now)
    line: bytes = _date_cache[2]
    return line


def _set_date(now: int) -> None:
    value = formatdate(now, usegmt=True).encode("ascii")
    _date_cache[1] = value
    _date_cache[2] = b"Date: " + value + b"\r\n"
    _date_cache[0] = now


_time: Final = time.time

# Validated status lines: status -> (code, the status line as sent).
_STATUSES: Final[dict[str, tuple[int, bytes]]] = {}
# Validated (name, value) pairs -> (lower-case name, the header line as sent): most
# responses repeat them.
_CHECKED_HEADERS: Final[dict[object, tuple[str, bytes]]] = {}
_CACHE_SIZE: Final = 4096
_FRAMING: Final = _HOP_BY_HOP | {"content-length"}


def _check_status(status: str) -> tuple[int, bytes]:
    if not _STATUS.fullmatch(status):
        raise ResponseError(f"invalid status line {status!r}")
    checked = (int(status[:3]), f"HTTP/1.1 {status}\r\n".encode("latin-1"))
    if len(_STATUSES) < _CACHE_SIZE:
        _STATUSES[status] = checked
    return checked


def _check_header(header: object) -> tuple[str, bytes]:
    """The header's lower-case name and its line; raises ResponseError for an invalid
    name or value."""
    if not isinstance(header, (tuple, list)) or len(header) != 2:
        raise ResponseError(f"a response header is not a (name, value) pair: {header!r}")
    name, value = header
    if type(name) is not str or not _TOKEN.fullmatch(name):
        raise ResponseError(f"invalid response header name {name!r}")
    if type(value) is not str or not _FIELD_VALUE.fullmatch(value):
        # The value may be a secret: name the header only.
        raise ResponseError(f"invalid value of response header {name!r}")
    checked = (name.lower(), f"{name}: {value}\r\n".encode("latin-1"))
    if type(header) is tuple and len(value) <= 256 and len(_CHECKED_HEADERS) < _CACHE_SIZE:
        _CHECKED_HEADERS[header] = checked
    return checked


def _as_bytes(data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"the application sent {type(data).__name__}, not bytes")
    return bytes(data)


class Response:
    """The response to one request, written to the socket as the application produces it."""

    __slots__ = (
        "_app_close",
        "_lines",
        "_server_header",
        "_sock",
        "_status_line",
        "app_headers",
        "chunked",
        "content_length",
        "headers_sent",
        "keep_alive",
        "message",
        "omits_body",
        "route",
        "route_environ",
        "sent",
        "status",
        "status_code",
        "taken_over",
    )

    def __init__(self, sock: socket.socket, message: Message, server_header: bytes) -> None:
        self._sock = sock
        self._server_header = server_header
        self.message = message
        self.status = ""
        self.status_code = 0
        self.app_headers: list[tuple[str, str]] = []  # as given, for the access log
        self.headers_sent = False
        self.content_length: int | None = None
        self.chunked = False
        self.omits_body = False
        self.keep_alive = not message.close_after
        self.sent = 0  # body bytes sent, framing excluded
        #: The environ to read a Flask app's route from when the app starts its response
        #: (`meter.flask_route`); None: nothing to read.
        self.route_environ: Environ | None = None
        #: The route read from it, if Flask matched one.
        self.route: str | None = None
        #: Whether the app took the connection over (`connection.TAKEN_OVER_KEY`).
        self.taken_over = False

    def start_response(
        self,
        status: object,
        headers: Iterable[object],
        exc_info: ExcInfo | Sequence[Any] | None = None,
    ) -> WriteCallable:
        """PEP 3333's start_response. Raises ResponseError for an invalid status or header.

        What the application gives is checked here, whatever its type (the parameters say
        what it should give): an invalid value is a ResponseError, never a TypeError."""
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status:
            raise AssertionError("start_response called twice without exc_info")
        route_environ = self.route_environ
        if route_environ is not None:
            self.route_environ = None
            self.route = flask_route(route_environ)
        if type(status) is not str:
            raise ResponseError(f"invalid status line {status!r}")
        checked = _STATUSES.get(status)
        code, self._status_line = checked if checked is not None else _check_status(status)
        if type(headers) is not list:
            if not isinstance(headers, Iterable):
                raise ResponseError(f"response headers are not a list: {headers!r}")
            headers = list(headers)
        lines: list[bytes] = []
        content_length: int | None = None
        app_close = False
        cache = _CHECKED_HEADERS
        for header in headers:
            known = cache.get(header) if type(header) is tuple else None
            lower, line = known if known is not None else _check_header(header)
            if lower in _FRAMING:
                value = cast("Sequence[str]", header)[1].strip(" \t")
                if lower == "content-length":
                    if not value.isdigit() or content_length is not None:
                        raise ResponseError(f"invalid Content-Length {value!r}")
                    content_length = int(value)
                elif lower == "connection" and "close" in value.lower():
                    app_close = True
                continue
            lines.append(line)
        message = self.message
        self.status = status
        self.status_code = code
        self._lines = lines
        self.app_headers = cast("list[tuple[str, str]]", headers)  # each one checked
        self._app_close = app_close
        omits_body = message.method == "HEAD" or code in (204, 304) or 100 <= code < 200
        if omits_body and (code == 204 or code < 200):
            content_length = None
        self.omits_body = omits_body
        self.content_length = content_length
        keep_alive = not (app_close or message.close_after)
        if content_length is None and not omits_body:
            if message.version >= (1, 1):
                self.chunked = True
            else:
                keep_alive = False  # HTTP/1.0 without a length: the close ends the body
                self.chunked = False
        else:
            self.chunked = False
        self.keep_alive = keep_alive
        return self.write

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise ConnectionLost(str(exc)) from None

    def send_continue(self) -> None:
        """Sends the interim 100 response, unless the final response has started."""
        if not self.headers_sent:
            self._send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _head(self) -> bytes:
        if not self.status:
            raise AssertionError("the application returned before calling start_response")
        parts = [self._status_line, self._server_header, _date_line()]
        if self.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % self.content_length)
        elif self.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        message = self.message
        if message.expect_continue and not message.complete:
            # The body was not asked for: the client may still be waiting to send it.
            self.keep_alive = False
        if not self.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif message.version < (1, 1):
            parts.append(b"Connection: keep-alive\r\n")
        parts += self._lines
        parts.append(b"\r\n")
        self.headers_sent = True
        return b"".join(parts)

    def _frame(self, data: bytes) -> bytes:
        if self.omits_body:
            return b""
        if self.content_length is not None:
            room = self.content_length - self.sent
            if len(data) > room:
                data = data[:room]
        elif self.chunked:
            if not data:
                return b""
            self.sent += len(data)
            return b"%X\r\n%b\r\n" % (len(data), data)
        self.sent += len(data)
        return data

    def write(self, data: object) -> None:
        """PEP 3333's write callable, also used for each item the application yields."""
        payload = self._frame(data if type(data) is bytes else _as_bytes(data))
        if not self.headers_sent:
            payload = self._head() + payload
        if payload:
            self._send(payload)

    def finish_one(self, data: object) -> None:
        """Sends a body given as one block (a list of one item): with a Content-Length
        when the application gave none, head and body in one write."""
        if type(data) is bytes:
            self.set_length(len(data))
        self.finish(data)

    def finish(self, last: object = b"") -> None:
        """Sends what is left: the head if nothing was sent, `last`, the final chunk."""
        data = last if type(last) is bytes else _as_bytes(last)
        payload = self._frame(data) if data else b""
        if not self.headers_sent:
            payload = self._head() + payload
        if self.chunked:
            payload += b"0\r\n\r\n"
        if payload:
            self._send(payload)
        if (
            not self.omits_body
            and self.content_length is not None
            and (self.sent < self.content_length)
        ):
            self.keep_alive = False  # the body is shorter than announced

    def set_length(self, length: int) -> None:
        """Announces the body's length when the application gave none and nothing is sent."""
        if self.content_length is None and not self.headers_sent and not self.omits_body:
            self.content_length = length
            if self.chunked:
                self.chunked = False
            elif not (self.message.close_after or self._app_close):
                self.keep_alive = True

    def send_file(self, filelike: Any, plain_socket: bool) -> bool:
        """Sends a file with sendfile(2); False when it cannot (no file descriptor)."""
        try:
            fileno = filelike.fileno()
            offset = os.lseek(fileno, 0, os.SEEK_CUR)
            size = os.fstat(fileno).st_size - offset
        except (AttributeError, OSError, ValueError):
            return False
        if not plain_socket:
            return False
        if self.content_length is not None:
            size = min(size, self.content_length - self.sent)
        else:
            self.set_length(size)
        if self.chunked or size < 0:
            return False
        if not self.headers_sent:
            self._send(self._head())
        if size > 0 and not self.omits_body:
            try:
                self._sock.sendfile(filelike, offset, size)
            except OSError as exc:
                raise ConnectionLost(str(exc)) from None
            self.sent += size
        os.lseek(fileno, offset + size, os.SEEK_SET)
        return True
