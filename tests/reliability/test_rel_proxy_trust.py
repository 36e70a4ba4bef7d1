"""Proxy trust: X-Forwarded-For and X-Forwarded-Proto are believed from trusted proxies
only.

The client is always 127.0.0.1. With the default --forwarded-allow-ips (loopback) it is a
trusted proxy, so the app sees the address and scheme it forwards. With
--forwarded-allow-ips 10.9.9.9 it is a direct, untrusted client, and its headers change
nothing. The app reports what it sees; /healthz and /readyz come from microsvc's
middleware in front of it.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = [pytest.mark.e2e, pytest.mark.both_engines]

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


def whoami(server: Server) -> dict[str, str]:
    with requests.get(server.url + "/whoami", headers=FORWARDED, timeout=5) as response:
        assert response.status_code == 200, server.describe()
        seen: dict[str, str] = response.json()
    # The master turns readiness on (and logs it) once the worker has loaded the app.
    server.wait_log(r"Ready: 1 workers booted")
    for path, body in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
        with requests.get(server.url + path, timeout=5) as response:
            assert response.status_code == 200, f"{path}: {server.describe()}"
            assert response.json() == body, f"{path}: {server.describe()}"
    return seen


def test_forwarded_headers_from_an_untrusted_client_are_ignored(
    serve: ServeFactory, figures: Figures, whoami_app: str
) -> None:
    server = serve([whoami_app, "--workers", "1", "--forwarded-allow-ips", "10.9.9.9"])
    seen = whoami(server)
    figures(f"untrusted 127.0.0.1 sending {FORWARDED}: app saw {seen}")
    assert seen == {"remote_addr": "127.0.0.1", "scheme": "http"}, server.describe()


def test_forwarded_headers_from_a_trusted_loopback_proxy_are_believed(
    serve: ServeFactory, figures: Figures, whoami_app: str
) -> None:
    server = serve([whoami_app, "--workers", "1"])
    seen = whoami(server)
    figures(f"trusted 127.0.0.1 (default) sending {FORWARDED}: app saw {seen}")
    assert seen == {"remote_addr": "6.6.6.6", "scheme": "https"}, server.describe()


def get_raw(server: Server, headers: list[tuple[str, str]]) -> tuple[int, dict[str, str] | None]:
    """GET /whoami with these header lines, repeated names sent as separate lines."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.putrequest("GET", "/whoami", skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    return response.status, (json.loads(body) if response.status == 200 else None)


def test_star_believes_only_the_entry_the_proxy_wrote(
    serve: ServeFactory, figures: Figures, whoami_app: str
) -> None:
    # With '*' the peer is trusted to say whom it saw (the rightmost entry), nothing more:
    # what a client wrote to the left of it, in the same line or another, is not believed.
    server = serve([whoami_app, "-w", "1", "--forwarded-allow-ips", "*"])
    cases = {
        "one line": [("X-Forwarded-For", "6.6.6.6, 203.0.113.9")],
        "two lines": [("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "203.0.113.9")],
        "ipv6 with a port": [("X-Forwarded-For", "6.6.6.6, [2001:db8::9]:443")],
    }
    expected = {"one line": "203.0.113.9", "two lines": "203.0.113.9"}
    expected["ipv6 with a port"] = "2001:db8::9"
    for name, headers in cases.items():
        status, seen = get_raw(server, headers)
        figures(f"'*', {name} {headers}: {status} {seen}")
        assert status == 200 and seen is not None, (name, server.describe())
        assert seen["remote_addr"] == expected[name], (name, seen, server.describe())
    # An entry that is not an address ends the walk: nothing left of it is believed.
    status, seen = get_raw(server, [("X-Forwarded-For", "6.6.6.6, unknown")])
    assert (status, seen) == (200, {"remote_addr": "127.0.0.1", "scheme": "http"}), seen


def test_scheme_is_gunicorns_decision_for_the_same_peers(
    serve: ServeFactory, figures: Figures, whoami_app: str
) -> None:
    # gunicorn's secure_scheme_headers decide wsgi.url_scheme; microsvc leaves it alone.
    server = serve([whoami_app, "-w", "1", "--forwarded-allow-ips", "*"])
    cases: list[tuple[list[tuple[str, str]], int, str | None]] = [
        ([("X-Forwarded-Proto", "https")], 200, "https"),
        ([("X-Forwarded-Proto", "http")], 200, "http"),
        ([("X-Forwarded-Proto", "HTTPS")], 200, "http"),  # values are compared exactly
        ([("X-Forwarded-Proto", "http, https")], 200, "http"),
        ([("X-Forwarded-Ssl", "on")], 200, "https"),
        ([("X-Forwarded-Proto", "https"), ("X-Forwarded-Proto", "http")], 400, None),
    ]
    for headers, code, scheme in cases:
        status, seen = get_raw(server, headers)
        figures(f"'*', {headers}: {status} {seen}")
        assert status == code, (headers, status, server.describe())
        assert (seen or {}).get("scheme") == scheme, (headers, seen)
