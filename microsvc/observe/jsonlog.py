"""`--log-format json`: gunicorn's access and error logs as one JSON object per line.

`JsonLogger` is a gunicorn logger class (gunicorn's `logger_class` setting). It keeps
everything gunicorn's own `Logger` does (handlers for stdout, stderr and files, reopening
files on USR1, syslog, `--log-level`, `logconfig*`) and only changes what a line looks
like: every record of the `gunicorn.error` and `gunicorn.access` loggers is written as a
single JSON object on a single line. Newlines, quotes and control characters inside values
are escaped by JSON, and non-ASCII text is written as `\\uXXXX` escapes, so a line is
plain ASCII whatever the encoding of the stream.

Error log entries: `timestamp`, `level`, `logger`, `pid`, `message`, plus `exc_info`
(the formatted traceback) when an exception is logged, `stack_info` when a stack is, and
any `extra={...}` attributes of the record.

Access log entries: `timestamp`, `level`, `logger`, `pid`, `message` (`GET /path?q 200`),
`method`, `path`, `query`, `status`, `duration` (seconds), `bytes`, `client`,
`request_id`, `protocol`, `user_agent`, `referer`, `queue_time` (seconds the request waited
before a worker took it up: see `microsvc.serving.middleware`), `shed` (true when it was
answered 503 for waiting longer than `--max-queue-time`); every key is always present,
null when the request did not have it. gunicorn's `access_log_format` is not used.

A line is at most `MAX_LINE_LENGTH` bytes (newline not counted; syslog tag included), so
that Docker and other collectors never split it. A longer entry has its longest values cut
until it fits: a string keeps its start (`exc_info` and `stack_info` keep their end, where
the innermost frames and the exception are), a value of another type becomes the cut JSON
text of it, and the entry gets a `truncated` key listing the names of the cut fields, in
the entry's order. If the keys alone cannot fit (thousands of `extra` attributes), only the
five base fields are kept, cut as needed, with `truncated` and `dropped` (how many fields
were left out).

`JsonFormatter` is the formatter behind it; a logging configuration of your own (for
your app's loggers, or gunicorn's `logconfig_dict`) can use it too:
`{"()": "microsvc.observe.jsonlog.JsonFormatter"}`.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from gunicorn.glogging import Logger

from microsvc.serving.middleware import QUEUE_TIME_KEY, SHED_KEY

__all__ = [
    "ACCESS_FIELDS",
    "MAX_HEADER_LENGTH",
    "MAX_LINE_LENGTH",
    "MAX_REQUEST_ID_LENGTH",
    "JsonFormatter",
    "JsonLogger",
    "access_fields",
]

#: The request ID header (`X-Request-ID`) is cut to this many characters.
MAX_REQUEST_ID_LENGTH = 200
#: `User-Agent` and `Referer` are cut to this many characters.
MAX_HEADER_LENGTH = 1024
#: The longest line a JsonFormatter writes, in bytes (lines are ASCII), its newline not
#: counted: under the 16 KiB at which Docker splits a log line.
MAX_LINE_LENGTH = 16_000
#: The key that lists the fields a line had to cut to stay within its length.
_TRUNCATED_KEY = "truncated"
#: With the fields a line had to leave out altogether: how many.
_DROPPED_KEY = "dropped"
#: The fields that always stay on a line.
_BASE_KEYS = ("timestamp", "level", "logger", "pid", "message")
#: Fields whose end is worth more than their start.
_KEEP_END = frozenset(("exc_info", "stack_info"))
#: Fields that are never cut (they are short).
_FIXED_KEYS = ("timestamp", "level")
#: Numbers up to this many characters are never cut.
_SHORT_NUMBER = 32
#: The shortest `max_length`: room for the base fields of any entry, cut.
_MIN_LINE_LENGTH = 1024

#: The keys `access_fields` returns, in order (the access entry adds `timestamp`,
#: `level`, `logger`, `pid` and `message` in front).
ACCESS_FIELDS = (
    "method",
    "path",
    "query",
    "status",
    "duration",
    "bytes",
    "client",
    "request_id",
    "protocol",
    "user_agent",
    "referer",
    "queue_time",
    "shed",
)

#: The record attribute that carries an access entry's fields.
ACCESS_ATTR = "microsvc_access"

#: Attributes every LogRecord has; the others came from `extra=` and are written out.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    ACCESS_ATTR,
}

_REQUEST_ID_HEADER = "x-request-id"
#: Request headers an access entry shows, by the environ key they have in WSGI.
_ENVIRON_KEYS = {
    _REQUEST_ID_HEADER: "HTTP_X_REQUEST_ID",
    "user-agent": "HTTP_USER_AGENT",
    "referer": "HTTP_REFERER",
}


class JsonFormatter(logging.Formatter):
    """Formats a log record as one line of JSON (see the module docstring).

    `prefix` goes in front of the JSON object (gunicorn's syslog tag). `max_length`: the
    longest line, prefix included, newline not; None for no limit.
    """

    def __init__(self, prefix: str = "", max_length: int | None = MAX_LINE_LENGTH) -> None:
        super().__init__()
        if max_length is not None and max_length < len(prefix) + _MIN_LINE_LENGTH:
            raise ValueError(
                f"max_length must be at least {_MIN_LINE_LENGTH} plus the prefix, not {max_length}"
            )
        self.prefix = prefix
        self.max_length = max_length
        # (whole second, its "YYYY-MM-DDTHH:MM:SS"): replaced whole, so threads can share it
        self._second: tuple[int, str] = (-1, "")

    def timestamp(self, created: float) -> str:
        """ISO 8601 in UTC with milliseconds: `2026-11-24T10:00:00.123Z`."""
        second = int(created)
        cached = self._second
        if cached[0] != second:
            cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
            self._second = cached
        millis = min(int((created - second) * 1000), 999)
        return f"{cached[1]}.{millis:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "timestamp": self.timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": _message(record),
        }
        access = getattr(record, ACCESS_ATTR, None)
        if isinstance(access, dict):
            data.update(access)
            return self._line(data, _dumps(data))
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
            data["exc_info"] = record.exc_text
        elif record.exc_text:
            data["exc_info"] = record.exc_text
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        extras = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _RECORD_ATTRS and key not in data and not key.startswith("_")
        }
        if not extras:
            return self._line(data, _dumps(data))
        data.update(extras)
        try:
            return self._line(data, _dumps(data))
        except (TypeError, ValueError):  # e.g. a dict with tuple keys, a cycle
            for key, value in extras.items():
                try:
                    _dumps(value)
                except (TypeError, ValueError):
                    data[key] = _repr(value)
            return self._line(data, _dumps(data))

    def _line(self, data: dict[str, Any], text: str) -> str:
        """The prefix and `text` (`data` as JSON), with `data` cut to fit if it is too long."""
        if self.max_length is not None and len(self.prefix) + len(text) > self.max_length:
            text = _fit(data, self.max_length - len(self.prefix))
        return self.prefix + text


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=True, default=str)


def _repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a broken __repr__, an int too long for str
        return f"<{type(value).__name__} object>"


def _fit(data: dict[str, Any], limit: int) -> str:
    """`data` as JSON in at most `limit` characters: its longest values cut (see the module
    docstring). Every value is serializable."""
    fields = {key: value for key, value in data.items() if key != _TRUNCATED_KEY}
    text = _cut_to_fit(fields, limit, {})
    if text is None:  # the keys alone are too long: the base fields, and how many others
        base = {key: fields[key] for key in _BASE_KEYS if key in fields}
        tail = {_DROPPED_KEY: len(fields) - len(base)}
        text = _cut_to_fit(base, limit, tail)
        if text is None:  # not with max_length's minimum; whatever happens, stay short
            text = _dumps({key: data.get(key) for key in _FIXED_KEYS} | tail)
    return text


def _cut_to_fit(data: dict[str, Any], limit: int, tail: dict[str, Any]) -> str | None:
    """`data` with its longest values cut to the same length, `truncated` naming them, then
    `tail`, as JSON in at most `limit` characters; None if even empty values do not fit."""
    sizes = {key: len(_dumps(value)) for key, value in data.items()}
    cuttable = [key for key, value in data.items() if _can_cut(key, value, sizes[key])]
    # What is not a cuttable value: braces, keys, separators, the other values; then room
    # to name every cut field.
    skeleton = {key: 0 if key in cuttable else value for key, value in data.items()}
    overhead = len(_dumps(skeleton | tail)) - len(cuttable)
    room = len(f', "{_TRUNCATED_KEY}": ') + len(_dumps(cuttable))
    cap = _level(sorted(sizes[key] for key in cuttable), limit - overhead - room)
    if cap is None:
        return None
    fitted = dict(data)
    cut = [key for key in cuttable if sizes[key] > cap]
    for key in cut:
        fitted[key] = _cut(data[key], cap, keep_end=key in _KEEP_END)
    text = _dumps(fitted | {_TRUNCATED_KEY: cut} | tail)
    return text if len(text) <= limit else None


def _can_cut(key: str, value: object, size: int) -> bool:
    """Whether a value may be cut: not the timestamp and level, not a short number."""
    if key in _FIXED_KEYS or value is None or isinstance(value, bool):
        return False
    return not (isinstance(value, (int, float)) and size <= _SHORT_NUMBER)


def _level(sizes: list[int], budget: int) -> int | None:
    """The largest size `cap` for which the `sizes` (ascending), each cut to at most `cap`,
    add up to no more than `budget`; None when not even empty values fit."""
    left = len(sizes)
    if budget < 2 * left:  # "" is two characters
        return None
    for size in sizes:
        if size * left > budget:
            return budget // left
        budget -= size
        left -= 1
    return budget + (sizes[-1] if sizes else 0)


def _cut(value: object, cap: int, *, keep_end: bool) -> str:
    """The longest start (or end) of `value` (a string, else its JSON text) whose JSON
    string takes at most `cap` characters."""
    text = value if isinstance(value, str) else _dumps(value)
    # Every character takes at least one: no more than cap - 2 can fit between the quotes.
    low, high = 0, min(len(text), max(cap - 2, 0))
    while low < high:
        middle = (low + high + 1) // 2
        part = text[len(text) - middle :] if keep_end else text[:middle]
        if len(_dumps(part)) <= cap:
            low = middle
        else:
            high = middle - 1
    return text[len(text) - low :] if keep_end else text[:low]


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad %-format or arguments: keep the line, say what happened
        return f"{record.msg!s} (unformatted, arguments {record.args!r})"


def _text(value: object, limit: int | None = None) -> str | None:
    """A WSGI string (bytes decoded as latin-1) as the text the client meant (UTF-8);
    None for a missing or empty value."""
    if not value:
        return None
    if not isinstance(value, str):
        value = str(value)
    elif not value.isascii():
        try:
            value = value.encode("latin-1").decode("utf-8")
        except UnicodeEncodeError:  # already text
            pass
        except UnicodeDecodeError:  # not UTF-8: keep the bytes visible
            value = value.encode("latin-1").decode("utf-8", "backslashreplace")
    return value if limit is None else value[:limit]


def _status(status: object) -> int | None:
    if isinstance(status, int):
        return status
    if isinstance(status, bytes):
        status = status.decode("latin-1")
    if isinstance(status, str):
        code = status.split(None, 1)[0] if status.strip() else ""
        if code.isdigit():
            return int(code)
    return None


def _path(environ: Mapping[str, Any]) -> str | None:
    path_info = environ.get("PATH_INFO")
    if isinstance(path_info, str):
        return _text(environ.get("SCRIPT_NAME", "") + path_info)
    # gunicorn's error responses (400, 414, ...) log an environ without PATH_INFO
    raw_uri = environ.get("RAW_URI")
    if not isinstance(raw_uri, str) or not raw_uri:
        return None
    raw_path = raw_uri.partition("?")[0].encode("latin-1", "replace")
    return _text(unquote_to_bytes(raw_path).decode("latin-1"))


def _headers(headers: object) -> Iterable[tuple[Any, Any]]:
    if isinstance(headers, Mapping):
        return headers.items()
    if isinstance(headers, (list, tuple)):
        return headers
    return ()


def _request_id(resp: Any, environ: Mapping[str, Any]) -> str | None:
    """The request's X-Request-ID, else the one the app answered with, else None."""
    value = environ.get("HTTP_X_REQUEST_ID")
    if not value:
        for name, header_value in _headers(getattr(resp, "headers", None)):
            if isinstance(name, str) and name.lower() == _REQUEST_ID_HEADER:
                value = header_value
                break
    return _text(value, MAX_REQUEST_ID_LENGTH)


def _duration(request_time: object) -> float | None:
    if isinstance(request_time, datetime.timedelta):
        return round(request_time.total_seconds(), 6)
    if isinstance(request_time, (int, float)):
        return round(float(request_time), 6)
    return None


def _with_request_headers(req: Any, environ: Mapping[str, Any]) -> Mapping[str, Any]:
    """gunicorn's error responses (400, 500 after an exception...) log an environ without
    the request headers (nor PATH_INFO): take the few the entry needs from the request."""
    if "PATH_INFO" in environ:
        return environ
    headers = getattr(req, "headers", req)
    found = dict(environ)
    for name, value in _headers(headers):
        key = _ENVIRON_KEYS.get(name.lower()) if isinstance(name, str) else None
        if key is not None and key not in found:
            found[key] = value
    return found


def access_fields(
    resp: Any, req: Any, environ: Mapping[str, Any], request_time: object
) -> dict[str, Any]:
    """The fields of one access log entry (`ACCESS_FIELDS`), from what gunicorn passes to
    `Logger.access`: the response, the request, the WSGI environ and the time the request
    took."""
    environ = _with_request_headers(req, environ)
    sent = getattr(resp, "sent", None)
    return {
        "method": _text(environ.get("REQUEST_METHOD")),
        "path": _path(environ),
        "query": _text(environ.get("QUERY_STRING")),
        "status": _status(getattr(resp, "status", None)),
        "duration": _duration(request_time),
        "bytes": sent if isinstance(sent, int) else None,
        # microsvc's middleware has put the client there for a trusted proxy
        "client": environ.get("REMOTE_ADDR") or None,
        "request_id": _request_id(resp, environ),
        "protocol": environ.get("SERVER_PROTOCOL") or None,
        "user_agent": _text(environ.get("HTTP_USER_AGENT"), MAX_HEADER_LENGTH),
        "referer": _text(environ.get("HTTP_REFERER"), MAX_HEADER_LENGTH),
        "queue_time": _queue_time(environ.get(QUEUE_TIME_KEY)),
        "shed": environ.get(SHED_KEY) is True,
    }


def _queue_time(value: object) -> float | None:
    return round(value, 6) if isinstance(value, float) else None


class JsonLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger, writing one JSON object per line (see the module docstring).

    Handlers, files, USR1 reopening, syslog and log levels are gunicorn's; only the
    formatters differ, and `access` writes structured fields instead of
    `access_log_format`.
    """

    def setup(self, cfg: Any) -> None:
        self.json_formatter = JsonFormatter()
        # gunicorn drops its handlers of a previous setup (a reload) without closing them;
        # close them, so that each reload does not leave a log file open
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                if getattr(handler, "_gunicorn", False):
                    log.removeHandler(handler)
                    handler.close()
        super().setup(cfg)

    def _set_handler(
        self, log: logging.Logger, output: str | None, fmt: Any, stream: Any = None
    ) -> None:
        super()._set_handler(log, output, self.json_formatter, stream)

    def _set_syslog_handler(self, log: logging.Logger, cfg: Any, fmt: str, name: str) -> None:
        super()._set_syslog_handler(log, cfg, fmt, name)
        handler = log.handlers[-1]  # the one just added
        if isinstance(handler, logging.handlers.SysLogHandler):
            tag = cfg.syslog_prefix or cfg.proc_name.replace(":", ".")
            handler.setFormatter(JsonFormatter(prefix=f"gunicorn.{tag}.{name}: "))

    def access(self, resp: Any, req: Any, environ: Mapping[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled or not self.access_log.isEnabledFor(logging.INFO):
            return
        try:
            fields = access_fields(resp, req, environ, request_time)
            target = fields["path"] or "-"
            if fields["query"] is not None:
                target = f"{target}?{fields['query']}"
            self.access_log.info(
                "%s %s %s",
                fields["method"] or "-",
                target,
                "-" if fields["status"] is None else fields["status"],
                extra={ACCESS_ATTR: fields},
            )
        except Exception:
            self.error_log.exception("Could not write an access log entry")
