"""Reading requests off a connection: httptools (llhttp) in its strict mode, plus the
checks where llhttp accepts what gunicorn refuses (request targets, HTTP versions,
ambiguous or unsafe headers, transfer codings, trailers, size limits)."""

from __future__ import annotations

import re
import socket
import time
from collections import deque
from typing import Final
from urllib.parse import urlsplit

import httptools

from microsvc.http.config import HTTPConfig
from microsvc.http.errors import InvalidBody, RequestError

RECV_SIZE: Final = 65536

# RFC 9112 3.2: a request target is printable ASCII; everything else is percent-encoded.
_TARGET_INVALID: Final = re.compile(r"[^\x21-\x7e]")
# RFC 9110 5.6.2: a header name is a token.
_TOKEN: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
# RFC 9110 6.5.1: fields that change routing, framing or authentication, not allowed in trailers.
_FORBIDDEN_TRAILERS: Final = frozenset(
    (b"HOST", b"CONTENT-LENGTH", b"TRANSFER-ENCODING", b"TRAILER", b"AUTHORIZATION", b"TE")
)
# RFC 9110 5.3: fields with a single value; a repeat makes the request ambiguous.
_SINGLETONS: Final = frozenset(("HOST", "CONTENT-TYPE"))
_WATCHED: Final = frozenset(("HOST", "CONTENT-TYPE", "TRANSFER-ENCODING", "EXPECT"))
_COMPRESSIONS: Final = frozenset(("gzip", "compress", "deflate", "x-gzip", "x-compress"))
_VERSIONS: Final = {"1.1": (1, 1), "1.0": (1, 0)}


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a request target; a fragment, if a client sent one, is dropped.
    Raises RequestError for an absolute target that does not parse."""
    if target.startswith("/") and not target.startswith("//"):
        path, _, query = target.partition("#")[0].partition("?")
        return path, query
    if target == "*":
        return "*", ""
    try:
        if target.startswith("//"):
            # urlsplit would read the first segment as a host; it is a path.
            parts = urlsplit("." + target)
            return parts.path[1:], parts.query
        parts = urlsplit(target)
    except ValueError:
        raise RequestError("invalid request target") from None
    return parts.path, parts.query


class Message:
    """One request as it is parsed: its head, then its body in chunks as they arrive.

    The fields most requests leave at their default are class attributes, so that a
    message costs little to make."""

    url = b""
    head_complete = False
    complete = False
    error: RequestError | None = None
    method = ""
    target = ""
    path = ""
    query = ""
    version: tuple[int, int] = (1, 1)
    close_after = False
    expect_continue = False
    scheme = "http"
    script_name: str | None = None

    def __init__(self) -> None:
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.headers: list[tuple[str, str]] = []
        # The headers as the environ has them (HTTP_*, CONTENT_TYPE, CONTENT_LENGTH),
        # repeats joined with ",".
        self.environ_headers: dict[str, str] = {}
        self.body: deque[bytes] = deque()

    @property
    def request_line(self) -> str:
        return f"{self.method} {self.target} HTTP/{self.version[0]}.{self.version[1]}"


# Caches of what requests repeat, bounded in size: method names, header names (raw ->
# upper-case text and environ key), and origin-form targets already checked (raw ->
# text, path, query).
_METHODS: Final[dict[bytes, str]] = {}
_HEADER_NAMES: Final[dict[bytes, tuple[str, str]]] = {}
_TARGETS: Final[dict[bytes, tuple[str, str, str]]] = {}
_CACHE_SIZE: Final = 4096
_CACHED_TARGET_LENGTH: Final = 256


def _origin_target(url: bytes) -> tuple[str, str, str]:
    """(target, path, query) of an origin-form target; raises RequestError for one with
    a character that is not printable ASCII."""
    target = url.decode("latin-1")
    if _TARGET_INVALID.search(target):
        raise RequestError("invalid request target")
    path, _, query = target.partition("#")[0].partition("?")
    checked = (target, path, query)
    if len(url) <= _CACHED_TARGET_LENGTH and len(_TARGETS) < _CACHE_SIZE:
        _TARGETS[url] = checked
    return checked


def _header_name(name: bytes) -> tuple[str, str]:
    """The upper-case name of a header, and its key in the environ."""
    key = name.upper().decode("latin-1")
    if key in ("CONTENT-TYPE", "CONTENT-LENGTH"):
        names = (key, key.replace("-", "_"))
    else:
        names = (key, "HTTP_" + key.replace("-", "_"))
    if len(_HEADER_NAMES) < _CACHE_SIZE and len(name) <= 64:
        _HEADER_NAMES[name] = names
    return names


class RequestStream:
    """Requests read in order from one connection: `next_message()` for each head,
    `next_body_chunk()` for the body of the message being served.

    Pipelined requests that arrive with earlier ones are parsed as they come; at most one
    receive buffer of their bodies is held, because bytes are only received when the
    message being served needs them."""

    def __init__(self, sock: socket.socket, config: HTTPConfig, peer: object) -> None:
        self._sock = sock
        self._config = config
        self._trusted = config.peer_is_trusted(peer)
        self._watched = _WATCHED | set(config.upper_scheme_headers) if self._trusted else _WATCHED
        self._field_limit = config.limit_request_field_size - 4
        self._fields_limit = config.limit_request_fields
        self._pending = getattr(sock, "pending", None)  # TLS: bytes held by the TLS layer
        self._is_ssl = config.is_ssl
        self._parser = httptools.HttpRequestParser(self)
        # llhttp's defaults are strict; say so, so that no default can change under us.
        self._parser.set_dangerous_leniencies(
            lenient_headers=False,
            lenient_chunked_length=False,
            lenient_keep_alive=False,
            lenient_transfer_encoding=False,
            lenient_version=False,
            lenient_data_after_close=False,
            lenient_optional_lf_after_cr=False,
            lenient_optional_cr_before_lf=False,
            lenient_optional_crlf_after_chunk=False,
            lenient_spaces_after_chunk_size=False,
        )
        self._messages: deque[Message] = deque()
        self._current: Message | None = None
        # Nothing more is parsed after an error, an upgrade, or a message that closes.
        self._stopped = False
        self._error: RequestError | None = None
        self._eof = False
        self._head_bytes = 0
        self._timeout: float | None = -1.0
        # The bytes received since the last request line found in them, where the next
        # request line is looked for (llhttp skips repeated spaces in it).
        self._raw = b""
        self._raw_pos = 0

    # --- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        message = Message()
        if self._is_ssl:
            message.scheme = "https"
        self._current = message
        self._messages.append(message)
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        message = self._current
        assert message is not None
        message.url = url = message.url + url if message.url else url
        if len(url) > self._config.limit_request_line:
            limit = self._config.limit_request_line
            raise RequestError(f"request target is longer than {limit}", 414)

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self._current
        assert message is not None
        if len(name) + len(value) > self._field_limit:
            raise RequestError("a header field is too large", 431)
        if message.head_complete:
            if name.upper() in _FORBIDDEN_TRAILERS:
                raise InvalidBody(f"header {name.decode('latin-1')} is not allowed in trailers")
            return
        raw = message.raw_headers
        if len(raw) >= self._fields_limit:
            raise RequestError("too many header fields", 431)
        raw.append((name, value))

    def on_headers_complete(self) -> None:
        message = self._current
        assert message is not None
        parser = self._parser
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method)
        if method is None:
            method = raw_method.decode("ascii")
            if len(_METHODS) < _CACHE_SIZE:
                _METHODS[raw_method] = method
        message.method = method
        url = message.url
        message.version = self._check_request_line(raw_method, url)
        message.close_after = not parser.should_keep_alive()
        if url[:1] == b"/" and url[:2] != b"//" and method != "CONNECT":
            # origin-form, nearly every request
            checked = _TARGETS.get(url)
            if checked is None:
                checked = _origin_target(url)
            message.target, message.path, message.query = checked
        else:
            message.target = url.decode("latin-1")
            self._check_target(message)
        headers = message.headers
        environ = message.environ_headers
        watched = self._watched
        seen: set[str] | None = None
        names = _HEADER_NAMES
        for name, value in message.raw_headers:
            known = names.get(name)
            key, environ_key = known if known is not None else _header_name(name)
            text = value.rstrip(b" \t").decode("latin-1")
            if key in watched or "_" in key:
                if seen is None:
                    seen = set()
                if not self._check_header(message, key, text, seen):
                    continue
            headers.append((key, text))
            if environ_key in environ and environ_key[0] == "H":
                environ[environ_key] += "," + text  # a repeat: joined, as gunicorn does
            else:
                environ[environ_key] = text
        message.head_complete = True

    def on_body(self, body: bytes) -> None:
        message = self._current
        assert message is not None
        message.body.append(body)

    def on_message_complete(self) -> None:
        message = self._current
        assert message is not None
        message.complete = True
        self._current = None
        if message.close_after:
            # Bytes after a message that closes the connection are never served.
            self._stopped = True

    # --- checks llhttp does not make -----------------------------------------------------

    def _check_request_line(self, method: bytes, url: bytes) -> tuple[int, int]:
        """The HTTP version of the request line, which must be exactly METHOD SP TARGET
        SP HTTP/x.y CRLF: llhttp skips repeated spaces between its parts, gunicorn
        refuses them."""
        line = b"%s %s HTTP/1." % (method, url)
        raw = self._raw
        found = raw.find(line, self._raw_pos)
        if found >= 0:
            end = found + len(line)
            minor = raw[end : end + 3]
            if minor == b"1\r\n" or minor == b"0\r\n":
                self._raw_pos = end + 3
                return (1, 1) if minor[0] == 0x31 else (1, 0)
        version_text = self._parser.get_http_version()
        if version_text not in _VERSIONS:
            raise RequestError(f"HTTP version {version_text} is not supported")
        raise RequestError("invalid request line: repeated or stray whitespace")

    @staticmethod
    def _check_target(message: Message) -> None:
        target = message.target
        if not target or _TARGET_INVALID.search(target):
            raise RequestError("invalid request target")
        if target == "*":
            if message.method != "OPTIONS":
                raise RequestError("asterisk-form target on a method other than OPTIONS")
        elif message.method == "CONNECT":
            message.close_after = True
        elif not target.startswith("/") and "://" not in target:
            raise RequestError("authority-form target on a method other than CONNECT")
        message.path, message.query = split_target(target)

    def _check_header(self, message: Message, name: str, value: str, seen: set[str]) -> bool:
        """Checks a header that needs more than llhttp's checks; False to leave it out."""
        config = self._config
        if name in _SINGLETONS:
            if name in seen:
                raise RequestError(f"repeated {name} header")
            seen.add(name)
        elif name == "TRANSFER-ENCODING":
            self._check_transfer_encoding(message, value)
        elif name == "EXPECT":
            if value.lower() != "100-continue":
                raise RequestError(f"unsupported expectation {value!r}", 417)
            # RFC 9110 10.1.1: an HTTP/1.0 server ignores 100-continue.
            message.expect_continue = message.version >= (1, 1)
        elif "_" in name:
            # X_Forwarded_For would pass for X-Forwarded-For in the environ.
            if not (self._trusted and name in config.upper_forwarder_headers):
                if config.header_map == "refuse":
                    raise RequestError(f"invalid header name {name}")
                return False
            if name == "SCRIPT_NAME":
                message.script_name = value
        if self._trusted and name in config.upper_scheme_headers:
            scheme = "https" if value == config.upper_scheme_headers[name] else "http"
            if "scheme" in seen and scheme != message.scheme:
                raise RequestError("contradictory scheme headers")
            seen.add("scheme")
            message.scheme = scheme
        return True

    @staticmethod
    def _check_transfer_encoding(message: Message, value: str) -> None:
        # llhttp has already refused Content-Length with it, and a last coding other
        # than chunked.
        if message.version < (1, 1):
            raise RequestError("Transfer-Encoding on an HTTP/1.0 request")
        for coding in value.split(","):
            coding = coding.strip(" \t").lower()
            if coding in _COMPRESSIONS:
                message.close_after = True
            elif coding not in ("chunked", "identity"):
                raise RequestError(f"unsupported transfer coding {coding!r}", 501)

    # --- reading ---------------------------------------------------------------------------

    def next_message(self, first: bool) -> Message | None:
        """The next request whose head is complete, or None when the client closed the
        connection (or it must close) before another request began. Raises RequestError
        for a request that cannot be served and socket.timeout (TimeoutError) when the
        client is too slow."""
        messages = self._messages
        config = self._config
        deadline = 0.0
        while True:
            if messages:
                message = messages[0]
                if message.head_complete:
                    messages.popleft()
                    return message
                if message.error is not None:
                    raise message.error
            if self._stopped:
                if self._error is not None:
                    raise self._error
                return None
            if self._eof:
                if messages:
                    raise RequestError("the connection closed inside a request head")
                return None
            if messages:
                if not deadline:
                    deadline = time.monotonic() + config.header_timeout
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RequestError("the request head took too long", 408)
                self._set_timeout(remaining)
            else:
                self._set_timeout(config.header_timeout if first else config.keepalive_timeout)
            self._receive(head=True)
            if self._head_bytes > config.max_head_size:
                raise RequestError("the request head is too large", 431)

    def has_pending(self) -> bool:
        """Whether bytes of a further request are already off the socket (parsed or in
        the TLS layer's buffer): its socket may not turn readable for them."""
        if self._messages or self._current is not None:
            return True
        pending = self._pending
        return bool(pending is not None and pending())

    def next_body_chunk(self, message: Message) -> bytes:
        """The next bytes of `message`'s body, b"" at its end. Raises InvalidBody when the
        body is malformed or the client closes or stalls before its end."""
        body = message.body
        while not body:
            if message.complete:
                return b""
            if message.error is not None:
                raise message.error
            if self._stopped or self._eof:
                raise InvalidBody("the connection closed inside a request body")
            self._set_timeout(self._config.read_timeout)
            try:
                self._receive(head=False)
            except OSError as exc:
                raise InvalidBody(f"reading the request body failed: {exc}") from None
        return body.popleft()

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout

    def _receive(self, head: bool) -> None:
        data = self._sock.recv(RECV_SIZE)
        if not data:
            self._eof = True
            current = self._current
            if current is not None and current.head_complete and not current.complete:
                current.error = InvalidBody("the connection closed inside a request body")
            return
        if head or self._current is None or not self._current.head_complete:
            self._head_bytes += len(data)
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        current = self._current
        if current is not None and not current.head_complete:
            # A request head continues in this data.
            self._raw = self._raw[self._raw_pos :] + data
        else:
            self._raw = data
        self._raw_pos = 0
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # CONNECT, or an Upgrade request: served as a plain request, then closed.
            self._stopped = True
            for message in self._messages:
                message.close_after = True
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            if isinstance(context, RequestError):
                self._fail(context)
            else:
                self._fail(RequestError(f"invalid request: {context}"))
        except httptools.HttpParserError as exc:
            self._fail(RequestError(f"invalid request: {exc}"))

    def _fail(self, error: RequestError) -> None:
        self._stopped = True
        current = self._current
        if current is None:
            self._error = error
        elif current.head_complete:
            if not isinstance(error, InvalidBody):
                error = InvalidBody(str(error), error.status)
            current.error = error
        else:
            current.error = error
