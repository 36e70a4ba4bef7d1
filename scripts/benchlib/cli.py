"""`scripts/bench`: run every point, write the result files, print the ratios.

Exit status: 0 after a completed run (a missed target prints MISS), 1 on a runtime
failure (or, with --strict, a missed target or a failed run), 2 on a bad command line.
"""

from __future__ import annotations

import importlib.util
import resource
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from benchlib.engine import (
    add_engine_points,
    check_engine_option,
    draw_engine,
    engine_markdown,
    engine_pinning,
    engine_ratios,
    install_granian,
)
from benchlib.errors import BenchError, RunError
from benchlib.machine import Pinning, choose_pinning, machine_info, raise_open_files_limit
from benchlib.options import Options, parse_options
from benchlib.points import ASYNC_IO_CONNECTIONS, Plan, Point, Run, build_plan
from benchlib.report import (
    Results,
    compute_ratios,
    ratio_table,
    render_markdown,
    summarize,
    write_json,
    write_png,
)
from benchlib.servers import server_env, start_server, worker_uss
from benchlib.wrk import LUA_SCRIPT, LoadSpec, find_wrk, run_wrk, wrk_version

#: Seconds a run takes beyond warm-up and measurement (start, stop), for the estimate.
RUN_OVERHEAD_S = 4

#: Seconds to wait for a server's worker count to settle.
WORKERS_DEADLINE_S = 15


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
    return wrk


def _prepare_out(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"cannot create --out {out}: {exc.strerror}") from None
    probe = out / ".bench-write-test"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise BenchError(f"cannot write to --out {out}: {exc.strerror}") from None
    return out


def _pinning(options: Options) -> Pinning:
    if options.sections == ("engine",):
        return engine_pinning(options.pin)
    pinning = choose_pinning(options.pin)
    if pinning.pinned and shutil.which("taskset") is None:
        return Pinning(pinning.available, reason="taskset is not installed")
    return pinning


def _wrk_threads(pinning: Pinning) -> int:
    if pinning.wrk_cpus:
        return len(pinning.wrk_cpus)
    return max(1, min(4, len(pinning.available)))


def _main(argv: list[str]) -> int:
    options = parse_options(argv)
    wrk = _check_environment(options)
    out = _prepare_out(options.out)
    pinning = _pinning(options)
    nofile = raise_open_files_limit()
    try:
        plan = build_plan(options, pinning.server_cpus)
    except Exception as exc:  # microsvc's planning refused: say why in one line
        raise BenchError(f"microsvc could not plan: {exc}") from None
    if "engine" in options.sections:
        granian = install_granian(say) if "granian" in options.peers else None
        add_engine_points(plan, options, granian)
    machine = machine_info(pinning, wrk_version(wrk), nofile)
    results = Results(options, plan, machine, _wrk_threads(pinning))

    runs = len(plan.points) * options.repeat
    estimate = runs * (options.duration + options.warmup + RUN_OVERHEAD_S)
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
        f"{len(plan.points)} points x {options.repeat} = {runs} runs, about {estimate / 60:.0f} min"
    )

    with tempfile.TemporaryDirectory(prefix="msvc-bench-", dir="/tmp") as tmp:
        workdir = Path(tmp)
        runtime_dir = workdir / "run"
        runtime_dir.mkdir(mode=0o700)
        script = workdir / "bench.lua"
        script.write_text(LUA_SCRIPT)
        runner = _Runner(options, plan, pinning, wrk, script, workdir, runtime_dir, runs)
        runner.run_all()

    for point in plan.points:
        results.summaries[point.key] = summarize(point)
    results.ratios = compute_ratios(results) + engine_ratios(results)

    md_path = out / f"{options.label}.md"
    json_path = out / f"{options.label}.json"
    png_path = out / f"{options.label}.png"
    write_json(results, json_path)
    md_path.write_text(
        render_markdown(results, png_path.name if options.plot else None, engine_markdown(results))
    )
    if options.plot:
        try:
            write_png(results, png_path, draw_engine if plan.engine else None)
        except Exception as exc:  # matplotlib failing must not hide the numbers written
            raise BenchError(f"could not draw {png_path}: {exc}") from None

    say()
    say("ratios:")
    for line in ratio_table(results.ratios) if results.ratios else ["  (none: see --sections)"]:
        say(f"  {line}")
    for item in plan.skipped:
        say(item)
    failed = sum(1 for point in plan.points for run in point.runs if not run.ok)
    missed = sum(1 for ratio in results.ratios if ratio.status == "MISS")
    say()
    written = [md_path, json_path] + ([png_path] if options.plot else [])
    say("wrote " + ", ".join(str(path) for path in written))
    if failed:
        say(f"{failed} of {runs} runs failed (see the Markdown file)")
    if missed:
        say(f"{missed} target(s) missed")
    if options.strict and (failed or missed):
        return 1
    return 0


class _Runner:
    def __init__(
        self,
        options: Options,
        plan: Plan,
        pinning: Pinning,
        wrk: str,
        script: Path,
        workdir: Path,
        runtime_dir: Path,
        total: int,
    ) -> None:
        self.options = options
        self.plan = plan
        self.pinning = pinning
        self.wrk = wrk
        self.script = script
        self.workdir = workdir
        self.runtime_dir = runtime_dir
        self.env = server_env(runtime_dir)
        self.total = total
        self.done = 0

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
        url = f"http://127.0.0.1:{{port}}{point.path}"
        name = f"{point.section}-{point.worker_class}-{point.workers}"
        pinning = point.pinning or self.pinning
        try:
            server = start_server(
                point.command,
                cpus=pinning.server_cpus,
                env=self.env,
                workdir=self.workdir,
                runtime_dir=self.runtime_dir,
                expected_workers=point.workers,
                start_timeout=self.options.start_timeout,
                workers_deadline=WORKERS_DEADLINE_S,
                name=name,
            )
        except RunError as exc:
            return Run(round_number, ok=False, error=f"start: {exc}")
        uss = worker_uss(server.proc.pid)
        try:
            target = url.format(port=server.port)
            if self.options.warmup:
                run_wrk(
                    self.wrk, self.script, self._load(pinning, point, target, self.options.warmup)
                )
            result = run_wrk(
                self.wrk, self.script, self._load(pinning, point, target, self.options.duration)
            )
        except RunError as exc:
            return Run(
                round_number,
                ok=False,
                error=f"load: {exc}",
                workers_seen=server.workers_seen,
                idle_uss_bytes=uss,
                notes=server.notes,
            )
        finally:
            server.stop()
        return Run(
            round_number,
            ok=True,
            result=result.as_dict(),
            workers_seen=server.workers_seen,
            idle_uss_bytes=uss,
            notes=server.notes,
        )

    def _load(self, pinning: Pinning, point: Point, url: str, duration: int) -> LoadSpec:
        threads = _wrk_threads(pinning)
        return LoadSpec(url, point.connections, threads, duration, pinning.wrk_cpus)

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
