"""The keyword options of `Launcher`, typed: `Launcher(app, **options)` takes exactly
these, so a type checker refuses `Launcher(wokers=3)` or `Launcher(workers=[3])`.

One key per registry option (`microsvc.config.options.Settings`), each accepting the
option's own type or text, as its `MICROSVC_*` variable would give it (`workers="auto"`,
`memory_per_worker="256MiB"`, `drain_period="10s"`); a list or tuple where the option
holds several values. tests/unit/test_unit_options.py keeps this equal to the registry.
"""

# Evaluated at run time (no `from __future__ import annotations`), so that
# `typing.get_type_hints` reads the same types the type checker does.

from typing import TypedDict

from microsvc.config.options import HttpEngine, LogFormat, LogLevel, WorkerClass


class LauncherOptions(TypedDict, total=False):
    """`Launcher`'s keyword options; see `microsvc run --help` for what each does."""

    worker_class: WorkerClass | str
    http_engine: HttpEngine | str
    workers: int | str
    threads: int | str
    max_workers: int | str | None
    memory_per_worker: int | str
    bind: str | list[str] | tuple[str, ...]
    max_requests: int | str
    max_requests_jitter: int | str
    timeout: int | str
    graceful_timeout: int | str
    keep_alive: int | str
    preload: bool | str
    reload: bool | str
    log_level: LogLevel | str
    access_log: str | None
    log_format: LogFormat | str
    metrics: bool | str
    metrics_bind: str
    max_worker_memory: int | str | None
    max_worker_lifetime: float | str | None
    max_worker_lifetime_jitter: float | str
    request_timeout: float | str | None
    max_queue_time: float | str | None
    autoscale: bool | str
    min_workers: int | str
    drain_period: float | str
    health_path: str | None
    ready_path: str | None
    forwarded_allow_ips: str | list[str] | tuple[str, ...]
    limit_request_line: int | str
    limit_request_fields: int | str
    limit_request_field_size: int | str
