"""Request metrics around a WSGI app: labels, statuses, streaming, errors, in flight."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from microsvc.metrics.instruments import RequestMetrics
from microsvc.metrics.wsgi import UNKNOWN, UNMATCHED, InstrumentedApp
from microsvc.serving import middleware
from microsvc.serving.middleware import ROUTE_KEY


class Reader:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def requests(self, method: str, route: str, status: str) -> float:
        labels = {"method": method, "route": route, "status": status}
        return self.registry.get_sample_value("microsvc_http_requests_total", labels) or 0.0

    def observed(self, method: str, route: str, status: str) -> float:
        labels = {"method": method, "route": route, "status": status}
        name = "microsvc_http_request_duration_seconds_count"
        return self.registry.get_sample_value(name, labels) or 0.0

    def total(self) -> float:
        return sum(
            sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name == "microsvc_http_requests_total"
        )

    def in_flight(self) -> float:
        return self.registry.get_sample_value("microsvc_http_requests_in_flight") or 0.0


def instrumented(app: Any, routes_from: Any = None) -> tuple[InstrumentedApp, Reader]:
    registry = CollectorRegistry()
    return InstrumentedApp(app, RequestMetrics(registry), routes_from=routes_from), Reader(registry)


def call(app: Any, path: str = "/", method: str = "GET", **extra: Any) -> tuple[str, bytes]:
    environ = {
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.version": (1, 0),
        **extra,
    }
    seen: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        seen.append(status)
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return seen[-1], data


def flask_app() -> Flask:
    app = Flask("metrics-test")

    @app.get("/items/<int:item>")
    def item(item: int) -> dict[str, int]:
        return {"item": item}

    @app.post("/items")
    def create() -> tuple[str, int]:
        return "", 201

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    return app


def test_flask_requests_are_labelled_by_url_rule_not_path() -> None:
    app, metrics = instrumented(flask_app())
    for item in range(5):
        assert call(app, f"/items/{item}")[0] == "200 OK"
    call(app, "/items", "POST")
    assert metrics.requests("GET", "/items/<int:item>", "200") == 5
    assert metrics.observed("GET", "/items/<int:item>", "200") == 5
    assert metrics.requests("POST", "/items", "201") == 1
    assert metrics.total() == 6


def test_unmatched_flask_paths_share_one_label() -> None:
    app, metrics = instrumented(flask_app())
    for path in ("/nope", "/other/thing", "/items/abc"):
        assert call(app, path)[0].startswith("404")
    assert metrics.requests("GET", UNMATCHED, "404") == 3


def test_flask_error_is_a_500() -> None:
    app, metrics = instrumented(flask_app())
    assert call(app, "/boom")[0].startswith("500")
    assert metrics.requests("GET", "/boom", "500") == 1


def test_routes_come_from_the_user_app_behind_microsvc_middleware() -> None:
    user = flask_app()
    wrapped = middleware.wrap(
        user,
        health_path="/healthz",
        ready_path="/readyz",
        is_ready=lambda: False,
        trusted_proxies=(),
    )
    app, metrics = instrumented(wrapped, routes_from=user)
    call(app, "/items/3")
    call(app, "/healthz")
    call(app, "/readyz")
    assert metrics.requests("GET", "/items/<int:item>", "200") == 1
    assert metrics.requests("GET", "/healthz", "200") == 1
    assert metrics.requests("GET", "/readyz", "503") == 1


def plain_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ["PATH_INFO"] == "/named":
        environ[ROUTE_KEY] = "/named/{id}"
    start_response("204 No Content", [])
    return []


def test_other_apps_name_routes_in_the_environ_or_count_as_unknown() -> None:
    app, metrics = instrumented(plain_app)
    call(app, "/named")
    call(app, "/anything/else")
    assert metrics.requests("GET", "/named/{id}", "204") == 1
    assert metrics.requests("GET", UNKNOWN, "204") == 1


def test_unusual_methods_are_one_label() -> None:
    app, metrics = instrumented(plain_app)
    for method in ("BREW", "PROPFIND", "X" * 50):
        call(app, "/", method)
    call(app, "/", "DELETE")
    assert metrics.requests("other", UNKNOWN, "204") == 3
    assert metrics.requests("DELETE", UNKNOWN, "204") == 1


def test_a_request_counts_when_its_body_is_closed_and_is_in_flight_until_then() -> None:
    events: list[str] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            events.append("iter")
            yield b"a"
            yield b"b"

        def close(self) -> None:
            events.append("close")

    def streaming(environ: dict[str, Any], start_response: Any) -> Body:
        start_response("200 OK", [])
        return Body()

    app, metrics = instrumented(streaming)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    body = app(environ, lambda status, headers, exc_info=None: None)
    assert metrics.in_flight() == 1
    assert metrics.total() == 0
    assert b"".join(body) == b"ab"
    assert metrics.total() == 0
    body.close()  # type: ignore[attr-defined]
    assert events == ["iter", "close"]
    assert metrics.total() == 1
    assert metrics.in_flight() == 0
    body.close()  # type: ignore[attr-defined]
    assert metrics.total() == 1  # counted once


def test_app_raising_before_start_response_counts_as_500_and_reraises() -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        raise ValueError("broken")

    app, metrics = instrumented(broken)
    with pytest.raises(ValueError, match="broken"):
        call(app, "/")
    assert metrics.requests("GET", UNKNOWN, "500") == 1
    assert metrics.in_flight() == 0


def test_file_wrapper_responses_are_passed_through_untouched() -> None:
    class FileWrapper:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def __iter__(self) -> Iterator[bytes]:
            yield self.data

    def sendfile(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](b"file")

    app, metrics = instrumented(sendfile)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/f", "wsgi.file_wrapper": FileWrapper}
    body = app(environ, lambda status, headers, exc_info=None: None)
    assert isinstance(body, FileWrapper)
    assert metrics.requests("GET", UNKNOWN, "200") == 1
    assert metrics.in_flight() == 0


def test_start_response_error_path_is_forwarded() -> None:
    def retrying(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            raise KeyError("late")
        except KeyError:
            start_response("502 Bad Gateway", [], sys.exc_info())
        return [b"x"]

    forwarded: list[Any] = []
    app, metrics = instrumented(retrying)
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}
    body = app(environ, lambda status, headers, exc_info=None: forwarded.append(exc_info))
    body.close()  # type: ignore[attr-defined]
    assert forwarded and forwarded[0][0] is KeyError
    assert metrics.requests("GET", UNKNOWN, "502") == 1


def test_queue_time_is_observed_and_shed_requests_are_counted() -> None:
    import time

    user = flask_app()
    wrapped = middleware.wrap(
        user,
        health_path="/healthz",
        ready_path="/readyz",
        is_ready=lambda: True,
        trusted_proxies=("127.0.0.1",),
        max_queue_time=1.0,
    )
    app, metrics = instrumented(wrapped, routes_from=user)
    registry = metrics.registry

    def stamp(ago: float) -> str:
        return f"t={time.time() - ago:.3f}"

    assert call(app, "/items/3", HTTP_X_REQUEST_START=stamp(0.3))[0].startswith("200")
    assert call(app, "/items/3", HTTP_X_REQUEST_START=stamp(5))[0].startswith("503")
    assert call(app, "/items/3")[0].startswith("200")  # no queue time known
    count = registry.get_sample_value("microsvc_http_request_queue_seconds_count")
    assert count == 2
    under_one = registry.get_sample_value(
        "microsvc_http_request_queue_seconds_bucket", {"le": "1.0"}
    )
    assert under_one == 1
    assert registry.get_sample_value("microsvc_http_requests_shed_total") == 1
    assert metrics.requests("GET", "(shed)", "503") == 1
    assert metrics.requests("GET", "/items/<int:item>", "200") == 2
