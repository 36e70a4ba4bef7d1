"""The demo service `microsvc run` serves when given no app: /health and /data."""

from __future__ import annotations

import os
import time

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue


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
