"""The demo service `microsvc run` serves when given no app: /health and /data.

`bare` is the /data answer without a framework, a plain WSGI callable for measuring the
server alone (`microsvc run microsvc.demo:bare`; `scripts/bench --sections engine`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

_BARE_BODY = b'{"message":"Microservice response"}\n'
_BARE_HEADERS = [
    ("Content-Type", "application/json"),
    ("Content-Length", str(len(_BARE_BODY))),
]


def create_app() -> Flask:
    app = Flask("microsvc.demo")

    @app.get("/health")
    def health() -> ResponseReturnValue:
        return jsonify(status="ok"), 200

    @app.get("/data")
    def data() -> ResponseReturnValue:
        return jsonify(message="Microservice response"), 200

    @app.get("/io")
    def io() -> ResponseReturnValue:
        """Waits like a call to a database or another service (?ms=50 by default)."""
        milliseconds = min(request.args.get("ms", default=50, type=int), 10_000)
        time.sleep(milliseconds / 1000)
        return jsonify(slept_ms=milliseconds, pid=os.getpid()), 200

    return app


app = create_app()


def bare(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The /data answer for any path, with no framework in between."""
    start_response("200 OK", list(_BARE_HEADERS))
    return [_BARE_BODY]
