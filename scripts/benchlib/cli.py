"""`scripts/bench`: run every point, write the result files, print the ratios. Exit
status: 0 after a completed run (a missed target prints MISS), 1 on a runtime failure
(with --strict, also a missed target or a failed run), 2 on a bad command line."""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib.util
import os
import platform
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

import harness
from benchlib.options import BenchError, Options, UsageError, parse_options
from benchlib.plan import SECTIONS, Pinning, Point, Run, build_plan, choose_pinning, install_granian
from benchlib.ratios import compute_ratios
from benchlib.report import Results, render_markdown, table, write_json, write_png
from harness import overload

#: Seconds a run takes beyond warm-up and measurement, for the estimate (an overload run:
#: all of it); seconds for a server's workers to settle, and to stop after TERM.
RUN_OVERHEAD_S, OVERLOAD_S = 4, overload.CALIBRATION_S + 4 * overload.EDGE_S + overload.SECONDS
WORKERS_DEADLINE_S, STOP_TIMEOUT_S = 15, 20.0
#: Open files the benchmark asks for (gevent and eventlet run at 1000 connections).
WANTED_NOFILE = 65536


def main(argv: list[str]) -> int:
    # TERM and HUP end the benchmark as Ctrl-C does: the running server and wrk stop too.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    try:
        return _main(parse_options(argv))
    except BenchError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr, flush=True)
        return 130


say = functools.partial(print, flush=True)


def _check_environment(options: Options) -> str:
    """wrk's path; BenchError for what is missing."""
    if options.peers and "engine" not in options.sections:
        raise UsageError("--peers is for the engine section (add engine to --sections)")
    needed = {"matplotlib": "pip install -e '.[bench]', or pass --no-plot"} if options.plot else {}
    for cls in {"gevent", "eventlet"} & set(options.classes):
        needed[cls] = f"pip install -e '.[{cls}]', or leave {cls} out of --classes"
    for module, hint in needed.items():
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"{module} is not installed for {sys.executable} ({hint})")
    wrk = harness.find_wrk()
    if wrk is None:
        raise BenchError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    if "overload" in options.sections and harness.NGINX is None:
        raise BenchError(f"the overload section needs nginx: {harness.NGINX_MISSING}")
    try:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / ".bench-write-test").write_text("")
        (options.out / ".bench-write-test").unlink()
    except OSError as exc:
        raise BenchError(f"cannot write to --out {options.out}: {exc.strerror}") from None
    return wrk


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by servers and wrk); the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(hard, WANTED_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(pinning: Pinning, wrk: str) -> dict[str, str]:
    """What the result page says of the machine, by row."""
    model = platform.processor() or "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("model name", "Processor", "cpu model"):
            model = value.strip()
    packages = ("microsvc", "gunicorn", "flask", "gevent", "eventlet")
    return {
        "CPU": model,
        "CPUs": f"{os.cpu_count()} logical on the host (`os.cpu_count()`), "
        f"{len(pinning.available)} available to the bench",
        "pinning": pinning.describe(),
        "memory": f"{psutil.virtual_memory().total / 1024**3:.1f} GiB",
        "kernel": platform.release(),
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": ", ".join(f"{name} {_version(name)}" for name in packages),
        "wrk": f"{wrk}, {pinning.wrk_threads} threads (one a CPU of its own when pinned), "
        "`--timeout 5s`, Lua script for exact counts and latency percentiles",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _rounds(options: Options, group: list[Point]) -> int:
    """--repeat; the overload section runs once (its targets are for its own load)."""
    return 1 if group[0].section == "overload" else options.repeat


def _main(options: Options) -> int:
    wrk = _check_environment(options)
    per_core = all(SECTIONS[name].per_core for name in options.sections)
    pinning = choose_pinning(options.pin, per_core=per_core)
    nofile = raise_open_files_limit()
    granian = install_granian(say) if "granian" in options.peers else None
    try:
        plan = build_plan(options, pinning, granian)
    except Exception as exc:  # microsvc's planning refused: say why in one line
        raise BenchError(f"microsvc could not plan: {exc}") from None
    machine = machine_info(pinning, harness.wrk_version(wrk))
    runs = sum(len(group) * _rounds(options, group) for group in plan.groups)
    overloaded = sum(p.section == "overload" for p in plan.points)
    seconds = runs * (options.duration + options.warmup + RUN_OVERHEAD_S) + OVERLOAD_S * overloaded
    say(f"scripts/bench {options.label}: {machine['CPU']}, {machine['CPUs']}")
    say(f"pinning: {pinning.describe()}")
    say(f"microsvc plans for {plan.usable_cpus} usable CPUs; guide's -w {plan.guide_workers}")
    for line in plan.skipped + ([f"warning: {nofile} open files at most"] if nofile < 1200 else []):
        say(line)
    say(f"{len(plan.points)} points, {runs} runs, about {seconds / 60:.0f} min")
    with tempfile.TemporaryDirectory(prefix="msvc-bench-", dir="/tmp") as tmp:
        runner = _Runner(options, harness.Wrk(Path(tmp), wrk), Path(tmp), runs)
        for group in plan.groups:  # in each group, every point once per round (ABAB...)
            for round_number in range(1, _rounds(options, group) + 1):
                for point in group:
                    point.runs.append(runner.run_point(point, round_number))
                    time.sleep(0.2)  # let the closed sockets settle between runs
    results = Results(options, plan, machine, compute_ratios(plan.points))
    md, js, png = (options.out / f"{options.label}.{ext}" for ext in ("md", "json", "png"))
    write_json(results, js)
    md.write_text(render_markdown(results, png.name if options.plot else None))
    try:
        if options.plot:
            write_png(results, png)
    except Exception as exc:  # matplotlib failing must not hide the numbers written
        raise BenchError(f"could not draw {png}: {exc}") from None
    rows = [[r.kind, r.subject, r.shown(), r.target, r.status] for r in results.ratios]
    say("\n".join(["", *table(["ratio", "subject", "value", "target", "result"], rows)]))
    failed = sum(len(point.failures) for point in plan.points)
    missed = sum(1 for ratio in results.ratios if ratio.status == "MISS")
    say(f"wrote {md}, {js}" + (f", {png}" if options.plot else ""))
    problems = [f"{failed} runs failed (see the Markdown file)"] * bool(failed)
    for line in problems + [f"{missed} targets missed"] * bool(missed):
        say(line)
    return 1 if options.strict and (failed or missed) else 0


@dataclass
class _Runner:
    options: Options
    wrk: harness.Wrk
    workdir: Path
    total: int
    done: int = 0
    #: The overload section's capacity, measured through the first server.
    capacity: float | None = None

    def run_point(self, point: Point, round_number: int) -> Run:
        """Start the server (pinned; control sockets in a directory of the run, never
        another instance's), wait until it answers 200 (its metrics endpoint too) and has
        its workers (the metrics exporter is a child of the master too), read their
        memory, measure, stop."""
        run, expected = Run(round_number), point.workers + ("--metrics" in point.command.argv)
        port, run_dir, stage = harness.free_port(), self.workdir / "run", "start"
        run_dir.mkdir(mode=0o700, exist_ok=True)
        argv = harness.taskset(point.pinning.server_cpus)
        argv += point.command.render(port, self.workdir, run_dir)
        env, log = harness.clean_env({"XDG_RUNTIME_DIR": str(run_dir)}), run_dir / f"{port}.log"
        server = None
        try:
            server = harness.start_server(argv, port=port, log_path=log, env=env, cwd=self.workdir)
            server.wait_ready(point.command.ready_path, self.options.start_timeout, status=200)
            if "--metrics" in point.command.argv:
                # The exporter is a fresh interpreter on the server's CPU: measured once
                # it serves, not while it starts.
                server.wait_metrics(self.options.start_timeout)
            stage, seen = "load", server.wait_workers(expected, 0.5, WORKERS_DEADLINE_S)
            if seen != expected:
                run.notes.append(f"expected {expected} children, the master had {seen}")
            run.result = {"idle_uss_bytes": server.worker_uss(), **self.measure(point, server)}
            run.ok = True
        except harness.HarnessError as exc:  # its message may hold whole logs: one line
            why = str(exc).splitlines()[0]
            if stage == "start" and server:
                why = f"{why.partition(': ')[0]}: {server.log_tail()}"
            run.error = f"{stage}: {why}"
        finally:
            if server and not server.kill_leftovers(STOP_TIMEOUT_S):
                run.notes.append(f"did not stop within {STOP_TIMEOUT_S:.0f} s of TERM: killed")
        self.done += 1
        r, head = run.result, f"[{self.done:>3}/{self.total}] {point.worker_class:<8} "
        head += f"{point.path:<10} {point.config:<30} w={point.workers:<3} c={point.connections:<5}"
        figures = f"{r.get('rps', 0):>9,.0f} rps  p50 {r.get('p50_ms', 0):.2f} ms  p99 "
        figures += f"{r.get('p99_ms', 0):.2f} ms  errors {r.get('socket_errors')}/{r.get('non2xx')}"
        say(f"{head} round {run.round}: {figures if run.ok else f'FAILED {run.error}'}")
        return run

    def measure(self, point: Point, server: harness.Server) -> dict[str, Any]:
        """wrk's figures after the warm-up, and the server's CPU use meanwhile; for the
        overload section, `harness.overload`'s (rps: successes a second, non-2xx: 503s and
        other statuses), the capacity measured through the first server."""
        url, cpus = server.url + point.path, point.pinning.wrk_cpus
        if point.section == "overload":
            at, capacity = (f"overload-{self.done}", server, self.wrk, self.workdir), self.capacity
            got = overload.measure(*at, capacity_rps=capacity, cpus=cpus)
            self.capacity = got.capacity_rps
            errors = len(got.shed) + sum(got.other.values())
            figures = {"rps": got.ok_rps, "p50_ms": got.ok_p50 * 1000, "p99_ms": got.ok_p99 * 1000}
            return got.as_dict() | figures | {"socket_errors": got.socket_errors, "non2xx": errors}
        load = {"connections": point.connections, "threads": point.pinning.wrk_threads}
        for seconds in (s for s in (self.options.warmup, self.options.duration) if s):
            cpu, wall = server.cpu_seconds(), time.monotonic()
            result = self.wrk.run(url, seconds=seconds, cpus=cpus, **load)
        busy = (server.cpu_seconds() - cpu) / (time.monotonic() - wall)
        return result.as_dict() | {"cpu_busy": busy}
