"""gevent with --preload: microsvc patches before the app is imported, so gevent has
nothing to warn about. The control runs gunicorn the naive way on the same app and
shows the warning appears when patching comes too late, so the main test can fail."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

#: `from ssl import SSLContext` keeps a direct reference to ssl's unpatched class:
#: exactly what gevent warns about when it patches ssl after the import.
SSL_APP = """\
from ssl import SSLContext  # noqa: F401

from flask import Flask

app = Flask(__name__)


@app.get("/health")
def health():
    return {"status": "ok", "ssl_context": SSLContext.__module__}
"""


@pytest.fixture
def ssl_app(tmp_path: Path) -> str:
    (tmp_path / "ssl_app.py").write_text(SSL_APP)
    return "ssl_app:app"


def exercise(server: Server) -> str:
    for _ in range(5):
        with requests.get(server.url + "/health", timeout=10) as response:
            assert response.status_code == 200, server.describe()
    assert server.stop() == 0, server.describe()
    return server.log_text()


def test_microsvc_gevent_preload_logs_no_monkey_patch_warning(
    serve: ServeFactory, ssl_app: str
) -> None:
    server = serve([ssl_app, "-k", "gevent", "--preload", "--workers", "2"])
    log = exercise(server)
    assert "2 gevent workers" in log, log
    assert "MonkeyPatchWarning" not in log, log


def test_control_naive_gunicorn_gevent_preload_does_warn(serve: ServeFactory, ssl_app: str) -> None:
    server = serve(
        command=[
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "gevent",
            "--preload",
            "-w",
            "1",
            "--no-control-socket",
            "-b",
            "127.0.0.1:{port}",
            ssl_app,
        ],
        name="gunicorn",
    )
    log = exercise(server)
    assert "MonkeyPatchWarning" in log, log
    assert "ssl_app" in log, log
