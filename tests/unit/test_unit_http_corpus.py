"""microsvc.http against gunicorn's request corpus (tests/data/gunicorn_requests): every
invalid request refused, every valid one giving the environ gunicorn's own parser gives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from gunicorn.http import wsgi as gunicorn_wsgi
from gunicorn.http.errors import (
    ExpectationFailed,
    LimitRequestHeaders,
    LimitRequestLine,
    UnsupportedTransferCoding,
)
from gunicorn.http.parser import RequestParser
from test_unit_http_connection import CLIENT, SERVER, exchange, no_error_logged, responses

from harness import STRICTER, TRUNCATED, case_paths, expectation, request_bytes
from microsvc.http import HTTPConfig

CORPUS = Path(__file__).parent.parent / "data" / "gunicorn_requests"

# Settings of gunicorn's that microsvc.http does not have: the cases that need them are
# not run (the PROXY protocol, and compatibility switches that loosen parsing).
UNSUPPORTED_SETTINGS = {
    "proxy_protocol": "off",
    "permit_obsolete_folding": False,
    "strip_header_spaces": False,
    "permit_unconventional_http_method": False,
    "casefold_http_method": False,
}
HEADER_MAPS = ("drop", "refuse")

ENVIRON_KEYS = (
    "REQUEST_METHOD",
    "PATH_INFO",
    "QUERY_STRING",
    "RAW_URI",
    "SCRIPT_NAME",
    "SERVER_PROTOCOL",
    "SERVER_NAME",
    "SERVER_PORT",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "wsgi.url_scheme",
)


def http_config(cfg: Any) -> HTTPConfig:
    """microsvc.http's settings equal to a gunicorn Config's."""
    line = cfg.limit_request_line
    fields = cfg.limit_request_fields
    return HTTPConfig(
        limit_request_line=line if 0 < line < 8190 else 8190,
        limit_request_fields=fields if 0 < fields <= 32768 else 32768,
        limit_request_field_size=cfg.limit_request_field_size or 8190,
        forwarded_allow_ips=tuple(cfg.forwarded_allow_ips),
        secure_scheme_headers=dict(cfg.secure_scheme_headers),
        header_map=cfg.header_map,
    )


def supported(cfg: Any) -> bool:
    return cfg.header_map in HEADER_MAPS and all(
        getattr(cfg, name) == value for name, value in UNSUPPORTED_SETTINGS.items()
    )


def cases(kind: str) -> list[Any]:
    found = []
    for path in case_paths(CORPUS, kind):
        if supported(expectation(path)["cfg"]):
            found.append(pytest.param(path, id=path.stem))
    return found


def gunicorn_status(error: type[BaseException]) -> int:
    """The status gunicorn's workers answer a request error with."""
    statuses = {
        LimitRequestLine: 414,
        LimitRequestHeaders: 431,
        UnsupportedTransferCoding: 501,
        ExpectationFailed: 417,
    }
    return next((v for k, v in statuses.items() if issubclass(error, k)), 400)


class _Sock:
    def send(self, data: bytes) -> int:
        return len(data)

    sendall = send


def gunicorn_environs(data: bytes, cfg: Any) -> list[dict[str, Any]]:
    """What gunicorn's parser and gunicorn.http.wsgi.create make of `data`, request by
    request, up to the first one after which gunicorn closes the connection."""
    found = []
    for request in RequestParser(cfg, iter([data]), CLIENT):
        _, environ = gunicorn_wsgi.create(request, _Sock(), CLIENT, SERVER, cfg)
        environ["body"] = request.body.read()
        found.append(environ)
        if request.should_close():
            break
    return found


def recording_app(seen: list[dict[str, Any]]) -> Callable[..., list[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        environ = dict(environ)
        environ["body"] = environ["wsgi.input"].read()
        seen.append(environ)
        start_response("200 OK", [("Content-Length", "0")])
        return []

    return app


def comparable(environ: dict[str, Any]) -> dict[str, Any]:
    keys = [k for k in environ if k.startswith("HTTP_")] + [*ENVIRON_KEYS, "body"]
    return {key: environ.get(key) for key in keys}


@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid_request_is_refused_like_gunicorn(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = expectation(path)
    seen: list[dict[str, Any]] = []
    raw = exchange(recording_app(seen), request_bytes(path), http_config(expected["cfg"]))
    assert seen == []
    assert [r["status"] for r in responses(raw)] == [gunicorn_status(expected["request"])]
    assert b"Connection: close" in raw
    assert no_error_logged(caplog)


@pytest.mark.parametrize("path", cases("valid"))
def test_valid_request_gives_the_environ_gunicorn_gives(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = expectation(path)["cfg"]
    data = request_bytes(path)
    seen: list[dict[str, Any]] = []
    raw = exchange(recording_app(seen), data, http_config(cfg))
    assert no_error_logged(caplog)
    if path.stem in STRICTER or path.stem in TRUNCATED:
        assert seen == []
        assert raw.startswith(b"HTTP/1.1 400 ")
        return
    try:
        expected = gunicorn_environs(data, cfg)
    except Exception as exc:  # gunicorn 27 refuses a few requests its corpus calls valid
        assert seen == []
        assert [r["status"] for r in responses(raw)] == [gunicorn_status(type(exc))]
        return
    assert [comparable(e) for e in seen] == [comparable(e) for e in expected]
    assert all(r["status"] == 200 for r in responses(raw))


@pytest.mark.parametrize("path", cases("valid"))
def test_valid_request_read_a_few_bytes_at_a_time_gives_the_same_environ(path: Path) -> None:
    cfg = expectation(path)["cfg"]
    data = request_bytes(path)
    whole: list[dict[str, Any]] = []
    trickled: list[dict[str, Any]] = []
    raw = exchange(recording_app(whole), data, http_config(cfg))
    raw_trickled = exchange(recording_app(trickled), data, http_config(cfg), trickle=True)
    assert [comparable(e) for e in trickled] == [comparable(e) for e in whole]
    assert [r["status"] for r in responses(raw_trickled)] == [r["status"] for r in responses(raw)]


@pytest.mark.parametrize("path", cases("invalid"))
def test_invalid_request_read_a_few_bytes_at_a_time_is_refused(path: Path) -> None:
    expected = expectation(path)
    seen: list[dict[str, Any]] = []
    raw = exchange(
        recording_app(seen), request_bytes(path), http_config(expected["cfg"]), trickle=True
    )
    assert seen == []
    assert [r["status"] for r in responses(raw)] == [gunicorn_status(expected["request"])]


def test_the_corpus_is_complete() -> None:
    assert len(cases("invalid")) >= 63
    assert len(list((CORPUS / "invalid").glob("*.http"))) == 74
    assert len(list((CORPUS / "valid").glob("*.http"))) == 63
