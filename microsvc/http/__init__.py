"""microsvc's own HTTP/1.1 engine: httptools (llhttp) for parsing, a WSGI loop around it.

`serve_connection(sock, client, server, app, config)` serves one connected socket until it
is to close; any worker class can call it from a thread or a greenlet."""

from __future__ import annotations

from microsvc.http.body import FileWrapper, RequestBody
from microsvc.http.config import HTTPConfig
from microsvc.http.connection import (
    TAKEN_OVER_KEY,
    Hooks,
    HTTPConnection,
    RequestRecord,
    serve_connection,
)
from microsvc.http.errors import InvalidBody, RequestError, ResponseError

__all__ = [
    "TAKEN_OVER_KEY",
    "FileWrapper",
    "HTTPConfig",
    "HTTPConnection",
    "Hooks",
    "InvalidBody",
    "RequestBody",
    "RequestError",
    "RequestRecord",
    "ResponseError",
    "serve_connection",
]
