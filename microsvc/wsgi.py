"""The WSGI types (PEP 3333) that every layer of microsvc speaks, and the environ keys
microsvc's layers pass each other.

`Environ` is the request's environ dict, `StartResponse` the callable a WSGI application
calls with its status and headers, `WSGIApp` the application itself and `ExcInfo` what
`sys.exc_info()` returns for an error being handled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any, TypeAlias

Environ: TypeAlias = dict[str, Any]
StartResponse: TypeAlias = Callable[..., Any]
WSGIApp: TypeAlias = Callable[[Environ, StartResponse], Iterable[bytes]]
ExcInfo: TypeAlias = tuple[type[BaseException], BaseException, TracebackType | None]

#: Where the route of a request is named for the metrics (the endpoints name theirs).
ROUTE_KEY = "microsvc.route"
#: Seconds the request waited before a worker took it up (absent when unknown).
QUEUE_TIME_KEY = "microsvc.queue_time"
#: Where that figure came from: "proxy" (X-Request-Start) or "kernel" (TCP_INFO).
QUEUE_SOURCE_KEY = "microsvc.queue_source"
#: True for a request answered 503 because it had waited longer than the limit.
SHED_KEY = "microsvc.shed"

__all__ = [
    "QUEUE_SOURCE_KEY",
    "QUEUE_TIME_KEY",
    "ROUTE_KEY",
    "SHED_KEY",
    "Environ",
    "ExcInfo",
    "StartResponse",
    "WSGIApp",
]
