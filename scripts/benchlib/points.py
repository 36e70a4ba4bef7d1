"""The configurations to measure, derived from microsvc's own planning code.

Sections:

- auto: `microsvc run -k CLASS --workers auto`;
- plain: plain gunicorn (`python -m gunicorn -c FILE microsvc.demo:app`) with exactly the
  gunicorn settings microsvc computes for that run (`microsvc_setup`), gunicorn's own
  worker class in place of microsvc's (gunicorn 27 has no eventlet worker: eventlet uses
  microsvc's worker class path);
- guide: the hand-typed `gunicorn -w <2*os.cpu_count()+1> microsvc.demo:app`, and with
  `-k gevent` (sync and gevent only);
- sweep: `microsvc run -k CLASS --workers N` for a range of N;
- metrics: `microsvc run -k CLASS --workers auto --metrics` (on /data, against auto: the
  cost of recording every request);
- parser: microsvc with `--set http_parser=python` and `--set http_parser=fast`;
- engine: `benchlib.engine`;
- overload: `benchlib.overload` (no points: it runs its own measurement, behind nginx).

Points that are compared with each other share a group (class and endpoint); the runner
runs each group's points in turn, `--repeat` times (ABAB...), so slow drift of a shared
machine touches all of them alike.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import statistics
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib.machine import Pinning
from benchlib.options import ENDPOINTS, Options

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


@dataclass(frozen=True)
class ServerCommand:
    """How to start one configuration; `{port}` and `{config}` are filled at start."""

    argv: tuple[str, ...]
    ready_path: str
    #: gunicorn settings written to a config file (plain gunicorn with microsvc's settings).
    config: Mapping[str, Any] | None = None
    #: What a person would type (the interpreter shortened, PORT for the port).
    display: str = ""

    def render(self, port: int, workdir: Path, runtime_dir: Path) -> list[str]:
        """The argv for `port`; with settings, their gunicorn config file is written to
        `workdir` first, with this start's bind and control socket."""
        path = workdir / f"gunicorn-{port}.conf.py"
        if self.config is not None:
            settings = {
                **self.config,
                "bind": [f"127.0.0.1:{port}"],
                "control_socket": str(runtime_dir / f"gunicorn-{port}.ctl"),
            }
            lines = ["# Written by scripts/bench: microsvc's settings for plain gunicorn."]
            lines += [f"{name} = {value!r}" for name, value in sorted(settings.items())]
            path.write_text("\n".join(lines) + "\n")
        return [part.format(port=port, config=path) for part in self.argv]


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
    #: The server's CPU time during the measured run over its wall time (1.0: one CPU
    #: busy all along).
    cpu_busy: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """The medians of a point's successful runs (errors are summed)."""

    runs: int
    failed: int
    rps: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    socket_errors: int
    non2xx: int
    rps_each: tuple[float, ...]
    errors_each: tuple[str, ...]
    idle_uss_bytes: float | None = None
    cpu_busy: float | None = None

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non2xx

    @property
    def ok(self) -> bool:
        return self.rps is not None


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

    @property
    def summary(self) -> Summary:
        """The medians of the successful runs (errors are summed)."""
        good = [run.result for run in self.runs if run.ok and run.result]
        uss = [run.idle_uss_bytes for run in self.runs if run.idle_uss_bytes is not None]
        busy = [run.cpu_busy for run in self.runs if run.ok and run.cpu_busy is not None]

        def median(name: str) -> float | None:
            return statistics.median(float(result[name]) for result in good) if good else None

        failures = tuple(run.error or "failed" for run in self.runs if not run.ok)
        return Summary(
            runs=len(good),
            failed=len(failures),
            rps=median("rps"),
            p50_ms=median("p50_ms"),
            p90_ms=median("p90_ms"),
            p99_ms=median("p99_ms"),
            socket_errors=sum(int(result["socket_errors"]) for result in good),
            non2xx=sum(int(result["non2xx"]) for result in good),
            rps_each=tuple(float(result["rps"]) for result in good),
            errors_each=failures,
            idle_uss_bytes=statistics.median(uss) if uss else None,
            cpu_busy=statistics.median(busy) if busy else None,
        )


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
    from microsvc.config.pipeline import build
    from microsvc.config.resolve import Caller

    options = {"worker_class": worker_class, "workers": workers, "bind": "127.0.0.1:5000"}
    as_typed = Caller("command line", command_line=True)  # text, as typed after `run`
    configuration = build(options, {}, None, facts, gunicorn_settings=gunicorn, caller=as_typed)
    plan = configuration.plan
    config = dict(configuration.gunicorn)
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


def microsvc_run(worker_class: str, workers: str | int, *flags: str) -> ServerCommand:
    """`microsvc run -k CLASS --workers N FLAGS`, ready when /readyz says so."""
    run = ("run", "-k", worker_class, "--workers", str(workers), *flags, "-b", "127.0.0.1:{port}")
    shown = " ".join(("microsvc", *run)).replace("{port}", "PORT")
    return ServerCommand((sys.executable, "-m", "microsvc", *run), "/readyz", display=shown)


def plain_command(setup: MicrosvcSetup) -> ServerCommand:
    shown = ", ".join(
        f"{name}={value}"
        for name, value in sorted(setup.plain_config.items())
        if name in ("workers", "threads", "worker_class", "worker_connections", "keepalive")
    )
    return ServerCommand(
        (sys.executable, "-m", "gunicorn", "-c", "{config}", APP),
        "/data",
        config=setup.plain_config,
        display=f"gunicorn -c FILE {APP} ({shown}; the rest as microsvc sets it)",
    )


def guide_command(worker_class: str, workers: int) -> ServerCommand:
    klass = ["-k", worker_class] if worker_class != "sync" else []
    args = ("-w", str(workers), *klass, "-b", "127.0.0.1:{port}", APP)
    shown = " ".join(("gunicorn", *args)).replace("{port}", "PORT")
    return ServerCommand((sys.executable, "-m", "gunicorn", *args), "/data", display=shown)


@dataclass
class Plan:
    """Every point, in run order, and what was skipped and why."""

    setups: dict[str, MicrosvcSetup]
    usable_cpus: int
    guide_workers: int
    #: Points compared with each other, run in turn (the runner's order).
    groups: list[list[Point]] = field(default_factory=list)
    sweep: dict[str, tuple[int, ...]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    #: What the engine section ran with (pinning, peers), for the result files.
    engine: dict[str, Any] = field(default_factory=dict)
    #: What the overload section measured (`benchlib.overload`), for the result files.
    overload: dict[str, Any] = field(default_factory=dict)

    @property
    def points(self) -> list[Point]:
        return [point for group in self.groups for point in group]

    def add(self, group: list[Point]) -> None:
        if group:
            self.groups.append(group)


def parser_check() -> str | None:
    """None if the fast parser can be compared; otherwise why not."""
    if importlib.util.find_spec("gunicorn_h1c") is None:
        return "gunicorn_h1c is not installed (pip install gunicorn_h1c)"
    from microsvc.config.resolve import gunicorn_setting_names

    if "http_parser" not in gunicorn_setting_names():
        return "this gunicorn has no http_parser setting"
    return None


#: A point of a section: (section, config, microsvc's setup or (workers, threads), command).
_Wanted = tuple[str, str, MicrosvcSetup | tuple[int, int], ServerCommand]


def build_plan(options: Options, server_cpus: tuple[int, ...] | None) -> Plan:
    facts = system_facts(server_cpus)
    guide_workers = 2 * (os.cpu_count() or 1) + 1
    setups = {cls: microsvc_setup(cls, "auto", facts) for cls in options.classes}
    cpus = next(iter(setups.values())).usable_cpus
    plan = Plan(setups, cpus, guide_workers)
    sections = set(options.sections)
    parser_reason = parser_check() if "parser" in sections else None
    if parser_reason:
        plan.skipped.append(f"parser: skipped, {parser_reason}")
    guided = [cls for cls in options.classes if cls in ("sync", "gevent")]
    if "guide" in sections and not guided:
        plan.skipped.append("guide: skipped, it covers sync and gevent only")

    for cls in options.classes:
        setup = setups[cls]
        swept: list[tuple[int, MicrosvcSetup]] = []
        if "sweep" in sections:
            plan.sweep[cls] = options.sweep or sweep_counts(cpus)
            swept = [(n, microsvc_setup(cls, n, facts)) for n in plan.sweep[cls]]
        guide = f"guide: gunicorn -w {guide_workers}" + (f" -k {cls}" if cls != "sync" else "")
        for endpoint in options.endpoints:
            wanted: list[_Wanted] = [
                ("auto", "microsvc --workers auto", setup, microsvc_run(cls, "auto")),
                ("plain", "gunicorn, microsvc's settings", setup, plain_command(setup)),
            ]
            if cls in guided:
                wanted.append(
                    ("guide", guide, (guide_workers, 1), guide_command(cls, guide_workers))
                )
            wanted += [
                ("sweep", f"microsvc --workers {n}", s, microsvc_run(cls, n)) for n, s in swept
            ]
            if endpoint == "data":
                metrics = microsvc_run(cls, "auto", "--metrics", "--metrics-bind", "127.0.0.1:0")
                wanted.append(("metrics", "microsvc --workers auto --metrics", setup, metrics))
            if endpoint == "data" and not parser_reason:
                for setting in ("http_parser=python", "http_parser=fast"):
                    parser = microsvc_run(cls, "auto", "--set", setting)
                    wanted.append(("parser", f"microsvc --set {setting}", setup, parser))
            chosen = [item for item in wanted if item[0] in sections]
            plan.add([_point(options, cpus, cls, endpoint, *item) for item in chosen])
    return plan


def _point(
    options: Options,
    cpus: int,
    cls: str,
    endpoint: str,
    section: str,
    config: str,
    size: MicrosvcSetup | tuple[int, int],
    command: ServerCommand,
) -> Point:
    if isinstance(size, MicrosvcSetup):
        workers, threads = size.workers, size.threads
        worker_connections = size.plain_config.get("worker_connections")
    else:
        (workers, threads), worker_connections = size, None
    group = f"{cls}:{endpoint}"
    if endpoint == "data":
        conns = data_connections(options, cpus)
    else:
        conns = io_connections(options, cls, workers, threads)
    return Point(
        key=f"{section}:{config}:{group}",
        group=group,
        section=section,
        config=config,
        server="gunicorn" if section in ("plain", "guide") else "microsvc",
        worker_class=cls,
        workers=workers,
        threads=threads,
        endpoint=endpoint,
        connections=conns,
        command=command,
        worker_connections=worker_connections,
    )
