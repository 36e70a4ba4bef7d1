"""`--log-format json` on a real server: every line of its output is one JSON object, and the
access entries are the requests that were sent."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from microsvc.observe.jsonlog import ACCESS_FIELDS, MAX_REQUEST_ID_LENGTH

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

BASE_KEYS = ("timestamp", "level", "logger", "pid", "message")
TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LEVELS = {"debug", "info", "warning", "error", "critical"}
#: Every request a test sends carries this User-Agent prefix and its index, so its access
#: entry is told apart from the readiness polls of the `serve` fixture.
AGENT = "jsonlog-e2e/"
JSON_OPTIONS = ["--log-format", "json", "--workers", "1"]


@dataclass
class Sent:
    method: str
    target: str
    headers: dict[str, str | bytes] = field(default_factory=dict)
    path: str = ""
    query: str | None = None
    request_id: str | None = None
    client: str = "127.0.0.1"


#: What the tests send, and what its access entry must say (status and bytes come from
#: the response received).
REQUESTS = [
    Sent("GET", "/data", {"X-Request-ID": "req-data"}, "/data", request_id="req-data"),
    Sent("GET", "/health", path="/health"),
    Sent("GET", "/io?ms=5", {"X-Request-ID": "req-io"}, "/io", "ms=5", "req-io"),
    Sent("GET", "/healthz", path="/healthz"),
    Sent("GET", "/readyz", {"X-Request-ID": "req-ready"}, "/readyz", request_id="req-ready"),
    Sent("GET", "/missing", {"X-Request-ID": "req-404"}, "/missing", request_id="req-404"),
    Sent("POST", "/data", path="/data"),
    Sent(
        "GET",
        "/data?via=proxy",
        {"X-Forwarded-For": "203.0.113.7"},
        "/data",
        "via=proxy",
        client="203.0.113.7",
    ),
    Sent(
        "GET",
        "/caf%C3%A9",
        {"X-Request-ID": 'q"uote-\u00e9'.encode()},
        "/caf\u00e9",
        request_id='q"uote-\u00e9',
    ),
    Sent(
        "GET",
        "/data",
        {"X-Request-ID": "r" * 300},
        "/data",
        request_id="r" * MAX_REQUEST_ID_LENGTH,
    ),
]


def parse_lines(text: str, where: str = "the server's output") -> list[dict[str, Any]]:
    """Every line as a JSON object with the base keys; fails on the first line that is not."""
    assert text == "" or text.endswith("\n"), f"{where} does not end with a newline:\n{text}"
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            entry = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} of {where} is not JSON: {line!r}\n{text}")
        assert isinstance(entry, dict), line
        missing = [key for key in BASE_KEYS if key not in entry]
        assert not missing, f"line {number} of {where} lacks {missing}: {line}"
        assert TIMESTAMP_RE.fullmatch(entry["timestamp"]), line
        assert entry["level"] in LEVELS, line
        assert isinstance(entry["pid"], int), line
        assert isinstance(entry["message"], str), line
        entries.append(entry)
    return entries


def send_all(url: str) -> list[requests.Response]:
    responses = []
    for index, sent in enumerate(REQUESTS):
        headers: dict[str, str | bytes] = {"User-Agent": f"{AGENT}{index}", **sent.headers}
        responses.append(
            requests.request(sent.method, url + sent.target, headers=headers, timeout=10)
        )
    return responses


def marked(entries: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The access entries of the tests' own requests, by request index."""
    found: dict[int, list[dict[str, Any]]] = {}
    for entry in entries:
        agent = str(entry.get("user_agent"))
        if entry["logger"] == "gunicorn.access" and agent.startswith(AGENT):
            found.setdefault(int(agent[len(AGENT) :]), []).append(entry)
    return found


@pytest.mark.both_engines
@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_every_line_is_json_and_access_entries_match_the_requests(
    serve: ServeFactory, worker_class: str
) -> None:
    server = serve(["-k", worker_class, *JSON_OPTIONS, "--access-log", "-"])
    responses = send_all(server.url)
    assert server.stop() == 0, server.describe()

    assert [r.status_code for r in responses][5:7] == [404, 405]
    entries = parse_lines(server.log_text())
    access = marked(entries)
    assert sorted(access) == list(range(len(REQUESTS))), server.log_text()

    worker_pids = {
        int(m.group(1))
        for e in entries
        if (m := re.fullmatch(r"Booting worker with pid: (\d+)", e["message"]))
    }
    assert worker_pids, server.log_text()
    for index, (sent, response) in enumerate(zip(REQUESTS, responses, strict=True)):
        assert len(access[index]) == 1, access[index]
        entry = access[index][0]
        assert list(entry) == [*BASE_KEYS, *ACCESS_FIELDS], entry
        assert entry["level"] == "info", entry
        assert entry["method"] == sent.method, entry
        assert entry["path"] == sent.path, entry
        assert entry["query"] == sent.query, entry
        assert entry["status"] == response.status_code, entry
        assert entry["bytes"] == len(response.content), entry
        assert entry["request_id"] == sent.request_id, entry
        assert entry["client"] == sent.client, entry
        assert entry["protocol"] == "HTTP/1.1", entry
        assert entry["referer"] is None, entry
        assert isinstance(entry["duration"], float) and entry["duration"] >= 0, entry
        assert entry["pid"] in worker_pids, entry


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_master_and_microsvc_lines_are_json(serve: ServeFactory, worker_class: str) -> None:
    server = serve(["-k", worker_class, *JSON_OPTIONS])
    assert server.stop() == 0, server.describe()
    entries = parse_lines(server.log_text())
    messages = [e["message"] for e in entries if e["logger"] == "gunicorn.error"]
    assert any(re.match(r"microsvc \S+: 1 \w+ workers", m) for m in messages), messages
    assert any(m.startswith("Booting worker with pid: ") for m in messages), messages
    assert any(m.startswith("Listening at: ") for m in messages), messages
    assert not [e for e in entries if e["logger"] == "gunicorn.access"], "no --access-log"


def test_log_level_applies(serve: ServeFactory) -> None:
    server = serve([*JSON_OPTIONS, "--log-level", "warning", "--access-log", "-"])
    requests.get(server.url + "/data", headers={"User-Agent": f"{AGENT}0"}, timeout=10)
    assert server.stop() == 0, server.describe()
    entries = parse_lines(server.log_text())
    assert not [e for e in entries if e["logger"] == "gunicorn.error" and e["level"] == "info"]
    assert len(marked(entries)[0]) == 1


@pytest.mark.both_engines
@pytest.mark.server_tracebacks("the app raises; the JSON line carries the traceback")
def test_app_exceptions_and_bad_requests_stay_on_one_line(
    serve: ServeFactory, tmp_path: Path
) -> None:
    (tmp_path / "boomapp.py").write_text(
        "def app(environ, start_response):\n"
        "    if environ['PATH_INFO'] == '/boom':\n"
        "        raise RuntimeError('boom\\nsecond line')\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'ok']\n"
    )
    server = serve(["boomapp:app", *JSON_OPTIONS, "--access-log", "-"], cwd=tmp_path)
    boom = requests.get(server.url + "/boom", headers={"User-Agent": f"{AGENT}0"}, timeout=10)
    assert boom.status_code == 500
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
        client.sendall(b"NOT A REQUEST LINE\r\n\r\n")
        assert client.recv(4096).startswith(b"HTTP/1.1 400")
    assert server.stop() == 0, server.describe()

    entries = parse_lines(server.log_text())
    errors = [e for e in entries if "exc_info" in e]
    assert len(errors) == 1, entries
    assert errors[0]["level"] == "error" and "/boom" in errors[0]["message"], errors[0]
    assert errors[0]["exc_info"].startswith("Traceback (most recent call last):"), errors[0]
    assert "RuntimeError: boom\nsecond line" in errors[0]["exc_info"], errors[0]
    (boom_entry,) = marked(entries)[0]
    assert boom_entry["status"] == 500 and boom_entry["path"] == "/boom"
    assert any(
        e["level"] == "warning" and e["message"].startswith("Invalid request from ip=")
        for e in entries
    ), entries


def test_access_and_error_files_are_json_and_reopened_on_usr1(
    serve: ServeFactory, tmp_path: Path
) -> None:
    access, error = tmp_path / "access.log", tmp_path / "error.log"
    server = serve([*JSON_OPTIONS, "--access-log", str(access), "--set", f"errorlog={error}"])
    requests.get(server.url + "/data", headers={"User-Agent": f"{AGENT}0"}, timeout=10)
    # A request's access entry is written after its response is sent: rotate once it is.
    end = time.monotonic() + 30
    while not (access.exists() and 0 in marked(parse_lines(access.read_text(), str(access)))):
        if time.monotonic() > end:
            pytest.fail(f"request 0 never logged to {access}: {server.describe()}")
        time.sleep(0.05)
    access.rename(tmp_path / "access.log.1")
    error.rename(tmp_path / "error.log.1")
    server.proc.send_signal(signal.SIGUSR1)

    # Until every process has reopened its files, an entry may still go to the old file.
    index, end = 1, time.monotonic() + 30
    while not (access.exists() and marked(parse_lines(access.read_text(), str(access)))):
        if time.monotonic() > end:
            pytest.fail(f"nothing written to a new {access} after USR1: {server.describe()}")
        requests.get(server.url + "/data", headers={"User-Agent": f"{AGENT}{index}"}, timeout=10)
        index += 1
        time.sleep(0.2)
    assert server.stop() == 0, server.describe()

    files = {
        path.name: path for path in sorted(tmp_path.glob("*.log*")) if "server" not in path.name
    }
    assert set(files) == {"access.log", "access.log.1", "error.log", "error.log.1"}
    entries = {name: parse_lines(path.read_text(), name) for name, path in files.items()}
    sent_before = marked(entries["access.log.1"])
    sent_after = marked(entries["access.log"])
    assert 0 in sent_before and 0 not in sent_after
    assert sorted([*sent_before, *sent_after]) == list(range(index)), "each request once"
    assert all(
        e["logger"] == "gunicorn.access"
        for name in ("access.log", "access.log.1")
        for e in entries[name]
    )
    assert any(e["message"].startswith("microsvc ") for e in entries["error.log.1"])
    assert any(e["message"] == "Shutting down: Master" for e in entries["error.log"])
    assert all(
        e["logger"] == "gunicorn.error"
        for name in ("error.log", "error.log.1")
        for e in entries[name]
    )
    parse_lines(server.log_text())  # whatever reached stdout or stderr is JSON as well


def test_text_stays_the_default(serve: ServeFactory) -> None:
    server = serve(["--workers", "1", "--access-log", "-"])
    requests.get(server.url + "/data", headers={"User-Agent": f"{AGENT}0"}, timeout=10)
    assert server.stop() == 0, server.describe()
    log = server.log_text()
    assert not [line for line in log.splitlines() if line.startswith("{")], log
    (line,) = [line for line in log.splitlines() if AGENT in line]
    assert re.match(r'127\.0\.0\.1 - - \[[^]]+\] "GET /data HTTP/1\.1" 200 \d+ ', line), line
    assert re.search(r"\[INFO\] Booting worker with pid: \d+", log), log


def test_hostile_requests_give_access_lines_under_16_kib(
    serve: ServeFactory, tmp_path: Path
) -> None:
    # A 4 KiB request line of %ff (a byte that is not UTF-8: 5 characters of JSON each, in
    # the path and again in the message) and long obs-text headers (bytes 0x80-0xff; as
    # UTF-8 of U+1F600, 12 characters of JSON for 4 bytes) are valid HTTP for gunicorn.
    access = tmp_path / "access.log"
    server = serve([*JSON_OPTIONS, "--access-log", str(access)])
    target = "/" + "%ff" * 1300
    target += "?" + "%ff" * ((4094 - len(f"GET {target}? HTTP/1.1")) // 3)
    head = f"GET {target} HTTP/1.1\r\n".encode()
    assert len(head) <= 4096  # gunicorn's --limit-request-line 4094, CRLF not counted
    requests_sent = {
        "utf8": "\U0001f600".encode() * 2000,  # 8000 bytes
        "obs": bytes(range(0x80, 0x100)) * 31,  # 3968 bytes, not UTF-8
    }
    for name, value in requests_sent.items():
        raw = (
            head
            + b"Host: localhost\r\n"
            + b"User-Agent: "
            + value
            + b"\r\nReferer: "
            + value
            + b"\r\nX-Request-ID: "
            + value
            + b"\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as client:
            client.sendall(raw)
            reply = b""
            while chunk := client.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 404"), (name, reply[:200], server.describe())
    assert server.stop() == 0, server.describe()

    raw_lines = access.read_bytes().splitlines()
    hostile = [line for line in raw_lines if b"/\\\\xff" in line]
    assert len(hostile) == 2, (raw_lines, server.describe())
    for line in hostile:
        assert len(line) + 1 < 16 * 1024, len(line)  # the newline included
        entry = json.loads(line)
        assert list(entry)[: len(BASE_KEYS) + len(ACCESS_FIELDS)] == [*BASE_KEYS, *ACCESS_FIELDS]
        assert entry["status"] == 404 and entry["method"] == "GET", entry
        assert entry["path"].startswith("/\\xff\\xff"), entry["path"][:100]
        assert entry["truncated"], entry
        assert set(entry["truncated"]) <= {"message", "path", "query", "user_agent", "referer"}
