"""The configurations to measure, derived from microsvc's own planning code.

Sections:

- auto: `microsvc run -k CLASS --workers auto`;
- plain: plain gunicorn (`python -m gunicorn -c FILE microsvc.demo:app`) with exactly the
  gunicorn settings microsvc computes for that run (`microsvc.serving.launcher.resolve`,
  `make_plan`, `gunicorn_config`), gunicorn's own worker class in place of microsvc's
  (gunicorn 27 has no eventlet worker: eventlet uses microsvc's worker class path);
- guide: the hand-typed `gunicorn -w <2*os.cpu_count()+1> microsvc.demo:app`, and with
  `-k gevent` (sync and gevent only);
- sweep: `microsvc run -k CLASS --workers N` for a range of N;
- metrics: `microsvc run -k CLASS --workers auto --metrics` (on /data, against auto: the
  cost of recording every request);
- parser: microsvc with `--set http_parser=python` and `--set http_parser=fast`;
- engine: `benchlib.engine`.

Points that are compared with each other share a group (class and endpoint); the runner
runs each group's points in turn, `--repeat` times (ABAB...), so slow drift of a shared
machine touches all of them alike.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from benchlib.machine import Pinning
from benchlib.options import ENDPOINTS, Options
from benchlib.servers import ServerCommand

#: gunicorn's own worker classes for plain-gunicorn runs. gunicorn 27 has no eventlet
#: worker; microsvc's is a plain gunicorn worker class (it patches in the worker).
GUNICORN_WORKER_CLASSES = {
    "sync": "sync",
    "gthread": "gthread",
    "gevent": "gevent",
    "eventlet": "microsvc.workers.eventlet.EventletWorker",
}

#: gunicorn settings of microsvc's config that plain gunicorn does not take from it:
#: the process name is cosmetic, bind and the control socket are set per start.
NOT_COPIED = ("proc_name", "bind", "control_socket")

#: The I/O endpoint waits this long per request.
IO_WAIT_S = 0.050

#: Connections for gevent and eventlet on /io.
ASYNC_IO_CONNECTIONS = 1000

APP = "microsvc.demo:app"

#: Request paths by endpoint; `bare` is the demo's bare WSGI callable (engine section).
PATHS = {**ENDPOINTS, "bare": "/bare"}


@dataclass
class Run:
    """One measurement of a point."""

    round: int
    ok: bool
    result: dict[str, Any] | None = None
    error: str | None = None
    workers_seen: int | None = None
    #: Median private memory (USS) of the workers once the server answers, before load.
    idle_uss_bytes: int | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Point:
    key: str
    group: str
    section: str
    config: str
    server: str
    worker_class: str
    workers: int
    threads: int
    endpoint: str
    connections: int
    command: ServerCommand
    worker_connections: int | None = None
    #: CPUs of its own for this point (engine section); None: the run's pinning.
    pinning: Pinning | None = None
    runs: list[Run] = field(default_factory=list)

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]


@dataclass(frozen=True)
class MicrosvcSetup:
    """What microsvc plans for one class: its plan and the gunicorn settings it sets."""

    worker_class: str
    workers: int
    threads: int
    usable_cpus: int
    summary: str
    gunicorn_config: dict[str, Any]
    plain_config: dict[str, Any]
    dropped: tuple[str, ...]


def system_facts(server_cpus: tuple[int, ...] | None) -> Any:
    """microsvc's view of the system, as a server pinned to `server_cpus` sees it."""
    from microsvc.planning.system import read_system_facts

    facts = read_system_facts()
    if server_cpus:
        facts = dataclasses.replace(facts, affinity_cpus=len(server_cpus))
    return facts


def microsvc_setup(
    worker_class: str, workers: str | int, facts: Any, gunicorn: dict[str, str] | None = None
) -> MicrosvcSetup:
    """Resolve options as `microsvc run -k CLASS --workers W` does, plan, and build its
    gunicorn settings; and the same settings for plain gunicorn."""
    from microsvc.serving.launcher import gunicorn_config, make_plan, resolve

    options = {"worker_class": worker_class, "workers": workers, "bind": "127.0.0.1:5000"}
    resolved = resolve(options, None, gunicorn, {}, "command line")
    plan = make_plan(resolved, facts)
    config = gunicorn_config(resolved.settings, plan, resolved.gunicorn, os.getpid())
    plain: dict[str, Any] = {}
    dropped: list[str] = []
    for name, value in config.items():
        if name in NOT_COPIED:
            continue
        if not _is_literal(value):
            dropped.append(name)
            continue
        plain[name] = value
    plain["worker_class"] = GUNICORN_WORKER_CLASSES[worker_class]
    return MicrosvcSetup(
        worker_class=worker_class,
        workers=int(plan.workers),
        threads=int(plan.threads),
        usable_cpus=int(plan.usable_cpus),
        summary=plan.summary(),
        gunicorn_config={name: _jsonable(value) for name, value in config.items()},
        plain_config=plain,
        dropped=tuple(dropped),
    )


def _is_literal(value: Any) -> bool:
    try:
        return bool(ast.literal_eval(repr(value)) == value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def _jsonable(value: Any) -> Any:
    return value if _is_literal(value) else repr(value)


def sweep_counts(cpus: int) -> tuple[int, ...]:
    """Around the formulas: 1, cpus/2, cpus, 2*cpus+1, 3*cpus (deduplicated)."""
    return tuple(sorted({1, max(1, cpus // 2), cpus, 2 * cpus + 1, 3 * cpus}))


def data_connections(options: Options, cpus: int) -> int:
    return options.connections_data or max(64, 20 * cpus)


def io_connections(options: Options, worker_class: str, workers: int, threads: int) -> int:
    """Enough to keep every worker (or thread) of the configuration waiting on /io."""
    if options.connections_io:
        return options.connections_io
    if worker_class in ("gevent", "eventlet"):
        return ASYNC_IO_CONNECTIONS
    return max(8, 2 * workers * threads)


def connections(
    options: Options, endpoint: str, worker_class: str, workers: int, threads: int, cpus: int
) -> int:
    if endpoint == "data":
        return data_connections(options, cpus)
    return io_connections(options, worker_class, workers, threads)


def _python() -> str:
    return sys.executable


def _display(program: str, args: tuple[str, ...]) -> str:
    return " ".join([program, *args]).replace("{port}", "PORT")


def microsvc_command(
    worker_class: str, workers: str | int, sets: dict[str, str], *flags: str
) -> ServerCommand:
    extra: list[str] = list(flags)
    for name, value in sets.items():
        extra += ["--set", f"{name}={value}"]
    argv = (
        _python(),
        "-m",
        "microsvc",
        "run",
        "-k",
        worker_class,
        "--workers",
        str(workers),
        *extra,
        "-b",
        "127.0.0.1:{port}",
    )
    return ServerCommand(argv, "/readyz", display=_display("microsvc", argv[3:]))


def plain_command(setup: MicrosvcSetup) -> ServerCommand:
    argv = (_python(), "-m", "gunicorn", "-c", "{config}", APP)
    shown = ", ".join(
        f"{name}={value}"
        for name, value in sorted(setup.plain_config.items())
        if name in ("workers", "threads", "worker_class", "worker_connections", "keepalive")
    )
    return ServerCommand(
        argv,
        "/data",
        config=setup.plain_config,
        display=f"gunicorn -c FILE {APP} ({shown}; the rest as microsvc sets it)",
    )


def guide_command(worker_class: str, workers: int) -> ServerCommand:
    klass = ["-k", worker_class] if worker_class != "sync" else []
    argv = (_python(), "-m", "gunicorn", "-w", str(workers), *klass, "-b", "127.0.0.1:{port}", APP)
    return ServerCommand(argv, "/data", display=_display("gunicorn", argv[3:]))


@dataclass
class Plan:
    """Every point, in run order, and what was skipped and why."""

    points: list[Point]
    groups: list[list[Point]]
    setups: dict[str, MicrosvcSetup]
    usable_cpus: int
    guide_workers: int
    sweep: dict[str, tuple[int, ...]]
    skipped: list[str]
    parser_available: bool
    #: What the engine section ran with (pinning, peers), for the result files.
    engine: dict[str, Any] = field(default_factory=dict)


def parser_check() -> str | None:
    """None if the fast parser can be compared; otherwise why not."""
    import importlib.util

    if importlib.util.find_spec("gunicorn_h1c") is None:
        return "gunicorn_h1c is not installed (pip install gunicorn_h1c)"
    from microsvc.config.resolve import gunicorn_setting_names

    if "http_parser" not in gunicorn_setting_names():
        return "this gunicorn has no http_parser setting"
    return None


@dataclass(frozen=True)
class _GroupSpec:
    """Builds the points of one group (class and endpoint)."""

    options: Options
    cpus: int
    worker_class: str
    endpoint: str

    def point(
        self,
        section: str,
        config: str,
        server: str,
        size: MicrosvcSetup | tuple[int, int],
        command: ServerCommand,
        worker_connections: int | None,
    ) -> Point:
        workers, threads = (size.workers, size.threads) if isinstance(size, MicrosvcSetup) else size
        group = f"{self.worker_class}:{self.endpoint}"
        return Point(
            key=f"{section}:{config}:{group}",
            group=group,
            section=section,
            config=config,
            server=server,
            worker_class=self.worker_class,
            workers=workers,
            threads=threads,
            endpoint=self.endpoint,
            connections=connections(
                self.options, self.endpoint, self.worker_class, workers, threads, self.cpus
            ),
            command=command,
            worker_connections=worker_connections,
        )


def build_plan(options: Options, server_cpus: tuple[int, ...] | None) -> Plan:
    facts = system_facts(server_cpus)
    host_cpus = os.cpu_count() or 1
    guide_workers = 2 * host_cpus + 1
    setups = {cls: microsvc_setup(cls, "auto", facts) for cls in options.classes}
    cpus = next(iter(setups.values())).usable_cpus
    sections = set(options.sections)
    skipped: list[str] = []
    parser_reason = parser_check() if "parser" in sections else None
    if "parser" in sections and parser_reason:
        skipped.append(f"parser: skipped, {parser_reason}")
    guide_classes = [cls for cls in options.classes if cls in ("sync", "gevent")]
    if "guide" in sections and not guide_classes:
        skipped.append("guide: skipped, it covers sync and gevent only")
    sweep: dict[str, tuple[int, ...]] = {}
    groups: list[list[Point]] = []

    for cls in options.classes:
        setup = setups[cls]
        counts = options.sweep or sweep_counts(cpus)
        if "sweep" in sections:
            sweep[cls] = tuple(counts)
        swept = [microsvc_setup(cls, n, facts) for n in counts] if "sweep" in sections else []
        wc = setup.plain_config.get("worker_connections")
        for endpoint in options.endpoints:
            spec = _GroupSpec(options, cpus, cls, endpoint)
            points: list[Point] = []
            if "auto" in sections:
                points.append(
                    spec.point(
                        "auto",
                        "microsvc --workers auto",
                        "microsvc",
                        setup,
                        microsvc_command(cls, "auto", {}),
                        wc,
                    )
                )
            if "plain" in sections:
                points.append(
                    spec.point(
                        "plain",
                        "gunicorn, microsvc's settings",
                        "gunicorn",
                        setup,
                        plain_command(setup),
                        wc,
                    )
                )
            if "guide" in sections and cls in guide_classes:
                config = f"guide: gunicorn -w {guide_workers}" + (
                    f" -k {cls}" if cls != "sync" else ""
                )
                points.append(
                    spec.point(
                        "guide",
                        config,
                        "gunicorn",
                        (guide_workers, 1),
                        guide_command(cls, guide_workers),
                        None,
                    )
                )
            if "sweep" in sections:
                for count, counted in zip(counts, swept, strict=True):
                    points.append(
                        spec.point(
                            "sweep",
                            f"microsvc --workers {count}",
                            "microsvc",
                            counted,
                            microsvc_command(cls, count, {}),
                            counted.plain_config.get("worker_connections"),
                        )
                    )
            if "metrics" in sections and endpoint == "data":
                points.append(
                    spec.point(
                        "metrics",
                        "microsvc --workers auto --metrics",
                        "microsvc",
                        setup,
                        microsvc_command(
                            cls, "auto", {}, "--metrics", "--metrics-bind", "127.0.0.1:0"
                        ),
                        wc,
                    )
                )
            if "parser" in sections and not parser_reason and endpoint == "data":
                for parser in ("python", "fast"):
                    points.append(
                        spec.point(
                            "parser",
                            f"microsvc --set http_parser={parser}",
                            "microsvc",
                            setup,
                            microsvc_command(cls, "auto", {"http_parser": parser}),
                            wc,
                        )
                    )
            if points:
                groups.append(points)

    return Plan(
        points=[point for group in groups for point in group],
        groups=groups,
        setups=setups,
        usable_cpus=cpus,
        guide_workers=guide_workers,
        sweep=sweep,
        skipped=skipped,
        parser_available=parser_reason is None,
    )
