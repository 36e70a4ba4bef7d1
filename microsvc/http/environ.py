"""The PEP 3333 environ of a request, built the way gunicorn builds it."""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import unquote_to_bytes

from microsvc.http.config import HTTPConfig
from microsvc.http.errors import RequestError
from microsvc.http.parser import Message
from microsvc.wsgi import Environ


def connection_environ(config: HTTPConfig, client: Any, server: Any) -> Environ:
    """The keys that are the same for every request on a connection."""
    from microsvc.http.filewrapper import FileWrapper

    environ: Environ = {
        "wsgi.version": (1, 0),
        "wsgi.errors": sys.stderr if config.errors is None else config.errors,
        "wsgi.multithread": config.multithread,
        "wsgi.multiprocess": config.multiprocess,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.input_terminated": True,
        "SERVER_SOFTWARE": config.server_software,
        "SCRIPT_NAME": config.script_name,
    }
    if isinstance(client, tuple):
        environ["REMOTE_ADDR"] = client[0]
        environ["REMOTE_PORT"] = str(client[1])
    elif isinstance(client, bytes):
        environ["REMOTE_ADDR"] = client.decode()
    else:
        environ["REMOTE_ADDR"] = str(client)
    if isinstance(server, tuple):
        environ["SERVER_NAME"] = str(server[0])
        environ["SERVER_PORT"] = str(server[1])
    return environ


def request_environ(base: Environ, message: Message) -> Environ:
    """The environ of one request: a copy of the connection's keys plus the request's.
    Raises RequestError when the path does not start with the script name."""
    environ = base.copy()
    environ["REQUEST_METHOD"] = message.method
    environ["RAW_URI"] = message.target
    environ["SERVER_PROTOCOL"] = "HTTP/1.1" if message.version == (1, 1) else "HTTP/1.0"
    environ["wsgi.url_scheme"] = message.scheme
    environ.update(message.environ_headers)

    path = message.path
    environ["QUERY_STRING"] = message.query
    script_name = environ["SCRIPT_NAME"]
    if message.script_name is not None:
        script_name = environ["SCRIPT_NAME"] = message.script_name
    if script_name:
        if not path.startswith(script_name):
            raise RequestError(
                f"path {path!r} does not start with SCRIPT_NAME {script_name!r}", 500
            )
        path = path[len(script_name) :]
    environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
    if "SERVER_NAME" not in environ:
        _server_from_host(environ, environ.get("HTTP_HOST"), message.scheme)
    return environ


def _server_from_host(environ: Environ, host: str | None, scheme: str) -> None:
    # A Unix socket has no address: name the server after the Host header, as gunicorn does.
    if host:
        name, _, port = host.partition(":")
        environ["SERVER_NAME"] = name
        environ["SERVER_PORT"] = port or ("443" if scheme == "https" else "80")
    else:
        environ["SERVER_NAME"] = ""
        environ["SERVER_PORT"] = ""
