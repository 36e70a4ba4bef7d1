"""The overload section: load shedding on queue time against plain gunicorn, behind nginx.

The measurement is `harness.overload`, which the reliability test
`tests/reliability/test_rel_overload.py` runs too: one instance behind a real nginx (the
output of `microsvc nginx`), sync, 2 workers, the demo's `/io?ms=100`; its capacity
measured through nginx first, then about three times that offered for 20 s by paced wrk
connections; the figures from nginx's access log, rates in the steady part of the run.

- microsvc: `microsvc run -k sync --workers 2 --max-queue-time 1s`;
- gunicorn: plain gunicorn with the gunicorn settings microsvc computes for
  `-k sync --workers 2` (`benchlib.points.plain_command`), no shedding.

The capacity is measured once, through the first server that starts, and both servers'
successes are counted against it. The section runs once whatever `--repeat`,
`--duration` and `--warmup` say: its targets are for that load and that length.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from benchlib.errors import BenchError
from benchlib.machine import Pinning
from benchlib.options import Options
from benchlib.points import ServerCommand, microsvc_run, microsvc_setup, plain_command, system_facts
from benchlib.report import Ratio, Results, table
from harness import NGINX, NGINX_MISSING, HarnessError, Wrk, free_port, start_server, taskset
from harness import overload as measurement

#: Seconds the section takes: two servers, the capacity once, the load for each.
ESTIMATE_S = int(2 * (measurement.SECONDS + 8) + measurement.CALIBRATION_S + 2 * measurement.EDGE_S)
#: Seconds a server may take to stop after TERM before its group is killed.
STOP_TIMEOUT_S = 20.0

SHEDDING = "microsvc --max-queue-time 1s"
QUEUEING = "gunicorn, microsvc's settings"


def check_overload_option(sections: tuple[str, ...]) -> None:
    """BenchError when the section runs where nginx is missing."""
    if "overload" in sections and NGINX is None:
        raise BenchError(f"the overload section needs nginx: {NGINX_MISSING}")


def overload_commands(pinning: Pinning) -> dict[str, ServerCommand]:
    """The two servers of the section, by name."""
    workers = measurement.WORKERS
    setup = microsvc_setup("sync", workers, system_facts(pinning.server_cpus))
    limit = f"{measurement.MAX_QUEUE_TIME_S:g}s"
    return {
        "microsvc": microsvc_run("sync", workers, "--max-queue-time", limit),
        "gunicorn": plain_command(setup),
    }


def run_overload(
    options: Options,
    pinning: Pinning,
    wrk: Wrk,
    workdir: Path,
    runtime_dir: Path,
    env: Mapping[str, str],
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Both servers in turn, each behind nginx; what the result files need (the figures
    by server, the commands, and an error line for a server that failed)."""
    commands = overload_commands(pinning)
    section: dict[str, Any] = {
        "load": (
            f"{measurement.OVERLOAD} x capacity for {measurement.SECONDS:g} s, "
            f"{measurement.CONNECTIONS} connections pausing {measurement.PAUSE_S:g} s "
            f"between requests, `{measurement.PATH}`"
        ),
        "commands": {name: command.display for name, command in commands.items()},
        "servers": {},
        "errors": {},
    }
    capacity: float | None = None
    for name, command in commands.items():
        port = free_port()
        argv = command.render(port, workdir, runtime_dir)
        try:
            server = start_server(
                taskset(pinning.server_cpus) + argv,
                port=port,
                log_path=workdir / f"overload-{name}-{port}.log",
                env=env,
                cwd=workdir,
            )
        except HarnessError as exc:
            section["errors"][name] = f"start: {exc}"
            continue
        try:
            server.wait_ready(command.ready_path, options.start_timeout, status=200)
            outcome = measurement.measure(
                name, server, wrk, workdir, capacity_rps=capacity, cpus=pinning.wrk_cpus
            )
        except HarnessError as exc:  # its message holds whole logs: keep one line
            section["errors"][name] = f"{str(exc).splitlines()[0][:300]}: {server.log_tail()}"
            say(f"overload {name}: FAILED {section['errors'][name]}")
            continue
        finally:
            server.kill_leftovers(STOP_TIMEOUT_S)
        capacity = outcome.capacity_rps
        section["servers"][name] = outcome.as_dict()
        say(f"overload {outcome.line()}")
    section["capacity_rps"] = capacity
    return section


def overload_failures(results: Results) -> int:
    """Servers of the section that could not be measured."""
    return len(results.plan.overload.get("errors", {})) if results.plan.overload else 0


def overload_ratios(results: Results) -> list[Ratio]:
    """microsvc's targets (successes >= 0.9 x capacity, their p99 <= 1.5 s) and gunicorn's
    same figures, shown."""
    section = results.plan.overload
    if not section:
        return []
    goodput, target = measurement.TARGET_GOODPUT, measurement.TARGET_P99_S
    ratios: list[Ratio] = []
    for name, subject in (("microsvc", SHEDDING), ("gunicorn", QUEUEING)):
        figures = section["servers"].get(name)
        judged = name == "microsvc"
        kinds = (
            ("overload: successes / capacity", f">= {goodput:.2f}", "goodput"),
            ("overload: success p99 (s)", f"<= {target:.2f}", "ok_p99_s"),
        )
        for kind, wanted, key in kinds:
            shown = wanted if judged else "none (shown)"
            if figures is None:
                why = section["errors"].get(name, "not run")
                ratios.append(Ratio(kind, subject, None, shown, "n/a", why))
                continue
            value = float(figures[key])
            ok = value >= goodput if key == "goodput" else value <= target
            result = ("PASS" if ok else "MISS") if judged else "info"
            detail = (
                f"{figures['ok_rps']:.1f} successes/s / {figures['capacity_rps']:.1f} rps capacity"
                if key == "goodput"
                else f"{figures['ok']} successes, p50 {figures['ok_p50_s']:.3f} s"
            )
            ratios.append(Ratio(kind, subject, value, shown, result, detail))
    return ratios


def overload_markdown(results: Results) -> list[str]:
    """The section's own table: per server, the offered rate, the successes, the 503s."""
    section = results.plan.overload
    if not section:
        return []
    rows: list[list[str]] = []
    for name, subject in (("microsvc", SHEDDING), ("gunicorn", QUEUEING)):
        f = section["servers"].get(name)
        if f is None:
            rows.append([subject, "failed: " + section["errors"].get(name, "not run")] + [""] * 8)
            continue
        other = sum(f["other"].values()) + f["socket_errors"]
        rows.append(
            [
                subject,
                f"{f['offered_rps']:.1f}",
                f"{f['ok_rps']:.1f}",
                f"{f['goodput']:.2f}",
                f"{f['ok_p50_s']:.3f}",
                f"{f['ok_p99_s']:.3f}",
                str(f["shed"]),
                f"{f['shed_p99_s']:.3f}" if f["shed"] else "-",
                str(other),
                ", ".join(f"{status}: {count}" for status, count in f["other"].items()) or "-",
            ]
        )
    header = ["server", "offered rps", "successes/s", "x capacity", "success p50 s"]
    header += ["success p99 s", "503", "503 p99 s", "other errors", "other statuses"]
    capacity = section.get("capacity_rps")
    commands = "; ".join(f"`{command}`" for command in section["commands"].values())
    return [
        "## Overload",
        "",
        f"Each server behind a real nginx (`microsvc nginx` output, access log "
        f"`$msec $status $request_time`): {commands}. Capacity, measured through nginx in "
        f"this run: {f'{capacity:.1f} rps' if capacity else '-'}. Load: {section['load']}. "
        "Figures from nginx's access log (what the client waited), rates in the steady part "
        f"of the run ({measurement.EDGE_S:g} s left out at each end). Other errors: "
        "statuses other than 200 and 503 (499, wrk leaving at the end, not counted), and "
        "wrk's socket errors.",
        "",
        *table(header, rows),
    ]


def draw_overload(results: Results, ax_rate: Any, ax_p99: Any) -> None:
    """Bars per server: offered rate and successes a second (the capacity as a line);
    success p99 (the target as a line)."""
    section = results.plan.overload
    names = list(section.get("servers", {}))
    figures = [section["servers"][name] for name in names]
    xs = range(len(names))
    for offset, key, color, label in (
        (-0.2, "offered_rps", "tab:gray", "offered"),
        (0.2, "ok_rps", "tab:green", "successes"),
    ):
        bars = ax_rate.bar([x + offset for x in xs], [f[key] for f in figures], 0.4, color=color)
        bars.set_label(label)
        ax_rate.bar_label(bars, fmt="%.1f", fontsize="small")
    if section.get("capacity_rps"):
        ax_rate.axhline(section["capacity_rps"], color="tab:red", linestyle="--", label="capacity")
    bars = ax_p99.bar(list(xs), [f["ok_p99_s"] for f in figures], 0.5, color="tab:blue")
    ax_p99.bar_label(bars, fmt="%.2f", fontsize="small")
    ax_p99.axhline(measurement.TARGET_P99_S, color="tab:red", linestyle="--", label="target")
    for ax, title, unit in (
        (ax_rate, "overload: requests / s", "requests / s"),
        (ax_p99, "overload: success p99", "seconds"),
    ):
        ax.set_xticks(list(xs), names)
        ax.set(title=title, ylabel=unit)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="small")
