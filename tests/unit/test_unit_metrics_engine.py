"""Request metrics recorded by microsvc's HTTP engine (`microsvc.http.meter`): on a real
connection, without a wrapper around the app."""

from __future__ import annotations

import socket
import threading
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry

from microsvc.http import TAKEN_OVER_KEY, Hooks, HTTPConfig, serve_connection
from microsvc.http.meter import RequestMeter
from microsvc.metrics.instruments import METHODS, RequestMetrics
from microsvc.metrics.recorder import RequestRecorder
from microsvc.serving.middleware import QUEUE_TIME_KEY, ROUTE_KEY, SHED_KEY


def flask_app() -> Flask:
    app = Flask("engine_metrics")

    @app.route("/items/<int:item>")
    def item(item: int) -> dict[str, int]:
        return {"item": item}

    @app.route("/fails")
    def fails() -> str:
        raise RuntimeError("the view failed")

    return app


def metered(app: Any, flask: bool) -> tuple[RequestMeter, CollectorRegistry]:
    registry = CollectorRegistry()
    recorder = RequestRecorder(RequestMetrics(registry), in_flight=False, threads=True)
    meter = RequestMeter(
        recorder, recorder.placed, frozenset(METHODS), flask, recorder.write_lock()
    )
    return meter, registry


def serve(app: Any, meter: RequestMeter, data: bytes) -> bytes:
    client, server = socket.socketpair()
    client.settimeout(5)

    def run() -> None:
        try:
            serve_connection(
                server, ("10.1.2.3", 5555), ("127.0.0.1", 80), app, HTTPConfig(), Hooks(meter=meter)
            )
        finally:
            server.close()

    thread = threading.Thread(target=run)
    thread.start()
    with client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := client.recv(65536):
            received += chunk
    thread.join(5)
    return received


def requests(registry: CollectorRegistry, method: str, route: str, status: str) -> float:
    labels = {"method": method, "route": route, "status": status}
    return registry.get_sample_value("microsvc_http_requests_total", labels) or 0.0


def test_flask_requests_are_counted_by_url_rule_method_and_status() -> None:
    app = flask_app()
    meter, registry = metered(app, flask=True)
    raw = serve(
        app,
        meter,
        b"GET /items/1 HTTP/1.1\r\n\r\nGET /items/2 HTTP/1.1\r\n\r\n"
        b"HEAD /items/3 HTTP/1.1\r\n\r\nGET /nowhere HTTP/1.1\r\n\r\n"
        b"GET /fails HTTP/1.1\r\n\r\nPROPFIND /items/4 HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    assert raw.count(b"HTTP/1.1 ") == 6
    assert requests(registry, "GET", "/items/<int:item>", "200") == 2
    assert requests(registry, "HEAD", "/items/<int:item>", "200") == 1
    assert requests(registry, "GET", "(unmatched)", "404") == 1
    assert requests(registry, "GET", "/fails", "500") == 1
    assert requests(registry, "other", "(unmatched)", "405") == 1
    durations = registry.get_sample_value(
        "microsvc_http_request_duration_seconds_count",
        {"method": "GET", "route": "/items/<int:item>", "status": "200"},
    )
    assert durations == 2


def test_other_apps_name_their_route_and_a_failure_before_the_response_is_a_500() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/raise":
            raise RuntimeError("before start_response")
        if environ["PATH_INFO"] == "/named":
            environ[ROUTE_KEY] = "/named/<x>"
        environ[QUEUE_TIME_KEY] = 0.25
        start_response("201 Created", [("Content-Length", "0")])
        return [b""]

    meter, registry = metered(app, flask=False)
    serve(
        app,
        meter,
        b"GET /named HTTP/1.1\r\n\r\nGET /plain HTTP/1.1\r\n\r\n"
        b"GET /raise HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    assert requests(registry, "GET", "/named/<x>", "201") == 1
    assert requests(registry, "GET", "(unknown)", "201") == 1
    assert requests(registry, "GET", "(unknown)", "500") == 1
    assert registry.get_sample_value("microsvc_http_request_queue_seconds_count") == 2


def test_a_connection_the_app_took_over_counts_as_101_and_a_shed_request_as_shed() -> None:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/ws":
            # As eventlet.websocket does, answered on the socket itself (here after
            # starting a response it never sends).
            start_response("200 OK", [])
            environ[TAKEN_OVER_KEY] = True
            environ["gunicorn.socket"].sendall(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            return []
        environ[QUEUE_TIME_KEY] = 3.0
        environ[SHED_KEY] = True
        environ[ROUTE_KEY] = "(shed)"
        start_response("503 Service Unavailable", [("Content-Length", "0")])
        return [b""]

    meter, registry = metered(app, flask=False)
    raw = serve(app, meter, b"GET /busy HTTP/1.1\r\n\r\nGET /ws HTTP/1.1\r\n\r\n")
    assert raw.count(b"HTTP/1.1 ") == 2
    assert requests(registry, "GET", "(unknown)", "101") == 1
    assert requests(registry, "GET", "(shed)", "503") == 1
    assert registry.get_sample_value("microsvc_http_requests_shed_total") == 1
    assert registry.get_sample_value("microsvc_http_request_queue_seconds_count") == 1
