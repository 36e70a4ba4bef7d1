"""`microsvc.observe.jsonlog`: gunicorn's logger writing one JSON object per line.

The logger class is driven directly with a gunicorn Config and fake responses and environs,
as gunicorn's workers call it; its output goes to files under tmp_path.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from microsvc._gunicorn import Config
from microsvc.observe.jsonlog import (
    ACCESS_FIELDS,
    MAX_HEADER_LENGTH,
    MAX_LINE_LENGTH,
    MAX_REQUEST_ID_LENGTH,
    JsonFormatter,
    JsonLogger,
)
from microsvc.serving.launcher import JSON_LOGGER

TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
BASE_KEYS = ["timestamp", "level", "logger", "pid", "message"]
GUNICORN_LOGGERS = ("gunicorn.error", "gunicorn.access")

MakeLogger = Callable[..., JsonLogger]


@pytest.fixture
def make_logger(tmp_path: Path) -> Iterator[MakeLogger]:
    """`make_logger(**gunicorn_settings)`: a JsonLogger writing its access log to
    tmp_path/access.log and its error log to tmp_path/error.log unless told otherwise.
    gunicorn's loggers are global: their handlers, level and propagation are restored."""
    saved = {}
    for name in GUNICORN_LOGGERS:
        log = logging.getLogger(name)
        saved[name] = (list(log.handlers), log.propagate, log.level)

    def make(**settings: Any) -> JsonLogger:
        cfg = Config()
        settings.setdefault("accesslog", str(tmp_path / "access.log"))
        settings.setdefault("errorlog", str(tmp_path / "error.log"))
        for name, value in settings.items():
            cfg.set(name, value)
        return JsonLogger(cfg)

    yield make

    for name in GUNICORN_LOGGERS:
        log = logging.getLogger(name)
        handlers, propagate, level = saved[name]
        for handler in list(log.handlers):
            if handler not in handlers:
                log.removeHandler(handler)
                handler.close()
        log.propagate = propagate
        log.setLevel(level)


def read_entries(path: Path) -> list[dict[str, Any]]:
    """Every line of the file as a JSON object; each line is ASCII and ends with \\n."""
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), repr(text)
    entries = []
    for line in text.splitlines():
        assert line.isascii(), line
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def wsgi(text: str) -> str:
    """Text as a WSGI environ holds it: UTF-8 bytes decoded as latin-1."""
    return text.encode("utf-8").decode("latin-1")


def make_environ(**overrides: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/data",
        "QUERY_STRING": "",
        "RAW_URI": "/data",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "192.0.2.10",
        "REMOTE_PORT": "40000",
        "HTTP_USER_AGENT": "tests/1.0",
    }
    environ.update(overrides)
    return environ


def make_response(status: Any = "200 OK", sent: Any = 36, headers: Any = None) -> SimpleNamespace:
    return SimpleNamespace(
        status=status, sent=sent, headers=headers or [("Content-Type", "application/json")]
    )


def log_access(
    logger: JsonLogger,
    environ: dict[str, Any] | None = None,
    resp: Any = None,
    request_time: Any = timedelta(microseconds=1500),
) -> None:
    logger.access(resp or make_response(), None, environ or make_environ(), request_time)


def one_access_entry(tmp_path: Path) -> dict[str, Any]:
    entries = read_entries(tmp_path / "access.log")
    assert len(entries) == 1, entries
    return entries[0]


# access entries


def test_access_entry_has_every_field_in_a_stable_order(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    logger = make_logger()
    log_access(
        logger,
        make_environ(
            PATH_INFO="/io",
            QUERY_STRING="ms=5&x=%20",
            RAW_URI="/io?ms=5&x=%20",
            HTTP_X_REQUEST_ID="req-42",
            HTTP_REFERER="https://example.com/page",
        ),
        make_response("201 Created", sent=17),
        timedelta(seconds=1, microseconds=234567),
    )
    entry = one_access_entry(tmp_path)
    assert list(entry) == [*BASE_KEYS, *ACCESS_FIELDS]
    assert TIMESTAMP_RE.fullmatch(entry["timestamp"]), entry
    assert entry["level"] == "info"
    assert entry["logger"] == "gunicorn.access"
    assert isinstance(entry["pid"], int)
    assert entry["message"] == "GET /io?ms=5&x=%20 201"
    assert entry["method"] == "GET"
    assert entry["path"] == "/io"
    assert entry["query"] == "ms=5&x=%20"
    assert entry["status"] == 201
    assert entry["duration"] == 1.234567
    assert entry["bytes"] == 17
    assert entry["client"] == "192.0.2.10"
    assert entry["request_id"] == "req-42"
    assert entry["protocol"] == "HTTP/1.1"
    assert entry["user_agent"] == "tests/1.0"
    assert entry["referer"] == "https://example.com/page"


def test_absent_values_are_null_and_keys_stay(make_logger: MakeLogger, tmp_path: Path) -> None:
    logger = make_logger()
    environ = make_environ()
    del environ["HTTP_USER_AGENT"]
    log_access(logger, environ)
    entry = one_access_entry(tmp_path)
    assert list(entry) == [*BASE_KEYS, *ACCESS_FIELDS]
    assert entry["query"] is None
    assert entry["request_id"] is None
    assert entry["user_agent"] is None
    assert entry["referer"] is None
    assert entry["queue_time"] is None
    assert entry["shed"] is False
    assert entry["message"] == "GET /data 200"


def test_access_entry_has_queue_time_and_shed(make_logger: MakeLogger, tmp_path: Path) -> None:
    logger = make_logger()
    environ = make_environ(**{"microsvc.queue_time": 1.23456789, "microsvc.shed": True})
    log_access(logger, environ, make_response("503 Service Unavailable"))
    entry = one_access_entry(tmp_path)
    assert entry["queue_time"] == 1.234568
    assert entry["shed"] is True
    assert entry["status"] == 503


def test_timestamp_is_utc_and_now(make_logger: MakeLogger, tmp_path: Path) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    log_access(make_logger())
    after = datetime.now(timezone.utc) + timedelta(seconds=1)
    stamp = one_access_entry(tmp_path)["timestamp"]
    parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert before <= parsed <= after


def test_the_client_is_remote_addr_as_the_middleware_left_it(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    log_access(
        make_logger(),
        make_environ(REMOTE_ADDR="203.0.113.7", **{"microsvc.proxy_addr": "127.0.0.1"}),
    )
    assert one_access_entry(tmp_path)["client"] == "203.0.113.7"


def test_script_name_is_part_of_the_path(make_logger: MakeLogger, tmp_path: Path) -> None:
    log_access(make_logger(), make_environ(SCRIPT_NAME="/api", PATH_INFO="/items"))
    assert one_access_entry(tmp_path)["path"] == "/api/items"


def test_quotes_newlines_and_non_ascii_are_escaped_on_one_line(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    log_access(
        make_logger(),
        make_environ(
            PATH_INFO=wsgi('/caf\u00e9/"quoted"/a\nb\r\tc\x00'),
            QUERY_STRING=wsgi("q=\u65e5\u672c"),
            HTTP_USER_AGENT=wsgi('agent "with quotes" \\ and \u00fc\u2028'),
            HTTP_REFERER=wsgi("https://example.com/\u00e9"),
            HTTP_X_REQUEST_ID=wsgi('id"\u00e9'),
        ),
    )
    text = (tmp_path / "access.log").read_text()
    assert text.count("\n") == 1, text
    entry = one_access_entry(tmp_path)
    assert entry["path"] == '/caf\u00e9/"quoted"/a\nb\r\tc\x00'
    assert entry["query"] == "q=\u65e5\u672c"
    assert entry["user_agent"] == 'agent "with quotes" \\ and \u00fc\u2028'
    assert entry["referer"] == "https://example.com/\u00e9"
    assert entry["request_id"] == 'id"\u00e9'


def test_bytes_that_are_not_utf8_stay_visible(make_logger: MakeLogger, tmp_path: Path) -> None:
    log_access(make_logger(), make_environ(PATH_INFO="/\xff\xfe"))
    assert one_access_entry(tmp_path)["path"] == "/\\xff\\xfe"


def test_request_id_is_cut_to_its_limit(make_logger: MakeLogger, tmp_path: Path) -> None:
    log_access(make_logger(), make_environ(HTTP_X_REQUEST_ID="r" * 5000))
    assert one_access_entry(tmp_path)["request_id"] == "r" * MAX_REQUEST_ID_LENGTH


def test_user_agent_and_referer_are_cut_to_their_limit(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    log_access(make_logger(), make_environ(HTTP_USER_AGENT="u" * 9000, HTTP_REFERER="f" * 9000))
    entry = one_access_entry(tmp_path)
    assert entry["user_agent"] == "u" * MAX_HEADER_LENGTH
    assert entry["referer"] == "f" * MAX_HEADER_LENGTH


def test_request_id_the_app_answered_with_is_used_when_the_request_has_none(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    resp = make_response(headers=[("Content-Type", "text/plain"), ("X-Request-Id", "gen-1")])
    log_access(make_logger(), resp=resp)
    assert one_access_entry(tmp_path)["request_id"] == "gen-1"


def test_request_id_of_the_request_wins_over_the_response(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    resp = make_response(headers=[("X-Request-ID", "from-app")])
    log_access(make_logger(), make_environ(HTTP_X_REQUEST_ID="from-client"), resp)
    assert one_access_entry(tmp_path)["request_id"] == "from-client"


def test_error_response_environ_without_path_info_uses_the_raw_uri(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    """gunicorn's handle_error (400, 414, 431...) builds an environ without PATH_INFO."""
    environ = make_environ(RAW_URI="/bad%20path%C3%A9?x=1", QUERY_STRING="x=1")
    del environ["PATH_INFO"], environ["SCRIPT_NAME"], environ["HTTP_USER_AGENT"]
    req = SimpleNamespace(
        headers=[("HOST", "x"), ("USER-AGENT", "curl/8"), ("X-REQUEST-ID", wsgi("rid-\u00e9"))]
    )
    make_logger().access(make_response("400 Bad Request", sent=0), req, environ, timedelta(0))
    entry = one_access_entry(tmp_path)
    assert entry["path"] == "/bad path\u00e9"
    assert entry["query"] == "x=1"
    assert entry["status"] == 400
    assert entry["bytes"] == 0
    assert entry["user_agent"] == "curl/8"
    assert entry["request_id"] == "rid-\u00e9"
    assert entry["referer"] is None


def test_request_headers_are_not_read_when_the_environ_has_them(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    req = SimpleNamespace(headers=[("USER-AGENT", "from-req"), ("REFERER", "from-req")])
    make_logger().access(make_response(), req, make_environ(), timedelta(0))
    entry = one_access_entry(tmp_path)
    assert entry["user_agent"] == "tests/1.0"
    assert entry["referer"] is None


def test_gevent_pywsgi_style_response_and_request(make_logger: MakeLogger, tmp_path: Path) -> None:
    """gunicorn's gevent_pywsgi worker passes headers as a dict or list, `sent` may be None
    and the request as a list of header pairs."""
    resp = SimpleNamespace(status="204 No Content", sent=None, headers={"X-Request-ID": "pw"})
    make_logger().access(resp, [("Host", "x")], make_environ(), timedelta(milliseconds=3))
    entry = one_access_entry(tmp_path)
    assert entry["status"] == 204
    assert entry["bytes"] is None
    assert entry["request_id"] == "pw"
    assert entry["duration"] == 0.003


@pytest.mark.parametrize(
    ("status", "expected"),
    [("404 Not Found", 404), (b"503 Service Unavailable", 503), (500, 500), (None, None)],
)
def test_status_is_an_int(
    make_logger: MakeLogger, tmp_path: Path, status: str | bytes | int | None, expected: int | None
) -> None:
    log_access(make_logger(), resp=make_response(status))
    entry = one_access_entry(tmp_path)
    assert entry["status"] == expected
    assert entry["message"] == f"GET /data {'-' if expected is None else expected}"


def test_access_log_format_is_ignored(make_logger: MakeLogger, tmp_path: Path) -> None:
    log_access(make_logger(access_log_format='%(h)s CUSTOM "%(r)s"'))
    assert "CUSTOM" not in (tmp_path / "access.log").read_text()
    assert one_access_entry(tmp_path)["path"] == "/data"


def test_no_access_log_writes_nothing(make_logger: MakeLogger, tmp_path: Path) -> None:
    logger = make_logger(accesslog=None)
    log_access(logger)
    assert not (tmp_path / "access.log").exists()
    assert read_entries(tmp_path / "error.log") == []


def test_a_broken_access_call_never_raises_and_is_logged_as_an_error(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    logger = make_logger()
    logger.access(make_response(), None, None, timedelta(0))  # type: ignore[arg-type]
    assert read_entries(tmp_path / "access.log") == []
    (entry,) = read_entries(tmp_path / "error.log")
    assert entry["level"] == "error"
    assert "access log" in entry["message"]
    assert "Traceback" in entry["exc_info"] and "NoneType" in entry["exc_info"]


# error entries


def test_error_entry_fields(make_logger: MakeLogger, tmp_path: Path) -> None:
    logger = make_logger()
    logger.info("Booting worker with pid: %s", 1234)
    (entry,) = read_entries(tmp_path / "error.log")
    assert list(entry) == BASE_KEYS
    assert TIMESTAMP_RE.fullmatch(entry["timestamp"]), entry
    assert entry["level"] == "info"
    assert entry["logger"] == "gunicorn.error"
    assert entry["message"] == "Booting worker with pid: 1234"
    assert isinstance(entry["pid"], int)


def test_every_level_method_writes_its_level(make_logger: MakeLogger, tmp_path: Path) -> None:
    logger = make_logger(loglevel="debug")
    logger.debug("d")
    logger.info("i")
    logger.warning("w")
    logger.error("e")
    logger.critical("c")
    logger.log("warning", "by name")
    levels = [(e["level"], e["message"]) for e in read_entries(tmp_path / "error.log")]
    assert levels == [
        ("debug", "d"),
        ("info", "i"),
        ("warning", "w"),
        ("error", "e"),
        ("critical", "c"),
        ("warning", "by name"),
    ]


def test_exception_goes_on_one_line_in_exc_info(make_logger: MakeLogger, tmp_path: Path) -> None:
    logger = make_logger()
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logger.exception("Error handling request %s", "/boom")
    text = (tmp_path / "error.log").read_text()
    assert text.count("\n") == 1, text
    (entry,) = read_entries(tmp_path / "error.log")
    assert entry["level"] == "error"
    assert entry["message"] == "Error handling request /boom"
    assert entry["exc_info"].startswith("Traceback (most recent call last):")
    assert "ZeroDivisionError: division by zero" in entry["exc_info"]
    assert "\n" in entry["exc_info"]


def test_multi_line_message_stays_on_one_line(make_logger: MakeLogger, tmp_path: Path) -> None:
    make_logger().error("first\nsecond\r\nthird \u00e9")
    text = (tmp_path / "error.log").read_text()
    assert text.count("\n") == 1, text
    (entry,) = read_entries(tmp_path / "error.log")
    assert entry["message"] == "first\nsecond\r\nthird \u00e9"


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("debug", ["debug", "info", "warning", "error"]),
        ("info", ["info", "warning", "error"]),
        ("warning", ["warning", "error"]),
        ("error", ["error"]),
        ("critical", []),
    ],
)
def test_log_level_filters_error_entries(
    make_logger: MakeLogger, tmp_path: Path, level: str, expected: list[str]
) -> None:
    logger = make_logger(loglevel=level)
    for name in ("debug", "info", "warning", "error"):
        getattr(logger, name)(name)
    assert [e["level"] for e in read_entries(tmp_path / "error.log")] == expected


def test_log_level_does_not_filter_access_entries(make_logger: MakeLogger, tmp_path: Path) -> None:
    log_access(make_logger(loglevel="error"))
    assert one_access_entry(tmp_path)["status"] == 200


def test_bad_format_arguments_still_give_one_entry(make_logger: MakeLogger, tmp_path: Path) -> None:
    make_logger().error("%d requests", "not a number")
    (entry,) = read_entries(tmp_path / "error.log")
    assert "%d requests" in entry["message"]
    assert "not a number" in entry["message"]


def test_extra_attributes_are_written_and_never_break_the_line(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    logger = make_logger()
    logger.info("with extras", extra={"user": "u1", "count": 3, "odd": {(1, 2): object()}})
    (entry,) = read_entries(tmp_path / "error.log")
    assert entry["user"] == "u1"
    assert entry["count"] == 3
    assert isinstance(entry["odd"], str)


def test_extra_attributes_do_not_replace_the_base_fields(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    make_logger().info("real", extra={"timestamp": "fake", "pid": "fake", "level": "fake"})
    (entry,) = read_entries(tmp_path / "error.log")
    assert entry["pid"] != "fake" and entry["level"] == "info"
    assert TIMESTAMP_RE.fullmatch(entry["timestamp"])


# gunicorn features kept


def test_setup_again_on_reload_does_not_duplicate_lines(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    logger = make_logger()
    logger.setup(logger.cfg)
    logger.setup(logger.cfg)
    logger.info("once")
    log_access(logger)
    assert len(read_entries(tmp_path / "error.log")) == 1
    assert len(read_entries(tmp_path / "access.log")) == 1


def test_reopen_files_writes_json_to_the_new_files(make_logger: MakeLogger, tmp_path: Path) -> None:
    """What USR1 does after a log rotation moved the files away."""
    logger = make_logger()
    log_access(logger)
    logger.info("before")
    (tmp_path / "access.log").rename(tmp_path / "access.log.1")
    (tmp_path / "error.log").rename(tmp_path / "error.log.1")
    logger.reopen_files()
    log_access(logger, make_environ(PATH_INFO="/after"))
    logger.info("after")
    assert [e["path"] for e in read_entries(tmp_path / "access.log.1")] == ["/data"]
    assert [e["path"] for e in read_entries(tmp_path / "access.log")] == ["/after"]
    assert [e["message"] for e in read_entries(tmp_path / "error.log.1")] == ["before"]
    assert [e["message"] for e in read_entries(tmp_path / "error.log")] == ["after"]


def test_stdout_and_stderr(make_logger: MakeLogger, capsys: pytest.CaptureFixture[str]) -> None:
    logger = make_logger(accesslog="-", errorlog="-")
    logger.info("to stderr")
    log_access(logger)
    out, err = capsys.readouterr()
    (access,) = [json.loads(line) for line in out.splitlines()]
    (error,) = [json.loads(line) for line in err.splitlines()]
    assert access["logger"] == "gunicorn.access" and access["path"] == "/data"
    assert error["logger"] == "gunicorn.error" and error["message"] == "to stderr"


def test_syslog_gets_tagged_json(make_logger: MakeLogger) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        receiver.settimeout(10)
        port = receiver.getsockname()[1]
        logger = make_logger(
            syslog=True, syslog_addr=f"udp://127.0.0.1:{port}", proc_name="microsvc"
        )
        logger.warning("to syslog")
        log_access(logger)
        datagrams = [receiver.recv(65536).decode() for _ in range(2)]
    error, access = sorted(datagrams, key=lambda d: ".access:" in d)
    assert "gunicorn.microsvc.error: {" in error, error
    assert "gunicorn.microsvc.access: {" in access, access
    error_entry = json.loads(error[error.index("{") :].rstrip("\x00"))
    access_entry = json.loads(access[access.index("{") :].rstrip("\x00"))
    assert error_entry["message"] == "to syslog" and error_entry["level"] == "warning"
    assert access_entry["path"] == "/data" and access_entry["status"] == 200


def test_logconfig_dict_can_use_the_formatter(make_logger: MakeLogger, tmp_path: Path) -> None:
    """A logging configuration of one's own replaces gunicorn's handlers and can name
    JsonFormatter."""
    path = tmp_path / "custom.log"
    logconfig = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "microsvc.observe.jsonlog.JsonFormatter"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(path), "formatter": "json"}
        },
        "root": {"level": "WARNING", "handlers": []},
        "loggers": {
            name: {"level": "INFO", "handlers": ["file"], "propagate": False}
            for name in GUNICORN_LOGGERS
        },
    }
    logger = make_logger(logconfig_dict=logconfig)
    try:
        logger.info("configured")
        log_access(logger)
        entries = read_entries(path)
    finally:
        for name in GUNICORN_LOGGERS:
            for handler in logging.getLogger(name).handlers:
                handler.close()
    assert [e["logger"] for e in entries] == list(GUNICORN_LOGGERS)
    assert entries[0]["message"] == "configured"
    assert entries[1]["path"] == "/data"


def test_the_launcher_setting_loads_this_class() -> None:
    cfg = Config()
    cfg.set("logger_class", JSON_LOGGER)
    assert cfg.logger_class is JsonLogger


# the formatter on its own


def test_formatter_timestamp() -> None:
    formatter = JsonFormatter()
    assert formatter.timestamp(0.123) == "1970-01-01T00:00:00.123Z"
    assert formatter.timestamp(1795514400.9999) == "2026-11-24T10:00:00.999Z"
    assert formatter.timestamp(1795514401.0) == "2026-11-24T10:00:01.000Z"


def test_formatter_for_an_app_logger() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.jsonlog.app")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            log.exception("request failed", extra={"order": 7})
        log.warning("stack", stack_info=True)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    failed, stack = (json.loads(line) for line in lines)
    assert failed["logger"] == "tests.jsonlog.app"
    assert failed["message"] == "request failed"
    assert "RuntimeError: boom\nsecond line" in failed["exc_info"]
    assert failed["order"] == 7
    assert stack["stack_info"].startswith("Stack (most recent call last):")


# line length

DOCKER_LINE = 16 * 1024  # Docker splits longer lines into several log entries
NON_BMP = "\U0001f600"  # 4 bytes of UTF-8 in the request, 12 escaped in JSON: \ud83d\ude00
#: Characters by how much JSON writes for each: a surrogate pair, \u00ff, a control char.
EXPANDING = [NON_BMP, "\u00ff", "\x01", '"']


def read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="ascii")
    assert text.endswith("\n"), text[-200:]
    return text.splitlines()


def assert_fits(line: str) -> dict[str, Any]:
    assert len(line.encode()) <= MAX_LINE_LENGTH < DOCKER_LINE
    entry = json.loads(line)
    assert isinstance(entry, dict)
    return entry


def hostile_environ(char: str) -> dict[str, Any]:
    """Every field at what gunicorn lets through, made of `char`."""
    line = 4094  # --limit-request-line
    field = 8190  # --limit-request-field-size
    utf8 = len(char.encode())
    return make_environ(
        REQUEST_METHOD="G" * 20,
        PATH_INFO="/" + wsgi(char * (line // 2 // utf8)),
        QUERY_STRING=wsgi(char * (line // 2 // utf8)),
        RAW_URI="/x",
        SERVER_PROTOCOL="HTTP/1.1",
        HTTP_USER_AGENT=wsgi(char * (field // utf8)),
        HTTP_REFERER=wsgi(char * (field // utf8)),
        HTTP_X_REQUEST_ID=wsgi(char * (field // utf8)),
    )


@pytest.mark.parametrize("char", EXPANDING)
def test_hostile_access_entries_stay_under_docker_s_line_length(
    make_logger: MakeLogger, tmp_path: Path, char: str
) -> None:
    log_access(make_logger(), hostile_environ(char))
    (line,) = read_lines(tmp_path / "access.log")
    entry = assert_fits(line)
    assert list(entry)[: len(BASE_KEYS) + len(ACCESS_FIELDS)] == [*BASE_KEYS, *ACCESS_FIELDS]
    # the longest values are cut, each to a start of what it was, and named
    assert entry["truncated"], entry
    assert set(entry["truncated"]) <= {"message", "path", "query", "user_agent", "referer"}
    for key in ("user_agent", "referer"):
        assert entry[key] and (char * MAX_HEADER_LENGTH).startswith(entry[key]), key
    assert entry["request_id"] == char * MAX_REQUEST_ID_LENGTH  # short enough to stay whole
    assert (entry["method"], entry["status"], entry["bytes"]) == ("G" * 20, 200, 36)
    # cut fairly: no field left with nothing while another kept much more
    kept = [len(json.dumps(entry[key])) for key in entry["truncated"]]
    assert min(kept) > 1000 and max(kept) - min(kept) <= 12, kept


def test_a_request_line_of_percent_ff_and_obs_text_headers(
    make_logger: MakeLogger, tmp_path: Path
) -> None:
    # %ff decodes to a byte that is not UTF-8 (written as \xff, 5 characters in JSON), and
    # obs-text header bytes 0x80-0xff are kept as latin-1 by gunicorn
    environ = make_environ(
        PATH_INFO="/" + "\xff" * 1360,
        QUERY_STRING="",
        RAW_URI="/" + "%ff" * 1360,
        HTTP_USER_AGENT=bytes(range(0x80, 0x100)).decode("latin-1") * 32,
        HTTP_REFERER="\xc3\xbf" * 4000,  # UTF-8 of \u00ff: 6 characters each in JSON
    )
    log_access(make_logger(), environ)
    (line,) = read_lines(tmp_path / "access.log")
    entry = assert_fits(line)
    assert entry["path"].startswith("/\\xff\\xff")
    # too long for the line: cut, to a prefix of its escaped text
    assert "path" in entry["truncated"], entry["truncated"]
    assert ("/" + "\\xff" * 1360).startswith(entry["path"])


def test_an_entry_that_fits_is_not_changed(make_logger: MakeLogger, tmp_path: Path) -> None:
    log_access(make_logger(), make_environ(HTTP_USER_AGENT="u" * 9000, HTTP_REFERER="f" * 9000))
    (line,) = read_lines(tmp_path / "access.log")
    entry = json.loads(line)
    assert "truncated" not in entry
    assert entry["user_agent"] == "u" * MAX_HEADER_LENGTH


def record(message: str = "m", **attrs: Any) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "tests.jsonlog", "levelname": "ERROR", "msg": message})
    rec.__dict__.update(attrs)
    return rec


@pytest.mark.parametrize("extra", [0, 1, 2, 3])
def test_the_limit_is_exact(extra: int) -> None:
    formatter = JsonFormatter()
    empty = formatter.format(record(""))
    fill = MAX_LINE_LENGTH - len(empty) - 1 + extra  # "x" * fill: a line of limit - 1 + extra
    line = formatter.format(record("x" * fill))
    assert len(line) <= MAX_LINE_LENGTH
    entry = json.loads(line)
    if extra <= 1:
        assert entry["message"] == "x" * fill and "truncated" not in entry
    else:
        assert entry["truncated"] == ["message"] and "x" * fill != entry["message"]
        assert len(line) >= MAX_LINE_LENGTH - 100  # little room is lost


def test_a_long_traceback_keeps_its_end(make_logger: MakeLogger, tmp_path: Path) -> None:
    logger = make_logger()
    try:
        raise RuntimeError("the innermost error " + "\u00ff\x01" * 3000 + " END")
    except RuntimeError:
        logger.exception("Error handling request %s", "/" + "\u00ff" * 5000)
    (line,) = read_lines(tmp_path / "error.log")
    entry = assert_fits(line)
    assert entry["truncated"] == ["message", "exc_info"]
    assert entry["message"].startswith("Error handling request /\u00ff")
    assert entry["exc_info"].endswith("\u00ff\x01 END")
    assert not entry["exc_info"].startswith("Traceback")


def test_long_extras_and_stack_info_are_cut() -> None:
    formatter = JsonFormatter()
    rec = record(
        "m",
        stack_info="Stack (most recent call last):\n" + "  frame\n" * 5000 + "the end",
        payload={"rows": ["\x02" * 100] * 100},
        note="\u00ff" * 5000,
        count=7,
    )
    entry = assert_fits(formatter.format(rec))
    assert entry["truncated"] == ["stack_info", "payload", "note"]
    assert entry["stack_info"].endswith("the end")
    assert isinstance(entry["payload"], str) and entry["payload"].startswith('{"rows": ["\\u0002')
    assert entry["note"].startswith("\u00ff") and entry["count"] == 7


def test_too_many_extras_keep_the_base_fields() -> None:
    formatter = JsonFormatter()
    extras = {f"field_{index:05d}_{'k' * 30}": index for index in range(2000)}
    entry = assert_fits(formatter.format(record("\u00ff" * 9000, **extras)))
    assert list(entry) == [*BASE_KEYS, "truncated", "dropped"]
    assert entry["dropped"] == 2000 and entry["truncated"] == ["message"]
    assert entry["message"].startswith("\u00ff" * 1000)


def test_the_syslog_prefix_counts() -> None:
    formatter = JsonFormatter(prefix="gunicorn.microsvc.access: ")
    line = formatter.format(record("\u00ff" * 9000))
    assert line.startswith("gunicorn.microsvc.access: {")
    assert len(line) <= MAX_LINE_LENGTH
    assert json.loads(line[line.index("{") :])["truncated"] == ["message"]


def test_max_length() -> None:
    assert len(JsonFormatter(max_length=2000).format(record("x" * 5000))) <= 2000
    assert len(JsonFormatter(max_length=None).format(record("x" * 50000))) > 50000
    with pytest.raises(ValueError, match="max_length"):
        JsonFormatter(max_length=100)


def test_timestamp_and_level_are_never_cut() -> None:
    formatter = JsonFormatter(max_length=1100)
    rec = record("\u00ff" * 900, big=10**3000, note="x" * 900)
    rec.name = "n" * 900
    entry = assert_fits(formatter.format(rec))
    assert TIMESTAMP_RE.fullmatch(entry["timestamp"]) and entry["level"] == "error"
    assert entry["truncated"] == ["logger", "message", "big", "note"]
    assert entry["big"].startswith("1000") and isinstance(entry["pid"], int)
