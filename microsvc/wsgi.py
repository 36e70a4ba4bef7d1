"""The WSGI types (PEP 3333) that every layer of microsvc speaks.

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

__all__ = ["Environ", "ExcInfo", "StartResponse", "WSGIApp"]
