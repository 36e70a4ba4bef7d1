"""Medians, ratios against their targets, and the result files (Markdown, JSON, PNG)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib.options import CLASSES, ENDPOINTS, Options
from benchlib.points import ASYNC_IO_CONNECTIONS, IO_WAIT_S, Plan, Point, Summary

TARGET_OVERHEAD = 0.98
TARGET_AUTO_BEST = 0.95
TARGET_GTHREAD_IO = 0.90
TARGET_ASYNC_IO = 0.90
TARGET_METRICS = 0.97

#: The order of the ratios on the page and the terminal.
ORDER = (
    "microsvc / plain gunicorn",
    "auto / best of sweep",
    "gthread /io / ideal",
    "errors at 1000 connections",
    "async /io / /data",
    "auto / guide's command",
    "metrics on / off",
    "parser fast / python",
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
    ratios: list[Ratio] = field(default_factory=list)

    def groups(self) -> dict[str, list[Point]]:
        return {group[0].group: group for group in self.plan.groups}


def show_rps(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def show_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table (a `|` in a cell is escaped), and a blank line."""

    def line(cells: Sequence[object]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return [line(header), line(["---"] * len(header)), *map(line, rows), ""]


def target_text(target: float | None) -> str:
    return f">= {target:.2f}" if target is not None else "none (shown)"


def status(value: float, target: float | None) -> str:
    if target is None:
        return "info"
    return "PASS" if value >= target else "MISS"


def compare(
    kind: str, subject: str, top: Point | None, bottom: Point | None, target: float | None
) -> Ratio | None:
    """top's rps / bottom's; None when either point is missing."""
    if top is None or bottom is None:
        return None
    top_sum, bottom_sum = top.summary, bottom.summary
    detail = (
        f"{top.config}: {show_rps(top_sum.rps)} rps / "
        f"{bottom.config}: {show_rps(bottom_sum.rps)} rps"
    )
    if not top_sum.ok or not bottom_sum.ok or not bottom_sum.rps:
        return Ratio(kind, subject, None, target_text(target), "n/a", detail + " (a point failed)")
    value = (top_sum.rps or 0.0) / bottom_sum.rps
    return Ratio(kind, subject, value, target_text(target), status(value, target), detail)


def _find(points: Sequence[Point], section: str, config_end: str = "") -> Point | None:
    return next((p for p in points if p.section == section and p.config.endswith(config_end)), None)


def compute_ratios(results: Results) -> list[Ratio]:
    """Every ratio this run can give, from its own medians."""
    found: list[Ratio | None] = []
    groups = results.groups()
    for cls in CLASSES:
        for endpoint, path in ENDPOINTS.items():
            points = groups.get(f"{cls}:{endpoint}", [])
            if not points:
                continue

            first = {p.section: p for p in reversed(points)}
            parser = {p.config.rpartition("=")[2]: p for p in points if p.section == "parser"}
            subject, auto = f"{cls} {path}", first.get("auto")
            found += [
                compare(
                    "microsvc / plain gunicorn", subject, auto, first.get("plain"), TARGET_OVERHEAD
                ),
                compare("auto / guide's command", subject, auto, first.get("guide"), None),
                compare("metrics on / off", subject, first.get("metrics"), auto, TARGET_METRICS),
                compare(
                    "parser fast / python", subject, parser.get("fast"), parser.get("python"), None
                ),
            ]
            sweep = [p for p in points if p.section == "sweep"]
            if auto and sweep:
                ok = [p for p in sweep if p.summary.ok]
                best = max(ok, key=lambda p: p.summary.rps or 0.0, default=None)
                target = TARGET_AUTO_BEST if endpoint == "data" else None
                kind = "auto / best of sweep"
                found.append(
                    compare(kind, subject, auto, best, target)
                    or Ratio(
                        kind, subject, None, target_text(target), "n/a", "every sweep point failed"
                    )
                )
    found += _io_ratios(results, groups)
    ratios = [ratio for ratio in found if ratio]
    return sorted(ratios, key=lambda ratio: ORDER.index(ratio.kind))


def against_ideal(
    kind: str, subject: str, s: Summary, ideal: float, how: str, target: float
) -> Ratio:
    """rps / `ideal` (what the configuration could serve at best, `how` says why)."""
    value = (s.rps or 0.0) / ideal if s.ok else None
    result = status(value, target) if value is not None else "n/a"
    detail = f"{show_rps(s.rps)} rps / {how}" + ("" if s.ok else " (failed)")
    return Ratio(kind, subject, value, target_text(target), result, detail)


def no_errors(subject: str, point: Point) -> Ratio:
    """No socket error and no non-2xx response in any run of the point."""
    s, at = point.summary, f"{point.connections} connections"
    if point.connections != ASYNC_IO_CONNECTIONS:
        at += f" (the target is for {ASYNC_IO_CONNECTIONS})"
    result = ("PASS" if s.errors == 0 and not s.failed else "MISS") if s.ok else "n/a"
    detail = f"socket errors {s.socket_errors}, non-2xx {s.non2xx} over {s.runs} runs at {at}"
    value = float(s.errors) if s.ok else None
    return Ratio("errors at 1000 connections", subject, value, "0", result, detail)


def _io_ratios(results: Results, groups: dict[str, list[Point]]) -> list[Ratio | None]:
    ratios: list[Ratio | None] = []
    gthread_io = _find(groups.get("gthread:io", []), "auto")
    if gthread_io:
        ideal = gthread_io.workers * gthread_io.threads / IO_WAIT_S
        how = f"({gthread_io.workers} workers x {gthread_io.threads} threads / 50 ms = {ideal:.0f})"
        kind, s = "gthread /io / ideal", gthread_io.summary
        ratios.append(against_ideal(kind, "gthread /io", s, ideal, how, TARGET_GTHREAD_IO))
    for cls in ("gevent", "eventlet"):
        io = _find(groups.get(f"{cls}:io", []), "auto")
        if io is None:
            continue
        ratios.append(no_errors(f"{cls} /io", io))
        data = _find(groups.get(f"{cls}:data", []), "auto")
        ratio = compare("async /io / /data", cls, io, data, TARGET_ASYNC_IO)
        if ratio and data:
            ratio.detail = (
                f"/io at {io.connections} connections: {show_rps(io.summary.rps)} rps / "
                f"/data: {show_rps(data.summary.rps)} rps"
            )
        ratios.append(ratio)
    return ratios


def ratio_table(ratios: Sequence[Ratio]) -> list[str]:
    """The ratios as aligned text lines for the terminal."""
    rows = [("ratio", "subject", "value", "target", "result")]
    rows += [(r.kind, r.subject, r.shown_value(), r.target, r.status) for r in ratios]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]


# --- the Markdown page --------------------------------------------------------------------


def render_markdown(results: Results, png_name: str | None, extra: Sequence[str] = ()) -> str:
    """The result page; `extra`: a section's own lines, after the targets."""
    options, plan, machine = results.options, results.plan, results.machine
    v = machine["versions"]
    runs = f"{options.repeat} run{'s' if options.repeat != 1 else ''}"
    lines = [
        f"# Benchmark: {options.label}",
        "",
        f"Measured with `scripts/bench` on {machine['date']}. Compare configurations "
        "within this page (ratios from one run); absolute numbers depend on the machine "
        "and on what else ran on it.",
        "",
        "## Machine and method",
        "",
        *table(
            ["", ""],
            [
                ["CPU", machine["cpu_model"]],
                [
                    "CPUs",
                    f"{machine['host_cpus']} logical on the host (`os.cpu_count()`), "
                    f"{machine['available_cpus']} available to the bench",
                ],
                ["pinning", machine["pinning"]],
                [
                    "usable CPUs for microsvc",
                    f"{plan.usable_cpus} (what `--workers auto` plans for)",
                ],
                ["memory", machine["memory"]],
                ["kernel", machine["kernel"]],
                ["Python", machine["python"]],
                [
                    "versions",
                    f"microsvc {v['microsvc']}, gunicorn {v['gunicorn']}, flask "
                    f"{v['flask']}, gevent {v['gevent']}, eventlet {v['eventlet']}, "
                    f"gunicorn_h1c {v['gunicorn_h1c']}",
                ],
                [
                    "wrk",
                    f"{machine['wrk']}, {results.wrk_threads} threads, `--timeout 5s`, "
                    "Lua script for exact counts and latency percentiles",
                ],
                [
                    "per run",
                    f"{options.warmup} s warm-up, then {options.duration} s measured; "
                    f"{runs} per point, interleaved with the points it is compared to; medians",
                ],
                ["app", "`microsvc.demo:app`: `/data` (small JSON), `/io?ms=50` (sleeps 50 ms)"],
            ],
        ),
        "Rerun:",
        "",
        "```sh",
        options.command_line(),
        "```",
        "",
        *_targets_section(results),
        *extra,
        *_results_section(results),
        *_sweep_section(results, png_name),
        *_setup_section(results),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _targets_section(results: Results) -> list[str]:
    lines = ["## Targets", ""]
    if not results.ratios:
        lines += ["No ratio could be computed from the sections that ran.", ""]
    else:
        header = ["ratio", "subject", "value", "target", "result", "from"]
        rows = [
            [r.kind, r.subject, r.shown_value(), r.target, r.status, r.detail]
            for r in results.ratios
        ]
        lines += table(header, rows)
    skipped = [f"- {item}" for item in results.plan.skipped]
    if all(point.section == "engine" for point in results.plan.points):
        return [*lines, *skipped, ""]
    return [
        *lines,
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
        "- metrics on / off: `--workers auto --metrics` against `--workers auto` on /data "
        "(what recording every request costs); target >= 0.97.",
        *skipped,
        "",
    ]


def _results_section(results: Results) -> list[str]:
    rows: list[list[object]] = []
    failures: list[str] = []
    for p in results.plan.points:
        s = p.summary
        each = " / ".join(f"{value:,.0f}" for value in s.rps_each) or "-"
        if s.failed:
            each += f" ({s.failed} failed)"
            failures += [f"- `{p.config}` {p.path}: {error}" for error in s.errors_each]
        rows.append(
            [
                p.config,
                p.server,
                p.worker_class,
                p.workers,
                p.threads,
                f"`{p.path}`",
                p.connections,
                show_rps(s.rps),
                show_ms(s.p50_ms),
                show_ms(s.p99_ms),
                f"{s.socket_errors} / {s.non2xx}",
                each,
            ]
        )
    header = ["config", "server", "class", "workers", "threads", "endpoint", "connections", "rps"]
    header += ["p50 ms", "p99 ms", "errors / non-2xx", "rps of each run"]
    return [
        "## Results",
        "",
        "rps: 2xx responses per second (median of the runs); p50/p99: latency in ms "
        "(medians); errors: socket errors / non-2xx responses, summed over the runs.",
        "",
        *table(header, rows or [["(no points ran)"] + [""] * 11]),
        *(["Failed runs:", "", *failures, ""] if failures else []),
    ]


def _sweep_section(results: Results, png_name: str | None) -> list[str]:
    plan, endpoints = results.plan, results.options.endpoints
    if not plan.sweep:
        return ["## Plot", "", f"![throughput and p99 latency]({png_name})", ""] if png_name else []
    lines = [
        "## Worker-count sweep",
        "",
        "`microsvc run -k CLASS --workers N`; **bold**: the best count of the class on "
        "that endpoint; (auto): the count `--workers auto` chose.",
        "",
    ]
    groups = results.groups()
    for cls, counts in plan.sweep.items():
        header = ["workers"]
        columns: list[dict[int, Point]] = []
        for endpoint in endpoints:
            header += [
                f"`{ENDPOINTS[endpoint]}` {what}" for what in ("rps", "p99 ms", "connections")
            ]
            sweep = [p for p in groups.get(f"{cls}:{endpoint}", []) if p.section == "sweep"]
            columns.append({p.workers: p for p in sweep})
        rows: list[list[object]] = []
        for count in counts:
            row: list[object] = [f"{count}{' (auto)' if count == plan.setups[cls].workers else ''}"]
            for by_count in columns:
                point = by_count.get(count)
                if point is None:
                    row += ["-", "-", "-"]
                    continue
                s = point.summary
                ok = [p.summary for p in by_count.values() if p.summary.ok]
                best = s.ok and s.rps == max(o.rps or 0.0 for o in ok)
                rps = f"**{show_rps(s.rps)}**" if best else show_rps(s.rps)
                row += [rps, show_ms(s.p99_ms), point.connections]
            rows.append(row)
        lines += [f"### {cls}", "", *table(header, rows)]
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
        lines += [f"- {cls}, `--workers auto`: {s.summary}" for cls, s in plan.setups.items()]
        lines.append("")
    commands = {(p.worker_class, p.config): f"`{p.command.display}`" for p in plan.points}
    if commands:
        lines += table(
            ["class", "config", "command"], [[*key, cmd] for key, cmd in commands.items()]
        )
    plain_classes = dict.fromkeys(p.worker_class for p in plan.points if p.section == "plain")
    if plain_classes:
        lines += [
            "Plain gunicorn runs `python -m gunicorn -c FILE microsvc.demo:app`, FILE holding "
            "the settings microsvc computes for `--workers auto` with gunicorn's own worker "
            "class (gunicorn 27 has no eventlet worker: eventlet uses "
            "`microsvc.workers.eventlet.EventletWorker`). `bind` and `control_socket` are set "
            "per start; `proc_name` is gunicorn's.",
            "",
        ]
    for cls in plain_classes:
        setup = plan.setups[cls]
        lines += [f"{cls}:", "", "```python"]
        lines += [f"{name} = {value!r}" for name, value in sorted(setup.plain_config.items())]
        lines += ["```", ""]
        if setup.dropped:
            lines += [f"Not copied (not a literal value): {', '.join(setup.dropped)}.", ""]
    notes = sorted(
        {
            f"- `{p.config}` {p.path}: {note}"
            for p in plan.points
            for r in p.runs
            for note in r.notes
        }
    )
    return lines + (["Notes:", "", *notes, ""] if notes else [])


# --- the JSON file ------------------------------------------------------------------------


def write_json(results: Results, path: Path) -> None:
    plan, options = results.plan, results.options
    points = []
    for point in plan.points:
        summary, item = point.summary, asdict(point)
        del item["pinning"]
        item.update(
            path=point.path,
            command=point.command.display,
            argv=list(point.command.argv),
            summary={**asdict(summary), "errors": summary.errors},
        )
        points.append(item)
    data = {
        "label": options.label,
        "command": options.command_line(),
        "options": asdict(options),
        "machine": results.machine,
        "wrk_threads": results.wrk_threads,
        "usable_cpus": plan.usable_cpus,
        "guide_workers": plan.guide_workers,
        "sweep": plan.sweep,
        "skipped": plan.skipped,
        "engine": plan.engine or None,
        "overload": plan.overload or None,
        "microsvc": {cls: asdict(setup) for cls, setup in plan.setups.items()},
        "points": points,
        "ratios": [asdict(ratio) for ratio in results.ratios],
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


# --- the plot -------------------------------------------------------------------------------

_COLORS = {
    "sync": "tab:blue",
    "gthread": "tab:orange",
    "gevent": "tab:green",
    "eventlet": "tab:red",
}


def write_png(
    results: Results, path: Path, draw_extra: Callable[[Results, Any, Any], None] | None = None
) -> None:
    """Throughput and p99 latency against worker count: one row per endpoint, one line
    per class (the sweep), a star for `--workers auto`; `draw_extra` draws a last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plan = results.plan
    others = any(point.section != "engine" for point in plan.points)
    endpoints = list(results.options.endpoints) if others or not draw_extra else []
    rows = len(endpoints) + (1 if draw_extra else 0)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    if draw_extra:
        draw_extra(results, axes[-1][0], axes[-1][1])
    groups = results.groups()
    for (ax_rps, ax_p99), endpoint in zip(axes, endpoints, strict=False):
        for cls in results.options.classes:
            points = groups.get(f"{cls}:{endpoint}", [])
            color = _COLORS.get(cls, "black")
            sweep = sorted(
                (p for p in points if p.section == "sweep" and p.summary.ok),
                key=lambda p: p.workers,
            )
            for ax, figure in ((ax_rps, "rps"), (ax_p99, "p99_ms")):
                if sweep:
                    ys = [getattr(p.summary, figure) for p in sweep]
                    ax.plot([p.workers for p in sweep], ys, "o-", color=color, label=cls)
            auto = _find(points, "auto")
            if not (auto and auto.summary.ok):
                planned = plan.setups[cls].workers
                auto = next((p for p in sweep if p.workers == planned), None)
            if auto is not None:
                s, label = auto.summary, None if sweep else f"{cls} auto ({auto.workers})"
                for ax, value in ((ax_rps, s.rps), (ax_p99, s.p99_ms)):
                    ax.plot(
                        [auto.workers],
                        [value],
                        "*",
                        color=color,
                        markersize=16,
                        markeredgecolor="black",
                        label=label,
                    )
        shown = ENDPOINTS[endpoint]
        ax_rps.set(title=f"{shown}: throughput", ylabel="2xx responses / s")
        ax_p99.set(title=f"{shown}: p99 latency", ylabel="ms (log scale)")
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
    v = results.machine["versions"]
    scope = (
        f"({plan.usable_cpus} CPUs for the server); star = --workers auto"
        if endpoints
        else "(overload, behind nginx)"
        if plan.overload and not plan.engine
        else "(HTTP engine, per core)"
    )
    fig.suptitle(
        f"microsvc {v['microsvc']} on gunicorn {v['gunicorn']}, {results.options.label} {scope}",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
