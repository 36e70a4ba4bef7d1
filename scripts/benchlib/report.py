"""Medians, ratios against their targets, and the result files (Markdown, JSON, PNG)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.options import CLASSES, ENDPOINTS, Options
from benchlib.points import ASYNC_IO_CONNECTIONS, IO_WAIT_S, Plan, Point

TARGET_OVERHEAD = 0.98
TARGET_AUTO_BEST = 0.95
TARGET_GTHREAD_IO = 0.90
TARGET_ASYNC_IO = 0.90


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

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non2xx

    @property
    def ok(self) -> bool:
        return self.rps is not None


def summarize(point: Point) -> Summary:
    good = [run.result for run in point.runs if run.ok and run.result]
    failures = tuple(run.error or "failed" for run in point.runs if not run.ok)
    uss = [run.idle_uss_bytes for run in point.runs if run.idle_uss_bytes is not None]

    def median(name: str) -> float | None:
        return statistics.median(float(result[name]) for result in good) if good else None

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
    )


@dataclass
class Ratio:
    kind: str
    subject: str
    value: float | None
    target: str
    status: str  # PASS, MISS, info, n/a
    detail: str

    def shown_value(self) -> str:
        if self.value is None:
            return "-"
        if self.kind == "errors at 1000 connections":
            return f"{self.value:.0f}"
        if self.kind.endswith("(MB)"):
            return f"{self.value:+.1f}"
        return f"{self.value:.3f}"


@dataclass
class Results:
    options: Options
    plan: Plan
    machine: dict[str, Any]
    wrk_threads: int
    summaries: dict[str, Summary] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)

    def summary(self, point: Point) -> Summary:
        return self.summaries[point.key]


def _find(points: Sequence[Point], section: str) -> Point | None:
    return next((point for point in points if point.section == section), None)


def _ratio(
    kind: str,
    subject: str,
    top: tuple[Point, Summary] | None,
    bottom: tuple[Point, Summary] | None,
    target: float | None,
) -> Ratio | None:
    if top is None or bottom is None:
        return None
    (top_point, top_sum), (bottom_point, bottom_sum) = top, bottom
    detail = (
        f"{top_point.config}: {_rps(top_sum.rps)} rps / "
        f"{bottom_point.config}: {_rps(bottom_sum.rps)} rps"
    )
    if not top_sum.ok or not bottom_sum.ok or not bottom_sum.rps:
        return Ratio(kind, subject, None, _target(target), "n/a", detail + " (a point failed)")
    value = (top_sum.rps or 0.0) / bottom_sum.rps
    return Ratio(kind, subject, value, _target(target), _status(value, target), detail)


def _target(target: float | None) -> str:
    return f">= {target:.2f}" if target is not None else "none (shown)"


def _status(value: float, target: float | None) -> str:
    if target is None:
        return "info"
    return "PASS" if value >= target else "MISS"


def compute_ratios(results: Results) -> list[Ratio]:
    """Every ratio this run can give, from its own medians."""
    ratios: list[Ratio] = []
    by_group = {group[0].group: group for group in results.plan.groups}

    def with_summary(point: Point | None) -> tuple[Point, Summary] | None:
        return (point, results.summary(point)) if point else None

    for cls in CLASSES:
        for endpoint in ENDPOINTS:
            points = by_group.get(f"{cls}:{endpoint}")
            if not points:
                continue
            subject = f"{cls} {ENDPOINTS[endpoint]}"
            auto = with_summary(_find(points, "auto"))
            found = _ratio(
                "microsvc / plain gunicorn",
                subject,
                auto,
                with_summary(_find(points, "plain")),
                TARGET_OVERHEAD,
            )
            if found:
                ratios.append(found)
            sweep = [with_summary(p) for p in points if p.section == "sweep"]
            measured = [item for item in sweep if item and item[1].ok]
            if auto and sweep:
                best = max(measured, key=lambda item: item[1].rps or 0.0, default=None)
                target = TARGET_AUTO_BEST if endpoint == "data" else None
                found = _ratio("auto / best of sweep", subject, auto, best, target)
                if found is None:
                    found = Ratio(
                        "auto / best of sweep",
                        subject,
                        None,
                        _target(target),
                        "n/a",
                        "every sweep point failed",
                    )
                ratios.append(found)
            guide = with_summary(_find(points, "guide"))
            found = _ratio("auto / guide's command", subject, auto, guide, None)
            if found:
                ratios.append(found)
            found = _ratio(
                "metrics on / off", subject, with_summary(_find(points, "metrics")), auto, None
            )
            if found:
                ratios.append(found)
            fast = next((p for p in points if p.config.endswith("http_parser=fast")), None)
            slow = next((p for p in points if p.config.endswith("http_parser=python")), None)
            found = _ratio(
                "parser fast / python", subject, with_summary(fast), with_summary(slow), None
            )
            if found:
                ratios.append(found)

    ratios.extend(_io_ratios(results, by_group))
    order = [
        "microsvc / plain gunicorn",
        "auto / best of sweep",
        "gthread /io / ideal",
        "errors at 1000 connections",
        "async /io / /data",
        "auto / guide's command",
        "metrics on / off",
        "parser fast / python",
    ]
    ratios.sort(key=lambda ratio: order.index(ratio.kind))
    return ratios


def _io_ratios(results: Results, by_group: dict[str, list[Point]]) -> list[Ratio]:
    ratios: list[Ratio] = []
    gthread_io = _find(by_group.get("gthread:io", []), "auto")
    if gthread_io:
        summary = results.summary(gthread_io)
        ideal = gthread_io.workers * gthread_io.threads / IO_WAIT_S
        detail = (
            f"{_rps(summary.rps)} rps / ({gthread_io.workers} workers x "
            f"{gthread_io.threads} threads / {IO_WAIT_S * 1000:.0f} ms = {ideal:.0f})"
        )
        if summary.ok:
            value = (summary.rps or 0.0) / ideal
            status = _status(value, TARGET_GTHREAD_IO)
            ratios.append(
                Ratio(
                    "gthread /io / ideal",
                    "gthread /io",
                    value,
                    _target(TARGET_GTHREAD_IO),
                    status,
                    detail,
                )
            )
        else:
            ratios.append(
                Ratio(
                    "gthread /io / ideal",
                    "gthread /io",
                    None,
                    _target(TARGET_GTHREAD_IO),
                    "n/a",
                    detail + " (failed)",
                )
            )
    for cls in ("gevent", "eventlet"):
        io_point = _find(by_group.get(f"{cls}:io", []), "auto")
        if io_point is None:
            continue
        io_sum = results.summary(io_point)
        at = f"{io_point.connections} connections"
        if io_point.connections != ASYNC_IO_CONNECTIONS:
            at += f" (the target is for {ASYNC_IO_CONNECTIONS})"
        if io_sum.ok:
            status = "PASS" if io_sum.errors == 0 and not io_sum.failed else "MISS"
            ratios.append(
                Ratio(
                    "errors at 1000 connections",
                    f"{cls} /io",
                    float(io_sum.errors),
                    "0",
                    status,
                    f"socket errors {io_sum.socket_errors}, non-2xx {io_sum.non2xx} "
                    f"over {io_sum.runs} runs at {at}",
                )
            )
        data_point = _find(by_group.get(f"{cls}:data", []), "auto")
        if data_point is None:
            continue
        found = _ratio(
            "async /io / /data",
            f"{cls}",
            (io_point, io_sum),
            (data_point, results.summary(data_point)),
            TARGET_ASYNC_IO,
        )
        if found:
            found.detail = (
                f"/io at {at}: {_rps(io_sum.rps)} rps / /data: "
                f"{_rps(results.summary(data_point).rps)} rps"
            )
            ratios.append(found)
    return ratios


# --- formatting ----------------------------------------------------------------------


def _rps(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def ratio_table(ratios: Sequence[Ratio]) -> list[str]:
    """The ratios as aligned text lines for the terminal."""
    rows = [("ratio", "subject", "value", "target", "result")]
    rows += [(r.kind, r.subject, r.shown_value(), r.target, r.status) for r in ratios]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]


def render_markdown(results: Results, png_name: str | None, extra: Sequence[str] = ()) -> str:
    """The result page; `extra`: a section's own lines, after the targets."""
    options, plan, machine = results.options, results.plan, results.machine
    versions = machine["versions"]
    lines = [
        f"# Benchmark: {options.label}",
        "",
        f"Measured with `scripts/bench` on {machine['date']}. Compare configurations "
        "within this page (ratios from one run); absolute numbers depend on the machine "
        "and on what else ran on it.",
        "",
        "## Machine and method",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {_cell(machine['cpu_model'])} |",
        f"| CPUs | {machine['host_cpus']} logical on the host "
        f"(`os.cpu_count()`), {machine['available_cpus']} available to the bench |",
        f"| pinning | {_cell(machine['pinning'])} |",
        f"| usable CPUs for microsvc | {plan.usable_cpus} (what `--workers auto` plans for) |",
        f"| memory | {machine['memory']} |",
        f"| kernel | {machine['kernel']} |",
        f"| Python | {machine['python']} |",
        f"| versions | microsvc {versions['microsvc']}, gunicorn {versions['gunicorn']}, "
        f"flask {versions['flask']}, gevent {versions['gevent']}, eventlet "
        f"{versions['eventlet']}, gunicorn_h1c {versions['gunicorn_h1c']} |",
        f"| wrk | {_cell(machine['wrk'])}, {results.wrk_threads} threads, "
        f"`--timeout 5s`, Lua script for exact counts and latency percentiles |",
        f"| per run | {options.warmup} s warm-up, then {options.duration} s measured; "
        f"{options.repeat} run{'s' if options.repeat != 1 else ''} per point, interleaved "
        "with the points it is compared to; medians |",
        "| app | `microsvc.demo:app`: `/data` (small JSON), `/io?ms=50` (sleeps 50 ms) |",
        "",
        "Rerun:",
        "",
        "```sh",
        options.command_line(),
        "```",
        "",
    ]
    lines += _targets_section(results)
    lines += extra
    lines += _results_section(results)
    lines += _sweep_section(results, png_name)
    lines += _setup_section(results)
    return "\n".join(lines).rstrip() + "\n"


def _targets_section(results: Results) -> list[str]:
    lines = ["## Targets", ""]
    if not results.ratios:
        lines += ["No ratio could be computed from the sections that ran.", ""]
    else:
        lines += [
            "| ratio | subject | value | target | result | from |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in results.ratios:
            lines.append(
                f"| {r.kind} | {_cell(r.subject)} | {r.shown_value()} | {r.target} | "
                f"{r.status} | {_cell(r.detail)} |"
            )
        lines.append("")
    if not any(point.section != "engine" for point in results.plan.points):
        return [*lines, *(f"- {item}" for item in results.plan.skipped), ""]
    lines += [
        "- microsvc / plain gunicorn: `microsvc run --workers auto` against plain gunicorn "
        "with the same gunicorn settings (what the launcher itself costs); target >= 0.98.",
        "- auto / best of sweep: `--workers auto` against the best worker count of the "
        "sweep; target >= 0.95 on /data. On /io the connections grow with the workers "
        "for sync and gthread, so more workers always win there: shown only.",
        "- gthread /io / ideal: requests per second against workers x threads / 50 ms; "
        "target >= 0.90.",
        "- gevent and eventlet at 1000 connections on /io: no socket error and no non-2xx, "
        "and at least 0.90 of the class's own /data throughput.",
        "- auto / guide's command: against `gunicorn -w (2 x os.cpu_count() + 1)`, which "
        "counts the host's CPUs even where the server may use fewer; shown only.",
    ]
    lines += [f"- {item}" for item in results.plan.skipped]
    lines.append("")
    return lines


def _results_section(results: Results) -> list[str]:
    lines = [
        "## Results",
        "",
        "rps: 2xx responses per second (median of the runs); p50/p99: latency in ms "
        "(medians); errors: socket errors / non-2xx responses, summed over the runs.",
        "",
        "| config | server | class | workers | threads | endpoint | connections | rps | "
        "p50 ms | p99 ms | errors / non-2xx | rps of each run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    failures: list[str] = []
    for point in results.plan.points:
        s = results.summary(point)
        each = " / ".join(f"{value:,.0f}" for value in s.rps_each) or "-"
        if s.failed:
            each += f" ({s.failed} failed)"
            failures += [f"`{point.config}` {point.path}: {error}" for error in s.errors_each]
        lines.append(
            f"| {_cell(point.config)} | {point.server} | {point.worker_class} | "
            f"{point.workers} | {point.threads} | `{point.path}` | {point.connections} | "
            f"{_rps(s.rps)} | {_ms(s.p50_ms)} | {_ms(s.p99_ms)} | "
            f"{s.socket_errors} / {s.non2xx} | {each} |"
        )
    if not results.plan.points:
        lines.append("| (no points ran) | | | | | | | | | | | |")
    lines.append("")
    if failures:
        lines += ["Failed runs:", ""]
        lines += [f"- {text}" for text in failures]
        lines.append("")
    return lines


def _sweep_section(results: Results, png_name: str | None) -> list[str]:
    plan = results.plan
    if not plan.sweep:
        if png_name:
            return ["## Plot", "", f"![throughput and p99 latency]({png_name})", ""]
        return []
    lines = [
        "## Worker-count sweep",
        "",
        "`microsvc run -k CLASS --workers N`; **bold**: the best count of the class on "
        "that endpoint; (auto): the count `--workers auto` chose.",
        "",
    ]
    by_group = {group[0].group: group for group in plan.groups}
    for cls, counts in plan.sweep.items():
        auto_workers = plan.setups[cls].workers
        header = "| workers |"
        rule = "| --- |"
        for endpoint in results.options.endpoints:
            path = ENDPOINTS[endpoint]
            header += f" `{path}` rps | `{path}` p99 ms | `{path}` connections |"
            rule += " --- | --- | --- |"
        lines += [f"### {cls}", "", header, rule]
        best: dict[str, int | None] = {}
        for endpoint in results.options.endpoints:
            points = [p for p in by_group.get(f"{cls}:{endpoint}", []) if p.section == "sweep"]
            ok = [p for p in points if results.summary(p).ok]
            top = max(ok, key=lambda p: results.summary(p).rps or 0.0, default=None)
            best[endpoint] = top.workers if top else None
        for count in counts:
            row = f"| {count}{' (auto)' if count == auto_workers else ''} |"
            for endpoint in results.options.endpoints:
                point = next(
                    (
                        p
                        for p in by_group.get(f"{cls}:{endpoint}", [])
                        if p.section == "sweep" and p.config == f"microsvc --workers {count}"
                    ),
                    None,
                )
                if point is None:
                    row += " - | - | - |"
                    continue
                s = results.summary(point)
                rps = _rps(s.rps)
                if best[endpoint] == count and s.ok:
                    rps = f"**{rps}**"
                row += f" {rps} | {_ms(s.p99_ms)} | {point.connections} |"
            lines.append(row)
        lines.append("")
    if png_name:
        lines += [
            f"![throughput and p99 latency against worker count]({png_name})",
            "",
            "Lines: the sweep per class; stars: `--workers auto`.",
            "",
        ]
    return lines


def _setup_section(results: Results) -> list[str]:
    plan = results.plan
    lines = [
        "## What ran",
        "",
        "Each configuration is started on a free 127.0.0.1 port in a process group of "
        "its own, polled until it answers (`/readyz` for microsvc, `/data` for gunicorn) "
        "and has all its workers, warmed up, measured, and stopped (TERM to the group, "
        "KILL after 20 s).",
        "",
    ]
    if any(point.section != "engine" for point in plan.points):
        lines += [
            f"- {cls}, `--workers auto`: {setup.summary}" for cls, setup in plan.setups.items()
        ]
        lines.append("")
    commands: dict[tuple[str, str], str] = {}
    for point in plan.points:
        commands.setdefault((point.worker_class, point.config), point.command.display)
    if commands:
        lines += ["| class | config | command |", "| --- | --- | --- |"]
        lines += [
            f"| {cls} | {_cell(config)} | `{_cell(cmd)}` |"
            for (cls, config), cmd in commands.items()
        ]
        lines.append("")
    plain_classes = [p.worker_class for p in plan.points if p.section == "plain"]
    if plain_classes:
        lines += [
            "Plain gunicorn runs `python -m gunicorn -c FILE microsvc.demo:app`, FILE holding "
            "the settings microsvc computes for `--workers auto` "
            "(`microsvc.serving.launcher.resolve`, `make_plan`, `gunicorn_config`) with gunicorn's "
            "own worker class (gunicorn 27 has "
            "no eventlet worker: eventlet uses `microsvc.workers.eventlet.EventletWorker`). "
            "`bind` and `control_socket` are set per start; `proc_name` is gunicorn's.",
            "",
        ]
        for cls in dict.fromkeys(plain_classes):
            setup = plan.setups[cls]
            lines += [f"{cls}:", "", "```python"]
            lines += [f"{name} = {value!r}" for name, value in sorted(setup.plain_config.items())]
            lines += ["```", ""]
            if setup.dropped:
                lines += [
                    f"Not copied (not a literal value): {', '.join(setup.dropped)}.",
                    "",
                ]
    notes = sorted(
        {
            f"`{point.config}` {point.path}: {note}"
            for point in plan.points
            for run in point.runs
            for note in run.notes
        }
    )
    if notes:
        lines += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    return lines


def results_json(results: Results) -> dict[str, Any]:
    plan = results.plan
    return {
        "label": results.options.label,
        "command": results.options.command_line(),
        "options": {
            name: (str(value) if isinstance(value, Path) else value)
            for name, value in asdict(results.options).items()
        },
        "machine": results.machine,
        "wrk_threads": results.wrk_threads,
        "usable_cpus": plan.usable_cpus,
        "guide_workers": plan.guide_workers,
        "sweep": {cls: list(counts) for cls, counts in plan.sweep.items()},
        "skipped": plan.skipped,
        "engine": plan.engine or None,
        "microsvc": {
            cls: {
                "workers": setup.workers,
                "threads": setup.threads,
                "usable_cpus": setup.usable_cpus,
                "plan": setup.summary,
                "gunicorn_config": setup.gunicorn_config,
                "plain_gunicorn_config": setup.plain_config,
                "not_copied_to_plain": list(setup.dropped),
            }
            for cls, setup in plan.setups.items()
        },
        "points": [
            {
                "key": point.key,
                "group": point.group,
                "section": point.section,
                "config": point.config,
                "server": point.server,
                "worker_class": point.worker_class,
                "workers": point.workers,
                "threads": point.threads,
                "worker_connections": point.worker_connections,
                "endpoint": point.endpoint,
                "path": point.path,
                "connections": point.connections,
                "command": point.command.display,
                "argv": list(point.command.argv),
                "summary": {
                    **asdict(results.summary(point)),
                    "errors": results.summary(point).errors,
                },
                "runs": [asdict(run) for run in point.runs],
            }
            for point in plan.points
        ],
        "ratios": [asdict(ratio) for ratio in results.ratios],
    }


def write_json(results: Results, path: Path) -> None:
    path.write_text(json.dumps(results_json(results), indent=2, default=str) + "\n")


_COLORS = {
    "sync": "tab:blue",
    "gthread": "tab:orange",
    "gevent": "tab:green",
    "eventlet": "tab:red",
}


def write_png(
    results: Results,
    path: Path,
    draw_extra: Callable[[Results, Any, Any], None] | None = None,
) -> None:
    """Throughput and p99 latency against worker count: one row per endpoint, one line
    per class (the sweep), a star for `--workers auto`; `draw_extra` draws a last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    others = any(point.section != "engine" for point in results.plan.points)
    endpoints = list(results.options.endpoints) if others or not draw_extra else []
    rows = len(endpoints) + (1 if draw_extra else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    if draw_extra:
        draw_extra(results, axes[-1][0], axes[-1][1])
    by_group = {group[0].group: group for group in results.plan.groups}
    for row, endpoint in enumerate(endpoints):
        ax_rps, ax_p99 = axes[row][0], axes[row][1]
        path_shown = ENDPOINTS[endpoint]
        for cls in results.options.classes:
            points = by_group.get(f"{cls}:{endpoint}", [])
            color = _COLORS.get(cls, "black")
            sweep = sorted(
                (p for p in points if p.section == "sweep" and results.summary(p).ok),
                key=lambda p: p.workers,
            )
            if sweep:
                xs = [p.workers for p in sweep]
                ax_rps.plot(
                    xs, [results.summary(p).rps for p in sweep], "o-", color=color, label=cls
                )
                ax_p99.plot(
                    xs, [results.summary(p).p99_ms for p in sweep], "o-", color=color, label=cls
                )
            auto = _find(points, "auto")
            star: tuple[int, Summary] | None = None
            if auto and results.summary(auto).ok:
                star = (auto.workers, results.summary(auto))
            else:
                planned = results.plan.setups[cls].workers
                star = next(
                    ((p.workers, results.summary(p)) for p in sweep if p.workers == planned),
                    None,
                )
            if star is not None:
                label = f"{cls} auto ({star[0]})" if not sweep else None
                for ax, value in ((ax_rps, star[1].rps), (ax_p99, star[1].p99_ms)):
                    ax.plot(
                        [star[0]],
                        [value],
                        "*",
                        color=color,
                        markersize=16,
                        markeredgecolor="black",
                        label=label,
                    )
        ax_rps.set_title(f"{path_shown}: throughput")
        ax_rps.set_ylabel("2xx responses / s")
        ax_p99.set_title(f"{path_shown}: p99 latency")
        ax_p99.set_ylabel("ms (log scale)")
        ax_rps.set_ylim(bottom=0)
        if ax_p99.get_legend_handles_labels()[0]:
            ax_p99.set_yscale("log")
        for ax in (ax_rps, ax_p99):
            ax.set_xlabel("workers")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True, alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    machine = results.machine
    fig.suptitle(
        f"microsvc {machine['versions']['microsvc']} on gunicorn "
        f"{machine['versions']['gunicorn']}, {results.options.label} "
        + (
            f"({results.plan.usable_cpus} CPUs for the server); star = --workers auto"
            if endpoints
            else "(HTTP engine, per core)"
        ),
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
