"""`scripts/bench`: run every point, write the result files, print the ratios.

Exit status: 0 after a completed run (a missed target prints MISS), 1 on a runtime
failure (or, with --strict, a missed target or a failed run), 2 on a bad command line.
"""

from __future__ import annotations

import importlib.util
import resource
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from benchlib.engine import (
    add_engine_points,
    check_engine_option,
    draw_engine,
    engine_markdown,
    engine_ratios,
    install_granian,
)
from benchlib.errors import BenchError
from benchlib.machine import Pinning, choose_pinning, machine_info, raise_open_files_limit
from benchlib.options import Options, parse_options
from benchlib.overload import (
    ESTIMATE_S,
    check_overload_option,
    draw_overload,
    overload_failures,
    overload_markdown,
    overload_ratios,
    run_overload,
)
from benchlib.points import ASYNC_IO_CONNECTIONS, Plan, Point, Run, build_plan
from benchlib.report import (
    Results,
    compute_ratios,
    ratio_table,
    render_markdown,
    write_json,
    write_png,
)
from harness import HarnessError, Wrk, clean_env, find_wrk, free_port, start_server, taskset
from harness import wrk_version as read_wrk_version

#: Seconds a run takes beyond warm-up and measurement (start, stop), for the estimate.
RUN_OVERHEAD_S = 4
#: Seconds to wait for a server's worker count to settle.
WORKERS_DEADLINE_S = 15
#: Seconds a server may take to stop after TERM before its group is killed.
STOP_TIMEOUT_S = 20.0


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    # TERM and HUP end the benchmark as Ctrl-C does: the running server and wrk are
    # stopped on the way out.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGHUP, _interrupted)
    try:
        return _main(argv)
    except BenchError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr, flush=True)
        return 130


def say(text: str = "") -> None:
    print(text, flush=True)


def _check_environment(options: Options) -> str:
    wrk = find_wrk()
    if wrk is None:
        raise BenchError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    needed = {"microsvc": "pip install -e .", "gunicorn": "pip install -e ."}
    if options.plot:
        needed["matplotlib"] = "pip install -e '.[bench]', or pass --no-plot"
    for cls in ("gevent", "eventlet"):
        if cls in options.classes:
            needed[cls] = f"pip install -e '.[{cls}]', or leave {cls} out of --classes"
    for module, hint in needed.items():
        if importlib.util.find_spec(module) is None:
            raise BenchError(f"{module} is not installed for {sys.executable} ({hint})")
    check_engine_option(options.peers, options.sections)
    check_overload_option(options.sections)
    return wrk


def _prepare_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".bench-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"cannot write to --out {out}: {exc.strerror}") from None


def _wrk_threads(pinning: Pinning) -> int:
    if pinning.wrk_cpus:
        return len(pinning.wrk_cpus)
    return max(1, min(4, len(pinning.available)))


def _main(argv: list[str]) -> int:
    options = parse_options(argv)
    wrk = _check_environment(options)
    _prepare_out(options.out)
    pinning = choose_pinning(options.pin, per_core=options.sections == ("engine",))
    nofile = raise_open_files_limit()
    try:
        plan = build_plan(options, pinning.server_cpus)
    except Exception as exc:  # microsvc's planning refused: say why in one line
        raise BenchError(f"microsvc could not plan: {exc}") from None
    if "engine" in options.sections:
        granian = install_granian(say) if "granian" in options.peers else None
        add_engine_points(plan, options, granian)
    machine = machine_info(pinning, read_wrk_version(wrk), nofile)
    results = Results(options, plan, machine, _wrk_threads(pinning))

    runs = len(plan.points) * options.repeat
    estimate = runs * (options.duration + options.warmup + RUN_OVERHEAD_S)
    if "overload" in options.sections:
        estimate += ESTIMATE_S
    say(f"scripts/bench {options.label}: {machine['cpu_model']}, {machine['host_cpus']} CPUs")
    say(f"pinning: {pinning.describe()}")
    say(
        f"microsvc plans for {plan.usable_cpus} usable CPUs; guide's command: "
        f"-w {plan.guide_workers} (2 x os.cpu_count() + 1)"
    )
    for item in plan.skipped:
        say(item)
    if nofile[0] != resource.RLIM_INFINITY and nofile[0] < ASYNC_IO_CONNECTIONS + 200:
        say(f"warning: open files limit is {nofile[0]}: 1000 connections may fail")
    say(
        f"{len(plan.points)} points x {options.repeat} = {runs} runs"
        + (" and the overload section" if "overload" in options.sections else "")
        + f", about {estimate / 60:.0f} min"
    )

    with tempfile.TemporaryDirectory(prefix="msvc-bench-", dir="/tmp") as tmp:
        runner = _Runner(options, plan, pinning, Wrk(Path(tmp), wrk), Path(tmp), runs)
        runner.run_all()
        if "overload" in options.sections:
            plan.overload = run_overload(
                options, pinning, runner.wrk, runner.workdir, runner.runtime_dir, runner.env, say
            )

    results.ratios = compute_ratios(results) + engine_ratios(results) + overload_ratios(results)

    paths = [options.out / f"{options.label}.{ext}" for ext in ("md", "json", "png")]
    md_path, json_path, png_path = paths
    write_json(results, json_path)
    md_path.write_text(
        render_markdown(
            results,
            png_path.name if options.plot else None,
            engine_markdown(results) + overload_markdown(results),
        )
    )
    if options.plot:
        try:
            extra = draw_engine if plan.engine else draw_overload if plan.overload else None
            write_png(results, png_path, extra)
        except Exception as exc:  # matplotlib failing must not hide the numbers written
            raise BenchError(f"could not draw {png_path}: {exc}") from None

    say()
    say("ratios:")
    for line in ratio_table(results.ratios) if results.ratios else ["  (none: see --sections)"]:
        say(f"  {line}")
    for item in plan.skipped:
        say(item)
    failed = sum(1 for point in plan.points for run in point.runs if not run.ok)
    failed += overload_failures(results)
    missed = sum(1 for ratio in results.ratios if ratio.status == "MISS")
    say()
    say("wrote " + ", ".join(str(path) for path in paths[: 3 if options.plot else 2]))
    if failed:
        runs += len(plan.overload.get("commands", {}))
        say(f"{failed} of {runs} runs failed (see the Markdown file)")
    if missed:
        say(f"{missed} target(s) missed")
    return 1 if options.strict and (failed or missed) else 0


@dataclass
class _Runner:
    options: Options
    plan: Plan
    pinning: Pinning
    wrk: Wrk
    workdir: Path
    total: int
    done: int = 0

    def __post_init__(self) -> None:
        # Control sockets go to runtime_dir, so they never touch another instance's.
        self.runtime_dir = self.workdir / "run"
        self.runtime_dir.mkdir(mode=0o700)
        self.env = clean_env({"XDG_RUNTIME_DIR": str(self.runtime_dir)})

    def run_all(self) -> None:
        """Group by group; in each, every point once per round (ABAB...)."""
        for group in self.plan.groups:
            for round_number in range(1, self.options.repeat + 1):
                for point in group:
                    run = self.run_point(point, round_number)
                    point.runs.append(run)
                    self.done += 1
                    self.report(point, run)
                    time.sleep(0.2)  # let the closed sockets settle between runs

    def run_point(self, point: Point, round_number: int) -> Run:
        """Start the server (pinned), wait until it answers 200 and has its workers, read
        their memory, warm up, measure, stop."""
        pinning = point.pinning or self.pinning
        port = free_port()
        argv = point.command.render(port, self.workdir, self.runtime_dir)
        name = f"{point.section}-{point.worker_class}-{point.workers}-{port}"
        run = Run(round_number, ok=False)
        try:
            server = start_server(
                taskset(pinning.server_cpus) + argv,
                port=port,
                log_path=self.workdir / f"{name}.log",
                env=self.env,
                cwd=self.workdir,
            )
        except HarnessError as exc:
            run.error = f"start: {exc}"
            return run
        try:
            try:
                server.wait_ready(point.command.ready_path, self.options.start_timeout, status=200)
            except HarnessError as exc:  # its message holds the whole log: keep one line
                run.error = f"start: {str(exc).partition(': ')[0]}: {server.log_tail()}"
                return run
            run.workers_seen = server.wait_workers(point.workers, 0.5, WORKERS_DEADLINE_S)
            if run.workers_seen != point.workers:
                run.notes.append(
                    f"expected {point.workers} workers, the master had {run.workers_seen}"
                )
            run.idle_uss_bytes = server.worker_uss()
            url = server.url + point.path
            load = {"connections": point.connections, "threads": _wrk_threads(pinning)}
            if self.options.warmup:
                self.wrk.run(url, seconds=self.options.warmup, cpus=pinning.wrk_cpus, **load)
            cpu, wall = server.cpu_seconds(), time.monotonic()
            result = self.wrk.run(url, seconds=self.options.duration, cpus=pinning.wrk_cpus, **load)
            cpu, wall = server.cpu_seconds() - cpu, time.monotonic() - wall
            run.ok, run.result = True, result.as_dict()
            run.cpu_busy = cpu / wall if wall > 0 else None
        except HarnessError as exc:
            run.error = f"load: {str(exc).splitlines()[0]}"
        finally:
            if not server.kill_leftovers(STOP_TIMEOUT_S):
                run.notes.append(f"did not stop within {STOP_TIMEOUT_S:.0f} s of TERM: killed")
        return run

    def report(self, point: Point, run: Run) -> None:
        head = (
            f"[{self.done:>3}/{self.total}] {point.worker_class:<8} {point.path:<10} "
            f"{point.config:<34} w={point.workers:<3} c={point.connections:<5} "
            f"round {run.round}:"
        )
        if run.ok and run.result:
            r = run.result
            say(
                f"{head} {r['rps']:>9,.0f} rps  p50 {r['p50_ms']:.2f} ms  "
                f"p99 {r['p99_ms']:.2f} ms  errors {r['socket_errors']}/{r['non2xx']}"
            )
        else:
            say(f"{head} FAILED {run.error}")
