"""Every microsvc option, declared once.

`Settings` is the registry: each field carries its flag, parser, help text, environment
variables and the gunicorn setting it feeds. The CLI flags, the `MICROSVC_*` environment
variables, the keyword arguments of `Launcher`, config file names and the option
reference in the docs are all derived from these fields.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from microsvc.config import values
from microsvc.config.values import Auto

ENV_PREFIX = "MICROSVC_"


class WorkerClass(str, enum.Enum):
    """The worker classes microsvc runs."""

    SYNC = "sync"
    GTHREAD = "gthread"
    GEVENT = "gevent"
    EVENTLET = "eventlet"

    def __str__(self) -> str:
        return self.value


class HttpEngine(str, enum.Enum):
    """Which code turns bytes into requests and responses into bytes in the workers."""

    MICROSVC = "microsvc"
    GUNICORN = "gunicorn"

    def __str__(self) -> str:
        return self.value


class LogLevel(str, enum.Enum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"

    def __str__(self) -> str:
        return self.value


class LogFormat(str, enum.Enum):
    TEXT = "text"
    JSON = "json"

    def __str__(self) -> str:
        return self.value


def _choice(enum_type: type[enum.Enum]) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        text = value.value if isinstance(value, enum.Enum) else value
        if isinstance(text, str):
            try:
                return enum_type(text.strip().lower())
            except ValueError:
                pass
        names = ", ".join(member.value for member in enum_type)
        raise ValueError(f"{value!r} is not one of {names}")

    return parse


def _auto_or_size(value: object) -> int | Auto:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    return values.parse_size(value)


def _show_auto_or_size(value: int | Auto) -> str:
    return value if value == "auto" else values.format_size(value)


def _optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def parse_optional(value: object) -> Any:
        return None if value is None else parse(value)

    return parse_optional


def _binds(value: object) -> tuple[str, ...]:
    """One address, several separated by spaces, or a list of them (nested once, as
    click gives a repeated option)."""
    items = value.split() if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{value!r} is not an address or a list of addresses")
    flat = [part for item in items for part in (item if isinstance(item, tuple) else [item])]
    return tuple(values.parse_bind(item) for item in flat)


def _tcp_bind(value: object) -> str:
    text = values.parse_bind(value)
    if values.split_bind(text) is None:
        raise ValueError(f"{value!r} is not a TCP address (HOST:PORT or [IPv6]:PORT)")
    return text


def _path(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{value!r} is not a path (or '-' for stdout)")
    return value


def _bind_from_host_port(environ: Mapping[str, str]) -> tuple[str, str] | None:
    host, port = environ.get("HOST"), environ.get("PORT")
    if not host and not port:
        return None
    names = " and ".join(name for name, v in (("HOST", host), ("PORT", port)) if v)
    host = host or "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port or 5000}", names


def _web_concurrency(environ: Mapping[str, str]) -> tuple[str, str] | None:
    value = environ.get("WEB_CONCURRENCY")
    return (value, "WEB_CONCURRENCY") if value else None


@dataclass(frozen=True)
class OptionSpec:
    """How one option is spelled and read everywhere."""

    flags: tuple[str, ...]
    parse: Callable[[object], Any]
    help: str
    metavar: str = ""
    gunicorn: str | None = None
    is_flag: bool = False
    multiple: bool = False
    choices: tuple[str, ...] = ()
    env_fallback: Callable[[Mapping[str, str]], tuple[str, str] | None] | None = None
    show: Callable[[Any], str] = str
    to_gunicorn: Callable[[Any], Any] = lambda value: value
    #: gunicorn's value comes from the worker plan (`microsvc.planning.plan`), which
    #: reads this option among others, not from the option itself.
    planned: bool = False
    name: str = ""

    @property
    def flag(self) -> str:
        return next(f for f in self.flags if f.startswith("--"))

    @property
    def envvar(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _option(default: Any, *flags: str, parse: Callable[[object], Any], help: str, **kw: Any) -> Any:
    spec = OptionSpec(flags=flags, parse=parse, help=help, **kw)
    return field(default=default, metadata={"option": spec})


@dataclass(frozen=True)
class Settings:
    """The effective options of one server. `microsvc.config.pipeline.build` makes it."""

    worker_class: WorkerClass = _option(
        WorkerClass.SYNC,
        "-k",
        "--worker-class",
        parse=_choice(WorkerClass),
        choices=tuple(c.value for c in WorkerClass),
        metavar="CLASS",
        gunicorn="worker_class",
        planned=True,
        help="Worker class: sync (one request at a time per worker), gthread (a thread pool "
        "per worker), gevent or eventlet (many concurrent requests per worker, for I/O-bound "
        "apps; eventlet is unmaintained, prefer gevent).",
    )
    http_engine: HttpEngine = _option(
        HttpEngine.MICROSVC,
        "--http-engine",
        parse=_choice(HttpEngine),
        choices=tuple(e.value for e in HttpEngine),
        metavar="ENGINE",
        help="HTTP/1.1 engine of the workers: microsvc (its own, on the llhttp parser; about "
        "twice as fast) or gunicorn (gunicorn's request path, as in plain gunicorn).",
    )
    workers: int | Auto = _option(
        "auto",
        "-w",
        "--workers",
        parse=values.parse_auto_or_positive_int,
        metavar="auto|N",
        env_fallback=_web_concurrency,
        gunicorn="workers",
        planned=True,
        help="Number of worker processes; 'auto' plans it from the CPUs and memory this "
        "process may use and the worker class. WEB_CONCURRENCY is honoured.",
    )
    threads: int | Auto = _option(
        "auto",
        "--threads",
        parse=values.parse_auto_or_positive_int,
        metavar="auto|N",
        gunicorn="threads",
        planned=True,
        help="Threads per gthread worker; 'auto' gives 4. Only gthread runs threads.",
    )
    max_workers: int | None = _option(
        None,
        "--max-workers",
        parse=_optional(values.parse_positive_int),
        metavar="N",
        help="Upper bound on the number of workers, whatever planned or asked for it.",
    )
    memory_per_worker: int | Auto = _option(
        128 * 1024**2,
        "--memory-per-worker",
        parse=_auto_or_size,
        show=_show_auto_or_size,
        metavar="auto|SIZE",
        help="Memory budget of one worker (e.g. 128MiB, 1GB), or 'auto': the own memory "
        "(USS) of a process that has imported the app, measured at start in a child "
        "process; with --workers auto, the container's memory limit divided by it caps "
        "the worker count.",
    )
    bind: tuple[str, ...] = _option(
        ("127.0.0.1:5000",),
        "-b",
        "--bind",
        parse=_binds,
        metavar="ADDRESS",
        multiple=True,
        env_fallback=_bind_from_host_port,
        gunicorn="bind",
        to_gunicorn=list,
        help="Address to listen on: HOST:PORT, [IPv6]:PORT, unix:PATH or fd://N; repeatable. "
        "HOST and PORT are honoured.",
    )
    max_requests: int = _option(
        0,
        "--max-requests",
        parse=values.parse_non_negative_int,
        metavar="N",
        gunicorn="max_requests",
        help="Restart a worker after it has served N requests (0: never), against leaks.",
    )
    max_requests_jitter: int = _option(
        0,
        "--max-requests-jitter",
        parse=values.parse_non_negative_int,
        metavar="N",
        gunicorn="max_requests_jitter",
        help="Add a random 0..N to --max-requests per worker, so workers do not restart together.",
    )
    timeout: int = _option(
        30,
        "--timeout",
        parse=values.parse_non_negative_int,
        metavar="SECONDS",
        gunicorn="timeout",
        help="A worker silent for this long is killed and replaced (0: never).",
    )
    graceful_timeout: int = _option(
        30,
        "--graceful-timeout",
        parse=values.parse_non_negative_int,
        metavar="SECONDS",
        gunicorn="graceful_timeout",
        help="On restart or shutdown, how long workers may finish in-flight requests.",
    )
    keep_alive: int = _option(
        2,
        "--keep-alive",
        parse=values.parse_non_negative_int,
        metavar="SECONDS",
        gunicorn="keepalive",
        help="How long to wait for the next request on a keep-alive connection.",
    )
    preload: bool = _option(
        False,
        "--preload",
        parse=values.parse_bool,
        is_flag=True,
        gunicorn="preload_app",
        help="Import the app in the master before forking workers (less memory, faster "
        "start; a code reload then needs a restart).",
    )
    reload: bool = _option(
        False,
        "--reload",
        parse=values.parse_bool,
        is_flag=True,
        gunicorn="reload",
        help="Restart workers when the code changes. For development.",
    )
    log_level: LogLevel = _option(
        LogLevel.INFO,
        "--log-level",
        parse=_choice(LogLevel),
        choices=tuple(level.value for level in LogLevel),
        metavar="LEVEL",
        gunicorn="loglevel",
        to_gunicorn=str,
        help="Error log level.",
    )
    access_log: str | None = _option(
        None,
        "--access-log",
        parse=_path,
        metavar="PATH",
        gunicorn="accesslog",
        help="Write an access log to PATH ('-' for stdout). Off by default.",
    )
    log_format: LogFormat = _option(
        LogFormat.TEXT,
        "--log-format",
        parse=_choice(LogFormat),
        choices=tuple(f.value for f in LogFormat),
        metavar="FORMAT",
        help="text: gunicorn's log lines; json: one JSON object per line for the access and "
        "error logs (timestamp, level, method, path, status, duration, client, request id, "
        "worker pid).",
    )
    metrics: bool = _option(
        False,
        "--metrics",
        parse=values.parse_bool,
        is_flag=True,
        help="Serve Prometheus metrics of the whole server (every worker, across restarts) "
        "at /metrics on --metrics-bind.",
    )
    metrics_bind: str = _option(
        "127.0.0.1:9191",
        "--metrics-bind",
        parse=_tcp_bind,
        metavar="HOST:PORT",
        help="Address of the metrics endpoint, apart from the app's; loopback by default so "
        "it is never exposed by accident.",
    )
    max_worker_memory: int | None = _option(
        None,
        "--max-worker-memory",
        parse=_optional(values.parse_size),
        show=values.format_size,
        metavar="SIZE",
        help="Restart a worker whose own memory (USS: the pages no other process shares, "
        "so not the app shared after --preload) stays above SIZE (e.g. 512MB), after it "
        "finishes the requests in flight. Off by default.",
    )
    max_worker_lifetime: float | None = _option(
        None,
        "--max-worker-lifetime",
        parse=_optional(values.parse_duration),
        show=values.format_duration,
        metavar="DURATION",
        help="Restart a worker after it has run this long (e.g. 6h, 30m), after it finishes "
        "the requests in flight. Off by default.",
    )
    max_worker_lifetime_jitter: float = _option(
        0.0,
        "--max-worker-lifetime-jitter",
        parse=values.parse_duration,
        show=values.format_duration,
        metavar="DURATION",
        help="Add a random 0..DURATION to --max-worker-lifetime per worker, so workers do "
        "not restart together.",
    )
    request_timeout: float | None = _option(
        None,
        "--request-timeout",
        parse=_optional(values.parse_duration),
        show=values.format_duration,
        metavar="DURATION",
        help="A request running longer (e.g. 30s) is logged with its stack and ended: its "
        "client gets 503 (or a closed connection once the response started). Off by default.",
    )
    max_queue_time: float | None = _option(
        None,
        "--max-queue-time",
        parse=_optional(values.parse_duration),
        show=values.format_duration,
        metavar="DURATION",
        help="Answer 503 with Retry-After, without running the app, to a request that has "
        "already waited this long (e.g. 1s) behind a proxy's X-Request-Start or in the "
        "listen queue. Off by default; health and readiness are never shed.",
    )
    autoscale: bool = _option(
        False,
        "--autoscale",
        parse=values.parse_bool,
        is_flag=True,
        help="Follow the load: run between --min-workers and the planned count (or "
        "--max-workers) workers, adding workers when they are busy or requests queue, "
        "retiring idle ones after a cool-down.",
    )
    min_workers: int = _option(
        1,
        "--min-workers",
        parse=values.parse_positive_int,
        metavar="N",
        help="With --autoscale, the fewest workers kept running.",
    )
    drain_period: float = _option(
        0.0,
        "--drain-period",
        parse=values.parse_duration,
        show=values.format_duration,
        metavar="DURATION",
        help="On TERM, first answer the readiness path with 503 and keep serving for this "
        "long, so load balancers stop sending traffic; then shut down gracefully.",
    )
    health_path: str | None = _option(
        "/healthz",
        "--health-path",
        parse=values.parse_url_path,
        metavar="PATH",
        help="Liveness path answered by microsvc in front of the app ('off' to disable).",
    )
    ready_path: str | None = _option(
        "/readyz",
        "--ready-path",
        parse=values.parse_url_path,
        metavar="PATH",
        help="Readiness path answered by microsvc: 503 while starting and draining "
        "('off' to disable).",
    )
    forwarded_allow_ips: tuple[str, ...] = _option(
        ("127.0.0.1", "::1"),
        "--forwarded-allow-ips",
        parse=values.parse_ip_list,
        show=",".join,
        metavar="IPS",
        gunicorn="forwarded_allow_ips",
        to_gunicorn=",".join,
        help="Proxies whose X-Forwarded-For and X-Forwarded-Proto are trusted "
        "(comma-separated addresses or networks, '*' for all). Others' are ignored.",
    )
    limit_request_line: int = _option(
        4094,
        "--limit-request-line",
        parse=values.parse_non_negative_int,
        metavar="BYTES",
        gunicorn="limit_request_line",
        help="Longest request line accepted; longer ones get 400.",
    )
    limit_request_fields: int = _option(
        100,
        "--limit-request-fields",
        parse=values.parse_non_negative_int,
        metavar="N",
        gunicorn="limit_request_fields",
        help="Most header fields accepted in one request; more get 400.",
    )
    limit_request_field_size: int = _option(
        8190,
        "--limit-request-field-size",
        parse=values.parse_non_negative_int,
        metavar="BYTES",
        gunicorn="limit_request_field_size",
        help="Largest header field accepted; larger ones get 400.",
    )


OPTIONS: tuple[OptionSpec, ...] = tuple(
    OptionSpec(**{**f.metadata["option"].__dict__, "name": f.name}) for f in fields(Settings)
)
OPTIONS_BY_NAME: dict[str, OptionSpec] = {spec.name: spec for spec in OPTIONS}
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(Settings)}
GUNICORN_NAMES: dict[str, str] = {spec.gunicorn: spec.name for spec in OPTIONS if spec.gunicorn}
