"""Proxy trust: X-Forwarded-For and X-Forwarded-Proto are believed from trusted proxies
only.

The client is always 127.0.0.1. With the default --forwarded-allow-ips (loopback) it is a
trusted proxy, so the app sees the address and scheme it forwards. With
--forwarded-allow-ips 10.9.9.9 it is a direct, untrusted client, and its headers change
nothing. The app reports what it sees; /healthz and /readyz come from microsvc's
middleware in front of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e

WHOAMI_APP = """
from flask import Flask, request

app = Flask(__name__)


@app.get("/health")
def health():
    return {"status": "ok"}


@app.get("/whoami")
def whoami():
    return {"remote_addr": request.remote_addr, "scheme": request.scheme}
"""

FORWARDED = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}


@pytest.fixture
def whoami_app(tmp_path: Path) -> str:
    (tmp_path / "whoami_app.py").write_text(WHOAMI_APP)
    return "whoami_app:app"


def whoami(server) -> dict[str, str]:
    with requests.get(server.url + "/whoami", headers=FORWARDED, timeout=5) as response:
        assert response.status_code == 200, server.describe()
        seen: dict[str, str] = response.json()
    for path in ("/healthz", "/readyz"):
        with requests.get(server.url + path, timeout=5) as response:
            assert response.status_code in (200, 503), f"{path}: {server.describe()}"
    return seen


def test_forwarded_headers_from_an_untrusted_client_are_ignored(serve, figures, whoami_app):
    server = serve([whoami_app, "--workers", "1", "--forwarded-allow-ips", "10.9.9.9"])
    seen = whoami(server)
    figures(f"untrusted 127.0.0.1 sending {FORWARDED}: app saw {seen}")
    assert seen == {"remote_addr": "127.0.0.1", "scheme": "http"}, server.describe()


def test_forwarded_headers_from_a_trusted_loopback_proxy_are_believed(serve, figures, whoami_app):
    server = serve([whoami_app, "--workers", "1"])
    seen = whoami(server)
    figures(f"trusted 127.0.0.1 (default) sending {FORWARDED}: app saw {seen}")
    assert seen == {"remote_addr": "6.6.6.6", "scheme": "https"}, server.describe()
