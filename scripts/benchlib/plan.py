"""The sections as data (`SECTIONS`), expanded per class and endpoint into points with
microsvc's own planning. A group's points run in turn, --repeat times (A B A B ...), so
slow drift of a shared machine touches all alike."""

from __future__ import annotations

import ast
import dataclasses
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

from benchlib.options import CLASSES, ENDPOINTS, ROOT, BenchError, Options
from harness import cpu_list, overload

#: Plain gunicorn's worker classes (gunicorn 27 has no eventlet worker: microsvc's is a
#: plain gunicorn worker class); settings it does not copy (cosmetic, or set per start).
PLAIN_CLASSES = {**{c: c for c in CLASSES}, "eventlet": "microsvc.workers.eventlet.EventletWorker"}
NOT_COPIED = ("proc_name", "bind", "control_socket")
IO_WAIT_S, ASYNC_IO_CONNECTIONS, ASYNC = 0.050, 1000, ("gevent", "eventlet")
PATHS = {**ENDPOINTS, "bare": "/bare", "overload": overload.PATH}
APP, BARE = "microsvc.demo:app", "microsvc.demo:bare"
GRANIAN, GRANIAN_ARGS = "granian==2.8.7", ("--workers", "1", "--blocking-threads", "1")
PEER_VENV = ROOT / "build" / "bench-peers" / ".venv"
#: From this many CPUs on, the server and wrk get CPUs of their own.
PIN_MIN_CPUS = 8


@dataclass(frozen=True)
class Pinning:
    """The CPUs the bench may use; the server's and wrk's share when pinned."""

    available: tuple[int, ...]
    server_cpus: tuple[int, ...] | None = None
    wrk_cpus: tuple[int, ...] | None = None
    reason: str = ""

    @property
    def wrk_threads(self) -> int:
        return len(self.wrk_cpus or ()) or max(1, min(4, len(self.available)))

    def describe(self) -> str:
        if not (self.server_cpus and self.wrk_cpus):
            return f"unpinned: server and wrk share CPUs {cpu_list(self.available)}; {self.reason}"
        server, wrk = (f"CPUs {cpu_list(c)} ({len(c)})" for c in (self.server_cpus, self.wrk_cpus))
        return f"server pinned to {server}, wrk to {wrk} with taskset"


def choose_pinning(pin: bool, per_core: bool = False) -> Pinning:
    """From PIN_MIN_CPUS on, a quarter of the CPUs (at least 2) for wrk and the rest for
    the server; fewer are too few to split. `per_core`: the server on the first CPU, wrk
    on the second, from 2 CPUs on."""
    available = tuple(sorted(os.sched_getaffinity(0)))
    count = len(available)
    if not pin:
        return Pinning(available, reason="--no-pin was given")
    if count < (2 if per_core else PIN_MIN_CPUS):
        why = f"{count} CPUs are too few to give wrk CPUs of its own, so wrk takes CPU time "
        return Pinning(available, reason=why + "from the server; compare the ratios")
    if shutil.which("taskset") is None:
        return Pinning(available, reason="taskset is not installed")
    wrk = 1 if per_core else max(2, count // 4)
    return Pinning(available, available[: 1 if per_core else count - wrk], available[-wrk:])


class Config(NamedTuple):
    """One configuration. server: microsvc, plain (gunicorn with microsvc's settings),
    guide (`gunicorn -w 2*cpus+1`) or granian; workers: auto, N, guide or sweep."""

    name: str
    server: str
    workers: str
    flags: tuple[str, ...] = ()
    endpoints: tuple[str, ...] = ("data", "io")
    classes: tuple[str, ...] = CLASSES


class Section(NamedTuple):
    """group: the points that run in turn; per_core: the server on one CPU and wrk on
    another; classes: instead of --classes."""

    title: str
    text: str
    configs: tuple[Config, ...]
    group: str = "{cls}:{endpoint}"
    per_core: bool = False
    classes: tuple[str, ...] | None = None


_VS, _ONE_CPU = "microsvc against gunicorn", "the server on one CPU and wrk on another (taskset)"
_METRICS, _ENGINE = ("--metrics", "--metrics-bind", "127.0.0.1:0"), ("--http-engine", "microsvc")
_GUNICORN = ("--http-engine", "gunicorn")
_SHED, _N = ("--max-queue-time", f"{overload.MAX_QUEUE_TIME_S:g}s"), str(overload.WORKERS)
# fmt: off
SECTIONS = {
    "auto": Section(_VS, "auto: `microsvc run -k CLASS --workers auto`, as shipped.",
        (Config("microsvc --workers auto", "microsvc", "auto"),)),
    "plain": Section(_VS, "plain: plain gunicorn with exactly the settings microsvc computes "
        "(What ran lists them): what the launcher costs.",
        (Config("gunicorn, microsvc's settings", "plain", "auto"),)),
    "guide": Section(_VS, "guide: the hand-typed `gunicorn -w <2 x os.cpu_count() + 1>`, which "
        "counts the host's CPUs even where the server may use fewer.",
        (Config("guide: gunicorn -w {n}", "guide", "guide", classes=("sync", "gevent")),)),
    "sweep": Section("Worker-count sweep", "`microsvc run -k CLASS --workers N` for the counts "
        "of --sweep (auto: 1, cpus/2, cpus, 2 x cpus+1, 3 x cpus).",
        (Config("microsvc --workers {n}", "microsvc", "sweep"),)),
    "metrics": Section("Metrics cost", "`microsvc run -k CLASS --workers 1` with `--metrics` "
        f"and without, alternating, on Flask `/data`; {_ONE_CPU}.",
        (Config("metrics on", "microsvc", "1", _METRICS, ("data",)),
         Config("metrics off", "microsvc", "1", (), ("data",))), "metrics:{cls}", True),
    "engine": Section("HTTP engine", "`microsvc run -k CLASS --workers 1 --http-engine "
        f"microsvc|gunicorn APP`; {_ONE_CPU}. Flask: `{APP}` at `/data`; bare: `{BARE}` (a "
        f"WSGI callable without a framework) at `/bare`; {GRANIAN}: `granian --interface wsgi "
        f"{' '.join(GRANIAN_ARGS)}` (--peers granian). `/io` ideal for gevent and eventlet: "
        "connections / 50 ms, or where the server's CPU is the bound, its rps over the share of "
        "the CPU it used. Idle USS: the workers' private memory before load.",
        (Config("microsvc engine", "microsvc", "1", _ENGINE, ("data", "bare")),
         Config("gunicorn engine", "microsvc", "1", _GUNICORN, ("data", "bare")),
         Config("microsvc engine", "microsvc", "1", _ENGINE, ("io",), CLASSES[1:]),
         Config("granian", "granian", "1", (), ("data", "bare"), ("granian",))),
        "engine:{endpoint}", True),
    "overload": Section("Overload", "Each server behind a real nginx (`microsvc nginx`); the "
        f"capacity measured through it once, then about {overload.OVERLOAD} x that offered for "
        f"{overload.SECONDS:g} s by {overload.CONNECTIONS} wrk connections pausing "
        f"{overload.PAUSE_S:g} s between requests (`harness.overload`). Figures from nginx's "
        "access log, rates in the steady part of the run; rps: successes a second; non-2xx: "
        "503 and other statuses. Runs once, whatever --repeat, --duration and --warmup say.",
        (Config("microsvc --max-queue-time 1s", "microsvc", _N, _SHED, ("overload",)),
         Config("gunicorn, microsvc's settings", "plain", _N, (), ("overload",))),
        "overload", classes=("sync",)),
}
# fmt: on


@dataclass(frozen=True)
class ServerCommand:
    """How to start one configuration; `{port}` and `{config}` are filled at start."""

    argv: tuple[str, ...]
    ready_path: str
    display: str
    #: gunicorn settings for a config file (plain gunicorn with microsvc's settings).
    config: Mapping[str, Any] | None = None

    def render(self, port: int, workdir: Path, runtime_dir: Path) -> list[str]:
        """The argv for `port`; with settings, their config file is written first."""
        path = workdir / f"gunicorn-{port}.conf.py"
        if self.config is not None:
            ctl = str(runtime_dir / f"gunicorn-{port}.ctl")
            settings = {**self.config, "bind": [f"127.0.0.1:{port}"], "control_socket": ctl}
            path.write_text("".join(f"{k} = {v!r}\n" for k, v in sorted(settings.items())))
        return [part.format(port=port, config=path) for part in self.argv]


@dataclass
class Run:
    """One measurement: wrk's figures (or harness.overload's), the workers' median private
    memory before load (idle_uss_bytes), the server's CPU time over the wall time (cpu_busy)."""

    round: int
    ok: bool = False
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Point:
    section: str
    config: str
    worker_class: str
    endpoint: str
    workers: int
    threads: int
    connections: int
    command: ServerCommand
    pinning: Pinning
    runs: list[Run] = field(default_factory=list)
    #: The group it runs in turn with (round by round: A B A B ...).
    group: str = ""

    @property
    def path(self) -> str:
        return PATHS[self.endpoint]

    @property
    def failures(self) -> list[str]:
        return [run.error or "failed" for run in self.runs if not run.ok]

    def each(self, key: str) -> list[float]:
        """`key` (a figure of wrk's, idle_uss_bytes, cpu_busy) of each successful run."""
        return [float(r.result[key]) for r in self.runs if r.ok and r.result.get(key) is not None]

    def by_round(self, key: str) -> dict[int, float]:
        """`key` of each successful run, by its round."""
        return {
            r.round: float(r.result[key])
            for r in self.runs
            if r.ok and r.result.get(key) is not None
        }

    def median(self, key: str) -> float | None:
        values = self.each(key)
        return statistics.median(values) if values else None


class MicrosvcSetup(NamedTuple):
    """microsvc's WorkerPlan, its gunicorn settings for plain gunicorn, those not copied."""

    plan: Any
    plain_config: dict[str, Any]
    dropped: tuple[str, ...]


def _is_literal(value: Any) -> bool:
    try:
        return bool(ast.literal_eval(repr(value)) == value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def microsvc_setup(worker_class: str, workers: str, pinning: Pinning) -> MicrosvcSetup:
    """Build as `microsvc run -k CLASS --workers W` does on the server's CPUs."""
    from microsvc.config.pipeline import build
    from microsvc.config.resolve import Caller
    from microsvc.planning.system import read_system_facts

    facts = read_system_facts()
    if pinning.server_cpus:
        facts = dataclasses.replace(facts, affinity_cpus=len(pinning.server_cpus))
    options = {"worker_class": worker_class, "workers": workers, "bind": "127.0.0.1:5000"}
    caller = Caller("command line", command_line=True)
    built = build(options, {}, None, facts, gunicorn_settings=None, caller=caller)
    config = {k: v for k, v in built.gunicorn.items() if k not in NOT_COPIED}
    copied = {k: v for k, v in config.items() if _is_literal(v)}
    plain = {**copied, "worker_class": PLAIN_CLASSES[worker_class]}
    return MicrosvcSetup(built.plan, plain, tuple(k for k in config if k not in copied))


def server_command(
    config: Config, cls: str, workers: str, endpoint: str, setup: MicrosvcSetup | None, peer: str
) -> ServerCommand:
    """The command of `config` for one class and endpoint, `{port}` shown as PORT: one
    Granian worker with one blocking thread (by default its WSGI thread pool grows to
    about 130 threads at 64 connections, whose contention for the GIL costs a third of its
    throughput on one CPU), the demo module from this checkout."""
    app, bind = BARE if endpoint == "bare" else APP, ("-b", "127.0.0.1:{port}")
    if config.server == "granian":
        flags = ("--interface", "wsgi", *GRANIAN_ARGS, "--host", "127.0.0.1", "--port", "{port}")
        shown = " ".join(("granian", *flags, app)).replace("{port}", "PORT")
        argv = ("env", f"PYTHONPATH={ROOT}", peer, *flags, app)
        return ServerCommand(argv, PATHS[endpoint], shown)
    if config.server == "plain" and setup:
        keys = ("workers", "threads", "worker_class", "worker_connections", "keepalive")
        plain = ", ".join(f"{k}={v}" for k, v in sorted(setup.plain_config.items()) if k in keys)
        shown = f"gunicorn -c FILE {APP} ({plain}; the rest as microsvc sets it)"
        python = (sys.executable, "-m", "gunicorn", "-c", "{config}", APP)
        return ServerCommand(python, "/data", shown, setup.plain_config)
    program, ready = ("gunicorn", "/data") if config.server == "guide" else ("microsvc", "/readyz")
    args: tuple[str, ...] = ("-w", workers, *(("-k", cls) if cls != "sync" else ()), *bind, APP)
    if program == "microsvc":
        args = ("run", "-k", cls, "--workers", workers, *config.flags, *bind)
        args += (app,) if endpoint == "bare" else ()
    shown = " ".join((program, *args)).replace("{port}", "PORT")
    return ServerCommand((sys.executable, "-m", program, *args), ready, shown)


def install_granian(say: Callable[[str], None]) -> str:
    """Granian and the project's Flask in PEER_VENV (not the project's .venv); its path."""
    python = PEER_VENV / "bin" / "python"
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(PEER_VENV)]]
    pins = [GRANIAN, f"flask=={metadata.version('flask')}"]
    steps.append([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *pins])
    say(f"{', '.join(pins)} in {PEER_VENV.relative_to(ROOT)} (pip installs them once)")
    for argv in steps:
        try:
            subprocess.run(argv, capture_output=True, timeout=600, check=True)
        except (OSError, subprocess.SubprocessError):
            raise BenchError(
                f"cannot install the peers ({' '.join(argv[:4])} ... failed)"
            ) from None
    return str(PEER_VENV / "bin" / "granian")


@dataclass
class Plan:
    """Every point, in run order, and what was skipped and why."""

    setups: dict[str, MicrosvcSetup]
    usable_cpus: int
    guide_workers: int
    groups: list[list[Point]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def points(self) -> list[Point]:
        return [point for group in self.groups for point in group]


def build_plan(options: Options, pinning: Pinning, granian: str | None) -> Plan:
    """The points of every section asked for, grouped for interleaving."""
    per_core = choose_pinning(options.pin, per_core=True)
    setups: dict[tuple[str, str, bool], MicrosvcSetup] = {}

    def setup(cls: str, workers: str, where: Pinning) -> MicrosvcSetup:
        key = (cls, workers, where is per_core)
        if key not in setups:
            setups[key] = microsvc_setup(cls, workers, where)
        return setups[key]

    auto = {cls: setup(cls, "auto", pinning) for cls in options.classes}
    cpus = int(next(iter(auto.values())).plan.usable_cpus)
    plan = Plan(auto, cpus, 2 * (os.cpu_count() or 1) + 1)
    counts = options.sweep or sorted({1, max(1, cpus // 2), cpus, 2 * cpus + 1, 3 * cpus})
    groups: dict[str, list[Point]] = {}
    for name, section in ((n, s) for n, s in SECTIONS.items() if n in options.sections):
        where = per_core if section.per_core else pinning
        data_conns = max(64, 20 * len(where.server_cpus or range(cpus)))
        for config in section.configs:
            classes = [c for c in section.classes or options.classes if c in config.classes]
            classes = (["granian"] if granian else []) if config.server == "granian" else classes
            sizes = [str(n) for n in counts] if config.workers == "sweep" else [config.workers]
            wanted = [e for e in config.endpoints if e in ("overload", *options.endpoints)
                      or (e == "bare" and "data" in options.endpoints)]  # fmt: skip
            for endpoint, cls, size in ((e, c, s) for e in wanted for c in classes for s in sizes):
                size = str(plan.guide_workers) if config.server == "guide" else size
                s = setup(cls, size, where) if config.server in ("microsvc", "plain") else None
                workers, threads = (s.plan.workers, s.plan.threads) if s else (int(size), 1)
                command = server_command(config, cls, size, endpoint, s, granian or "")
                conns = options.connections_data or data_conns
                if endpoint == "io":
                    io = ASYNC_IO_CONNECTIONS if cls in ASYNC else max(8, 2 * workers * threads)
                    conns = options.connections_io or io
                conns = overload.CONNECTIONS if endpoint == "overload" else conns
                key = section.group.format(cls=cls, endpoint=endpoint)
                label = config.name.format(n=size)
                point = Point(
                    name, label, cls, endpoint, workers, threads, conns, command, where, group=key
                )
                groups.setdefault(key, []).append(point)
        if section.per_core and not where.server_cpus:
            plan.skipped.append(f"{name}: not pinned ({where.reason})")
    if "engine" in options.sections and not granian:
        plan.skipped.append("engine: Granian skipped; --peers granian installs it")
    if "guide" in options.sections and not set(options.classes) & {"sync", "gevent"}:
        plan.skipped.append("guide: skipped, it covers sync and gevent only")
    plan.groups = list(groups.values())
    return plan
