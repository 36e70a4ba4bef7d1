"""The engine section: microsvc's HTTP engine against gunicorn's request path, per core.

Each class runs one worker (gthread: one worker and its threads) as
`microsvc run -k CLASS --workers 1 --http-engine microsvc|gunicorn`, on the demo's Flask
`/data` and on its bare WSGI callable (`microsvc.demo:bare`, asked for at `/bare`), and
with the microsvc engine on `/io?ms=50` (gevent and eventlet at 1000 connections,
gthread at 2 x threads). The server is pinned to one CPU and wrk (one thread) to another.
Granian (1 worker, WSGI interface) is an optional peer on `/data` and `/bare`, installed
into a virtualenv of its own (`build/bench-peers/.venv`, never the project's) when
`--peers granian` asks for it.

The points of one endpoint form one group across classes and servers, so each round runs
every one of them once (A B C ... A B C ...). Each worker's private memory (USS) is read
once the server answers, before any load.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from benchlib.errors import BenchError, UsageError
from benchlib.machine import choose_pinning, package_version
from benchlib.options import CLASSES, ROOT, Options
from benchlib.points import (
    IO_WAIT_S,
    PATHS,
    Plan,
    Point,
    ServerCommand,
    data_connections,
    io_connections,
    microsvc_run,
    microsvc_setup,
    system_facts,
)
from benchlib.report import (
    Ratio,
    Results,
    against_ideal,
    compare,
    no_errors,
    show_ms,
    show_rps,
    table,
)

ENGINES = ("microsvc", "gunicorn")
APPS = {"data": "microsvc.demo:app", "bare": "microsvc.demo:bare"}
GRANIAN = "granian==2.8.7"
PEER_VENV = ROOT / "build" / "bench-peers" / ".venv"
GRANIAN_ARGS = ("--workers", "1", "--blocking-threads", "1")
MB = 1_000_000
_SUFFIX = {"data": "", "bare": ", bare", "io": ""}

TARGET_FLASK = 1.8
TARGET_BARE = 4.0
TARGET_GRANIAN = 1.0
TARGET_ASYNC_IO = 0.95
TARGET_KEEPALIVE = 1.3
TARGET_GTHREAD_IO = 0.90
TARGET_MEMORY_MB = 5.0


def check_engine_option(peers: tuple[str, ...], sections: tuple[str, ...]) -> None:
    """BenchError unless `microsvc run` has `--http-engine` (when the section runs)."""
    if "engine" not in sections:
        if peers:
            raise UsageError("--peers is for the engine section (add engine to --sections)")
        return
    if "--http-engine" not in (_output([sys.executable, "-m", "microsvc", "run", "--help"]) or ""):
        raise BenchError(
            "the engine section needs `microsvc run --http-engine`, which this microsvc "
            "does not have (leave engine out of --sections)"
        )


def _output(argv: list[str], timeout: float = 120) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def install_granian(say: Callable[[str], None]) -> str:
    """granian (and the Flask the project uses) in PEER_VENV, made on first use; the path
    of its `granian` command."""
    python = str(PEER_VENV / "bin" / "python")
    wanted = [GRANIAN, f"flask=={package_version('flask')}"]
    probe = "import importlib.metadata as m; print(m.version('granian'), m.version('flask'))"
    if _output([python, "-c", probe]) != " ".join(item.split("==")[1] for item in wanted):
        say(f"installing {', '.join(wanted)} into {PEER_VENV.relative_to(ROOT)}")
        steps = [
            [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *wanted]
        ]
        if not (PEER_VENV / "bin" / "python").exists():
            steps.insert(0, [sys.executable, "-m", "venv", str(PEER_VENV)])
        for argv in steps:
            if _output(argv, timeout=600) is None:
                raise BenchError(f"cannot install the peers ({' '.join(argv[:4])} ... failed)")
    return str(PEER_VENV / "bin" / "granian")


def granian_command(granian: str, endpoint: str) -> ServerCommand:
    """One worker, one blocking thread: by default Granian grows its WSGI thread pool to
    about 130 threads at 64 connections, and their contention for the GIL costs a third
    of its throughput on one CPU."""
    app = APPS[endpoint]
    args = ("--interface", "wsgi", *GRANIAN_ARGS, "--host", "127.0.0.1", "--port", "{port}")
    # The demo module comes from this checkout; only granian and Flask from PEER_VENV.
    argv = ("env", f"PYTHONPATH={ROOT}", granian, *args, app)
    shown = " ".join(("granian", *args, app)).replace("{port}", "PORT")
    return ServerCommand(argv, PATHS[endpoint], display=shown)


def add_engine_points(plan: Plan, options: Options, granian: str | None) -> None:
    """Append the engine section's groups (one per endpoint) to `plan`."""
    pinning = choose_pinning(options.pin, per_core=True)
    facts = system_facts(pinning.server_cpus)
    setups = {cls: microsvc_setup(cls, 1, facts) for cls in options.classes}
    endpoints = (["data", "bare"] if "data" in options.endpoints else []) + (
        ["io"] if "io" in options.endpoints else []
    )
    for endpoint in endpoints:
        group: list[Point] = []
        for cls, setup in setups.items():
            engines = ENGINES if endpoint != "io" else () if cls == "sync" else ("microsvc",)
            conns = data_connections(options, 1)
            if endpoint == "io":
                conns = io_connections(options, cls, 1, setup.threads)
            for engine in engines:
                flags = ("--http-engine", engine, APPS.get(endpoint, APPS["data"]))
                command = microsvc_run(cls, 1, *flags)
                group.append(
                    _point(endpoint, f"{engine} engine", cls, setup.threads, conns, command)
                )
        if granian and endpoint != "io":
            command = granian_command(granian, endpoint)
            group.append(_point(endpoint, "granian", "-", 1, data_connections(options, 1), command))
        for point in group:
            point.pinning = pinning
        plan.add(group)
    if not granian:
        plan.skipped.append(
            "engine: Granian skipped; --peers granian installs it into build/bench-peers/.venv"
        )
    version = "import granian; print(granian.__version__)"
    plan.engine = {
        "pinning": pinning.describe(),
        "workers": {
            cls: "1 worker" + (f" x {s.threads} threads" if s.threads > 1 else "")
            for cls, s in setups.items()
        },
        "granian": _output([str(PEER_VENV / "bin" / "python"), "-c", version]) if granian else None,
    }


def _point(
    endpoint: str, config: str, cls: str, threads: int, connections: int, command: ServerCommand
) -> Point:
    server = config.split()[0]
    return Point(
        key=f"engine:{server}:{cls}:{endpoint}",
        group=f"engine:{endpoint}",
        section="engine",
        config=config + _SUFFIX[endpoint],
        server="granian" if server == "granian" else "microsvc",
        worker_class=cls,
        workers=1,
        threads=threads,
        endpoint=endpoint,
        connections=connections,
        command=command,
    )


# --- ratios ------------------------------------------------------------------------------

Found = dict[tuple[str, str, str], Point]


def _found(results: Results) -> Found:
    """(endpoint, class, microsvc|gunicorn|granian) -> point."""
    return {
        (p.endpoint, p.worker_class, p.config.split()[0].rstrip(",")): p
        for p in results.plan.points
        if p.section == "engine"
    }


def _at_most(kind: str, subject: str, a: float | None, b: float | None, limit: float) -> Ratio:
    """a / b (p99) or a - b in MB (memory), which must stay at most `limit`."""
    memory = kind.endswith("(MB)")
    value = None if a is None or not b else (a - b) / MB if memory else a / b
    shown = f"USS {_mb(a)} MB / {_mb(b)} MB" if memory else f"p99 {show_ms(a)} ms / {show_ms(b)} ms"
    target = f"<= {limit:.2f}" + (" MB" if memory else "")
    if value is None:
        return Ratio(kind, subject, None, target, "n/a", shown + " (a point failed)")
    return Ratio(kind, subject, value, target, "PASS" if value <= limit else "MISS", shown)


def engine_ratios(results: Results) -> list[Ratio]:
    """The engine section's targets, from this run's medians."""
    found = _found(results)

    def both(endpoint: str, cls: str) -> tuple[Any, Any]:
        return found.get((endpoint, cls, "microsvc")), found.get((endpoint, cls, "gunicorn"))

    ratios: list[Ratio | None] = [
        compare(kind, f"{cls} {_shown(endpoint)}", *both(endpoint, cls), target)
        for kind, endpoint, target in (
            ("engine / gunicorn engine, Flask", "data", TARGET_FLASK),
            ("engine / gunicorn engine, bare", "bare", TARGET_BARE),
        )
        for cls in CLASSES
    ]
    keepalive = "gthread keep-alive / today's"
    ratios.append(compare(keepalive, "gthread /data", *both("data", "gthread"), TARGET_KEEPALIVE))
    for endpoint, against in (("data", TARGET_GRANIAN), ("bare", None)):
        ok = [
            p for k, p in found.items() if k[0] == endpoint and k[2] == "microsvc" and p.summary.ok
        ]
        best = max(ok, key=lambda p: p.summary.rps or 0.0, default=None)
        subject = f"{best.worker_class if best else '-'} {_shown(endpoint)}"
        granian = found.get((endpoint, "-", "granian"))
        ratios.append(compare("best class / Granian", subject, best, granian, against))
    for cls in ("gevent", "eventlet", "gthread"):
        if ("io", cls, "microsvc") in found:
            ratios += _io_ratios(cls, found)
    measured = [(cls, *both("data", cls)) for cls in CLASSES]
    pairs = [
        (cls, ours.summary, theirs.summary) for cls, ours, theirs in measured if ours and theirs
    ]
    p99, memory = (
        "p99 engine / gunicorn engine",
        "idle worker memory, engine - gunicorn engine (MB)",
    )
    ratios += [
        _at_most(p99, f"{cls} /data", a.p99_ms, b.p99_ms, 1.0)
        for cls, a, b in pairs
        if cls in ("gevent", "eventlet")
    ]
    ratios += [
        _at_most(memory, cls, a.idle_uss_bytes, b.idle_uss_bytes, TARGET_MEMORY_MB)
        for cls, a, b in pairs
    ]
    return [ratio for ratio in ratios if ratio]


def _io_ratios(cls: str, found: Found) -> list[Ratio]:
    """gthread: against threads / 50 ms. gevent, eventlet: no error, and against
    connections / 50 ms, or, where the server's CPU is the bound, what it serves with
    that CPU busy all the time (its rps over the share of the CPU it used)."""
    point = found[("io", cls, "microsvc")]
    s = point.summary
    kind, subject = "engine /io / ideal", f"{cls} /io"
    if cls == "gthread":
        ideal = point.threads / IO_WAIT_S
        how = f"{ideal:,.0f} ({point.threads} threads / 50 ms)"
        return [against_ideal(kind, subject, s, ideal, how, TARGET_GTHREAD_IO)]
    ideal, how = point.connections / IO_WAIT_S, f"{point.connections} connections / 50 ms"
    pinned = point.pinning.server_cpus if point.pinning else None
    cpus = len(pinned) if pinned else len(os.sched_getaffinity(0))
    if s.rps and s.cpu_busy and s.rps * cpus / s.cpu_busy < ideal:
        ideal = s.rps * cpus / s.cpu_busy
        how = f"at {s.cpu_busy:.0%} of {cpus} CPU: the CPU's bound"
    return [
        no_errors(f"{cls} /io, engine", point),
        against_ideal(kind, subject, s, ideal, f"{ideal:,.0f} ({how})", TARGET_ASYNC_IO),
    ]


def _shown(endpoint: str) -> str:
    return "bare callable" if endpoint == "bare" else PATHS[endpoint]


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


# --- the result page and the plot --------------------------------------------------------


def engine_markdown(results: Results) -> list[str]:
    """The section's own table: per class, both engines on both apps, p99, memory."""
    engine = results.plan.engine
    if not engine:
        return []
    found = _found(results)
    workers = ", ".join(f"{cls} {what}" for cls, what in engine["workers"].items())
    granian = "no Granian"
    if engine["granian"]:
        granian = (
            f"Granian {engine['granian']}, `granian --interface wsgi {' '.join(GRANIAN_ARGS)}`"
        )
    rows: list[list[str]] = []
    for cls, ours_name, label in [
        *((c, "microsvc", c) for c in CLASSES),
        ("-", "granian", "Granian"),
    ]:
        ours, theirs = found.get(("data", cls, ours_name)), found.get(("data", cls, "gunicorn"))
        if not ours:
            continue
        cells = [label]
        for endpoint in ("data", "bare"):
            a, b = (found.get((endpoint, cls, name)) for name in (ours_name, "gunicorn"))
            x, y = (a.summary.rps if a else None), (b.summary.rps if b else None)
            cells += [show_rps(x), show_rps(y), f"{x / y:.2f}" if x and y else "-"]
        mine, them = ours.summary, theirs.summary if theirs else None
        cells.append(f"{show_ms(mine.p99_ms)} / {show_ms(them.p99_ms if them else None)}")
        cells.append(f"{_mb(mine.idle_uss_bytes)} / {_mb(them.idle_uss_bytes if them else None)}")
        rows.append(cells)
    header = ["class", "Flask /data: engine", "gunicorn engine", "ratio", "bare: engine"]
    header += ["gunicorn engine", "ratio", "/data p99 ms: engine / gunicorn"]
    header += ["idle worker USS MB: engine / gunicorn"]
    return [
        "## HTTP engine",
        "",
        f"`microsvc run -k CLASS --workers 1 --http-engine microsvc|gunicorn APP` ({workers}); "
        f"{engine['pinning']}. Flask: `{APPS['data']}` at `/data`; bare: `{APPS['bare']}` (a WSGI "
        f"callable without a framework) at `/bare`; {granian}. "
        "`/io` ideal for gevent and eventlet: connections / 50 ms, or, where the server's CPU "
        "cannot serve that many, its throughput with the CPU busy all the time (rps over the "
        "share of the CPU the server used during the run: a server that keeps its CPU busy "
        "is at its bound; a `/io` request costs more CPU than a `/data` one, so `/data` "
        "throughput is no bound for it). Memory: each worker's USS (private "
        "pages, `/proc/PID/smaps_rollup`) once the server answers, before load.",
        "",
        *table(header, rows),
    ]


def draw_engine(results: Results, ax_data: Any, ax_bare: Any) -> None:
    """Bars per class (engine, gunicorn engine) on /data and /bare; Granian as a line."""
    found = _found(results)
    for ax, endpoint, title in (
        (ax_data, "data", "Flask /data"),
        (ax_bare, "bare", "bare WSGI callable"),
    ):
        classes = [cls for cls in CLASSES if (endpoint, cls, "microsvc") in found]
        for offset, engine, color in (
            (-0.2, "microsvc", "tab:green"),
            (0.2, "gunicorn", "tab:gray"),
        ):
            got = [found.get((endpoint, cls, engine)) for cls in classes]
            values = [(item.summary.rps or 0.0) if item else 0.0 for item in got]
            xs = [i + offset for i in range(len(classes))]
            bars = ax.bar(xs, values, 0.4, color=color, label=f"{engine} engine")
            ax.bar_label(bars, labels=[f"{v / 1000:.1f}k" for v in values], fontsize="small")
        granian = found.get((endpoint, "-", "granian"))
        if granian and granian.summary.rps:
            ax.axhline(
                granian.summary.rps, color="tab:red", linestyle="--", label="Granian, 1 worker"
            )
        ax.set_xticks(range(len(classes)), classes)
        ax.set(title=f"{title}: 1 worker, one CPU", ylabel="2xx responses / s")
        ax.grid(True, axis="y", alpha=0.3)
        if classes:
            ax.legend(fontsize="small")
