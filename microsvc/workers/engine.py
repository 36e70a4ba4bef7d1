"""microsvc's HTTP engine (`microsvc.http`) inside gunicorn's workers.

gunicorn keeps the arbiter, signals, configuration, hooks and the worker life cycle; for
each accepted connection, a worker of `--http-engine microsvc` calls
`microsvc.http.serve_connection` (or `HTTPConnection.serve` for gthread and sync) instead of
gunicorn's parser and response. `EngineWorker` is the mixin that does it for every class:

- `http_config(cfg)` turns gunicorn's settings into an `HTTPConfig` (limits, keep-alive,
  proxy trust, TLS, sendfile) and refuses, with a `UsageError`, the settings the engine
  cannot honour (HTTP/2, the PROXY protocol, uwsgi, gunicorn's parser leniencies). The
  launcher calls it in the master, so a refused setting stops the start with one line.
- Hooks around each request: gunicorn's `pre_request(worker, req)` and
  `post_request(worker, req, environ, resp)` get request- and response-like objects
  (`EngineRequest`, `EngineResponse`), the access log gets them too (gunicorn's
  `access_log_format` atoms and microsvc's JSON logger alike), the request counts toward
  `max_requests`, `wsgi.errors` writes to the error log, and a stopping worker answers
  with `Connection: close`.
- The engine's own log lines (refused requests, application errors) go to gunicorn's
  error log.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

from gunicorn.http.wsgi import WSGIErrorsWrapper

from microsvc.errors import UsageError
from microsvc.http import Hooks, HTTPConfig, RequestRecord
from microsvc.http.green import GreenIO
from microsvc.http.parser import Message
from microsvc.observe.scoreboard import Scoreboard
from microsvc.workers.deadlines import InFlightRequests
from microsvc.wsgi import Environ

#: gunicorn's largest request line and header count; its 0 means these.
MAX_REQUEST_LINE = 8190
MAX_HEADERS = 32768
DEFAULT_FIELD_SIZE = 8190
#: The keep-alive wait when gunicorn's keepalive is 0 (the engine then closes after each
#: response, and never waits).
_NO_KEEPALIVE_WAIT = 2.0

#: gunicorn settings the engine cannot honour, with the value that it can.
_REFUSED: dict[str, Callable[[Any], bool]] = {
    "proxy_protocol": lambda value: value not in ("off", False, None),
    "protocol": lambda value: value != "http",
    "http_protocols": lambda value: any(p != "h1" for p in value or ()),
    "http2_cleartext": lambda value: value not in ("off", False, None),
    "permit_obsolete_folding": bool,
    "strip_header_spaces": bool,
    "permit_unconventional_http_method": bool,
    "permit_unconventional_http_version": bool,
    "casefold_http_method": bool,
    "header_map": lambda value: value == "dangerous",
    "http_parser": lambda value: value == "fast",
}

#: Where the request-like object of pre_request waits for post_request.
_REQUEST_KEY = "microsvc.engine.request"


def http_config(cfg: Any, *, multithread: bool = False, errors: Any = None) -> HTTPConfig:
    """The engine's settings from gunicorn's `cfg`. Raises UsageError for a setting the
    engine cannot honour, naming it and the way out (`--http-engine gunicorn`)."""
    for name, refused in _REFUSED.items():
        value = getattr(cfg, name, None)
        if refused(value):
            raise UsageError(
                f"gunicorn setting {name}={value!r} needs gunicorn's HTTP engine; "
                f"add --http-engine gunicorn (or drop the setting)"
            )
    line = cfg.limit_request_line
    fields = cfg.limit_request_fields
    field_size = cfg.limit_request_field_size
    try:
        return HTTPConfig(
            limit_request_line=MAX_REQUEST_LINE if line <= 0 else min(line, MAX_REQUEST_LINE),
            limit_request_fields=MAX_HEADERS if fields <= 0 else min(fields, MAX_HEADERS),
            limit_request_field_size=DEFAULT_FIELD_SIZE if field_size <= 0 else field_size,
            keepalive_timeout=float(cfg.keepalive) if cfg.keepalive > 0 else _NO_KEEPALIVE_WAIT,
            is_ssl=bool(cfg.is_ssl),
            forwarded_allow_ips=tuple(cfg.forwarded_allow_ips),
            secure_scheme_headers=dict(cfg.secure_scheme_headers or {}),
            forwarder_headers=tuple(cfg.forwarder_headers),
            header_map=cfg.header_map,
            script_name=os.environ.get("SCRIPT_NAME", ""),
            sendfile=cfg.sendfile is not False,
            multithread=multithread,
            multiprocess=cfg.workers > 1,
            errors=errors,
        )
    except ValueError as exc:
        raise UsageError(f"HTTP engine: {exc}") from None


class EngineRequest:
    """What gunicorn's pre_request and post_request hooks and its access log read of a
    request (gunicorn's `Request`): method, uri, path, query, fragment, version,
    headers (upper-case names), scheme, body, peer_addr and remote_addr."""

    trailers: tuple[tuple[str, str], ...] = ()
    proxy_protocol_info: None = None

    def __init__(self, message: Message, environ: Environ, client: Any) -> None:
        self._message = message
        self.body = environ.get("wsgi.input")
        self.peer_addr = client

    @property
    def method(self) -> str:
        return self._message.method

    @property
    def uri(self) -> str:
        return self._message.target

    @property
    def path(self) -> str:
        return self._message.path

    @property
    def query(self) -> str:
        return self._message.query

    @property
    def fragment(self) -> str:
        return self._message.target.partition("#")[2]

    @property
    def version(self) -> tuple[int, int]:
        return self._message.version

    @property
    def headers(self) -> list[tuple[str, str]]:
        return self._message.headers

    @property
    def scheme(self) -> str:
        return self._message.scheme

    @property
    def remote_addr(self) -> Any:
        return self.peer_addr


class EngineResponse:
    """What the access log and post_request read of a response (gunicorn's `Response`):
    status ("200 OK", or None when none was sent), status_code, sent (body bytes) and
    headers (as the application gave them)."""

    __slots__ = ("headers", "sent", "status", "status_code")

    def __init__(self, record: RequestRecord) -> None:
        self.status: str | None = record.status or None
        self.status_code: int | None = record.status_code or None
        self.sent = record.response_bytes
        self.headers = record.response_headers


def _is_default(cfg: Any, name: str) -> bool:
    setting = cfg.settings.get(name)
    return setting is None or setting.get() is setting.default


def route_engine_log(error_log: logging.Logger | None) -> None:
    """Send the engine's log lines (`microsvc.http`) to gunicorn's error log handlers."""
    if error_log is None:
        return
    engine_log = logging.getLogger("microsvc.http")
    engine_log.handlers = list(error_log.handlers)
    engine_log.setLevel(error_log.getEffectiveLevel())
    engine_log.propagate = False


class EngineWorker:
    """Mixin for a gunicorn worker class (put it first): serves each connection with
    microsvc's HTTP engine. A class whose requests may run in several threads at once
    sets `engine_multithread`."""

    engine_multithread = False

    # Provided by gunicorn's Worker (and Recycling).
    app: Any
    alive: bool
    nr: int
    max_requests: int
    cfg: Any
    log: Any
    wsgi: Any

    http_config: HTTPConfig
    http_hooks: Hooks

    # Provided by RequestDeadlines (`deadlines`): None while --request-timeout is off.
    _deadlines: InFlightRequests | None = None
    deadline_begin: Callable[[Environ, str, str], None]
    deadline_end: Callable[[], None]
    #: The green-thread library's waits (gevent, eventlet); None for threads.
    http_green: GreenIO | None = None

    def run(self) -> None:
        self.setup_engine()
        super().run()  # type: ignore[misc]

    def setup_engine(self) -> None:
        cfg = self.cfg
        self._wsgi_errors = WSGIErrorsWrapper(cfg)
        self.http_config = http_config(
            cfg, multithread=self.engine_multithread, errors=self._wsgi_errors
        )
        self._engine_keepalive = cfg.keepalive > 0
        self._pre_request = None if _is_default(cfg, "pre_request") else cfg.pre_request
        self._post_request = None if _is_default(cfg, "post_request") else cfg.post_request
        self._log_access = bool(getattr(self.log, "access_log_enabled", True))
        # This worker's scoreboard slot (see `microsvc.observe.scoreboard`), if it has one:
        # the engine writes it around each request.
        board = getattr(getattr(self, "app", None), "scoreboard", None)
        slot = board.writer if isinstance(board, Scoreboard) else None
        route_engine_log(getattr(self.log, "error_log", None))
        # Each hook only where it has work: a request that needs neither costs no call
        # into Python around the app.
        deadlines = self._deadlines is not None
        hooked = self._pre_request is not None or self._post_request is not None
        counted = self.max_requests < sys.maxsize
        # With --metrics, the engine records each request itself (the app is not wrapped).
        engine_meter = getattr(getattr(self, "app", None), "engine_meter", None)
        self.http_hooks = Hooks(
            before=self._before_request if deadlines or hooked or counted else None,
            after=self._after_request if deadlines or hooked or self._log_access else None,
            keep_serving=self.keep_serving,
            slot=slot,
            meter=engine_meter() if engine_meter is not None else None,
        )

    def keep_serving(self) -> bool:
        """Whether a connection may serve another request after this one."""
        return self.alive and self._engine_keepalive

    def serve_client(self, client: socket.socket, addr: Any, server: Any) -> None:
        """Serves one accepted (and, for TLS, wrapped) connection until it is to close;
        closing it is the caller's."""
        from microsvc.http import serve_connection

        set_nodelay(client)
        serve_connection(
            client, addr, server, self.wsgi, self.http_config, self.http_hooks, self.http_green
        )

    # hooks

    def _before_request(self, environ: Environ, message: Message) -> None:
        if self._deadlines is not None:  # --request-timeout (see `deadlines`)
            self.deadline_begin(environ, message.method, message.path)
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            after_request = getattr(self, "after_request", None)
            if after_request is not None:
                after_request(True)  # Recycling names the reason
            self.alive = False
        if self._pre_request is not None or self._post_request is not None:
            request = environ[_REQUEST_KEY] = EngineRequest(
                message, environ, environ.get("REMOTE_ADDR")
            )
            if self._pre_request is not None:
                self._pre_request(self, request)

    def _after_request(self, environ: Environ, record: RequestRecord) -> None:
        if self._deadlines is not None:
            self.deadline_end()
        if not self._log_access and self._post_request is None:
            return
        response = EngineResponse(record)
        if self._log_access and record.status:  # no line when nothing was sent
            self.log.access(
                response,
                environ.get(_REQUEST_KEY) or record.request_headers,
                environ,
                datetime.timedelta(seconds=record.duration),
            )
        if self._post_request is not None:
            request = environ.get(_REQUEST_KEY)
            try:
                self._post_request(self, request, environ, response)
            except Exception:
                self.log.exception("Exception in post_request hook")


def set_nodelay(sock: Any) -> None:
    """TCP_NODELAY on a TCP connection: a response written in two parts is not held back
    by Nagle's algorithm waiting for the client's ACK."""
    if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
