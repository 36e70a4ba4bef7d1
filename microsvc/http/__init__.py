"""microsvc's own HTTP/1.1 engine: httptools (llhttp) for parsing, a WSGI loop around it.

`serve_connection(sock, client, server, app, config)` serves one connected socket until it
is to close; any worker class can call it from a thread or a greenlet. The request path
is compiled with mypyc where microsvc was installed with a C compiler (`BUILD`)."""

from __future__ import annotations

from microsvc.http.build import select

#: Which build of the request path runs, compiled or plain Python (see `build`); decided
#: before the modules below are imported.
BUILD = select()

# The request path's modules: imported after the build is selected.
from microsvc.http.body import RequestBody  # noqa: E402
from microsvc.http.config import HTTPConfig  # noqa: E402
from microsvc.http.connection import (  # noqa: E402
    TAKEN_OVER_KEY,
    Hooks,
    HTTPConnection,
    RequestRecord,
    serve_connection,
)
from microsvc.http.errors import InvalidBody, RequestError, ResponseError  # noqa: E402
from microsvc.http.filewrapper import FileWrapper  # noqa: E402

__all__ = [
    "BUILD",
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
