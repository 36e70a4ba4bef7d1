"""The result files, written the same way for every section from its points and ratios:
the Markdown page, the JSON file and the plot."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from benchlib.options import Options
from benchlib.plan import SECTIONS, Plan, Point
from benchlib.ratios import MB, Ratio, show


@dataclass
class Results:
    options: Options
    plan: Plan
    machine: dict[str, str]
    ratios: list[Ratio]

    def tables(self) -> dict[str, list[Point]]:
        """The points by the title of their section (sections that share one, together)."""
        found: dict[str, list[Point]] = {}
        for point in self.plan.points:
            found.setdefault(SECTIONS[point.section].title, []).append(point)
        return found


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """A Markdown table, columns aligned (a `|` in a cell escaped), and a blank line."""
    cells = [[str(cell).replace("|", "\\|") for cell in row] for row in (header, *rows)]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, " | ".join("-" * w for w in widths))
    return [f"| {line} |" for line in lines] + [""]


def _ms(value: float | None) -> str:
    return show(value, 2 if value is not None and value < 10 else 1)


def render_markdown(results: Results, png_name: str | None) -> str:
    options, plan = results.options, results.plan
    about = {
        **results.machine,
        "usable CPUs for microsvc": f"{plan.usable_cpus} (what `--workers auto` plans for)",
        "per run": f"{options.warmup} s warm-up, then {options.duration} s measured; "
        f"{options.repeat} run(s) per point, interleaved with the points it is compared to; "
        "medians",
        "app": "`microsvc.demo:app`: `/data` (small JSON), `/io?ms=50` (sleeps 50 ms)",
    }
    ratios = [[r.kind, r.subject, r.shown(), r.target, r.status, r.detail] for r in results.ratios]
    lines = [
        f"# Benchmark: {options.label}",
        "",
        f"Measured with `scripts/bench` on {results.machine['date']}. Compare configurations "
        "within this page (ratios from one run); absolute numbers depend on the machine and "
        "on what else ran on it.",
        "",
        "## Machine and method",
        "",
        *table(["", ""], about.items()),
        f"Rerun:\n\n```sh\n{options.command_line()}\n```\n\n## Targets\n",
        *table(["ratio", "subject", "value", "target", "result", "from"], ratios),
        "What each ratio means: docs/benchmarks.md, Reading the ratios.",
        *(f"- {item}" for item in plan.skipped),
        "",
    ]
    header = ["config", "class", "workers", "endpoint", "connections", "rps", "p50 ms", "p99 ms"]
    header += ["errors / non-2xx", "idle USS MB", "rps of each run"]
    for title, points in results.tables().items():
        texts = dict.fromkeys(f"- {SECTIONS[p.section].text}" for p in points)
        lines += [f"## {title}", "", *texts, "", *table(header, map(_row, points))]
    failed = [
        f"- `{p.config}` {p.worker_class} {p.path}: {e}" for p in plan.points for e in p.failures
    ]
    lines += ["Failed runs:", "", *failed, ""] if failed else []
    lines += [f"![throughput per section]({png_name})", ""] if png_name else []
    return "\n".join(lines + _what_ran(plan)).rstrip() + "\n"


def _row(p: Point) -> list[object]:
    """rps: 2xx a second; p50, p99: latency; idle USS: the workers' private memory before
    load (medians of the runs); errors: socket errors / non-2xx, summed."""
    uss, each = p.median("idle_uss_bytes"), " / ".join(f"{v:,.0f}" for v in p.each("rps"))
    errors = f"{sum(p.each('socket_errors')):.0f} / {sum(p.each('non2xx')):.0f}"
    each += f" ({len(p.failures)} failed)" if p.failures else ""
    size = f"{p.workers}" + (f" x {p.threads}" if p.threads > 1 else "")
    figures = [show(p.median("rps")), _ms(p.median("p50_ms")), _ms(p.median("p99_ms")), errors]
    uss_mb = show(uss and uss / MB, 1)
    return [p.config, p.worker_class, size, f"`{p.path}`", p.connections, *figures, uss_mb, each]


def _what_ran(plan: Plan) -> list[str]:
    lines = [
        "## What ran",
        "",
        "Each configuration is started on a free 127.0.0.1 port in a process group of its "
        "own, polled until it answers (`/readyz` for microsvc, the endpoint for the others) "
        "and has all its workers, measured, and stopped (TERM to the group, KILL after 20 s).",
        "",
    ]
    if any(p.section in ("auto", "plain", "guide", "sweep") for p in plan.points):
        plans = [f"- {cls}, `--workers auto`: {s.plan.summary()}" for cls, s in plan.setups.items()]
        lines += [*plans, ""]
    commands = {(p.worker_class, p.config): f"`{p.command.display}`" for p in plan.points}
    lines += table(["class", "config", "command"], [[*k, c] for k, c in commands.items()])
    configs = {p.command.display: (p, p.command.config) for p in plan.points if p.command.config}
    for p, config in configs.values():
        lines += [f"{p.worker_class}, `{p.config}`: FILE (`bind`, `control_socket` set per start)"]
        lines += ["", "```python", *(f"{k} = {v!r}" for k, v in sorted(config.items()))]
        lines += ["```", ""]
    dropped = sorted({name for setup in plan.setups.values() for name in setup.dropped})
    if dropped and any(p.command.config for p in plan.points):
        lines += [f"Not copied to FILE (no literal value): {', '.join(dropped)}.", ""]
    notes = {f"- `{p.config}` {p.path}: {n}" for p in plan.points for r in p.runs for n in r.notes}
    return lines + (["Notes:", "", *sorted(notes), ""] if notes else [])


def write_json(results: Results, path: Path) -> None:
    plan, options = results.plan, results.options
    data = {
        "label": options.label,
        "command": options.command_line(),
        "options": asdict(options),
        "machine": results.machine,
        "usable_cpus": plan.usable_cpus,
        "guide_workers": plan.guide_workers,
        "skipped": plan.skipped,
        "microsvc": {cls: {**s._asdict(), "plan": str(s.plan)} for cls, s in plan.setups.items()},
        "points": [asdict(p) | {"path": p.path} for p in plan.points],
        "ratios": [asdict(ratio) for ratio in results.ratios],
    }
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_png(results: Results, path: Path) -> None:
    """A chart per section and endpoint: a bar per configuration and class, 2xx a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = [
        (title, [p for p in points if p.endpoint == endpoint])
        for title, points in results.tables().items()
        for endpoint in dict.fromkeys(p.endpoint for p in points)
    ]
    size = (14, 2 + 2.3 * len(charts))
    fig, axes = plt.subplots(max(1, (len(charts) + 1) // 2), 2, figsize=size, squeeze=False)
    for ax in list(axes.flat)[len(charts) :]:
        ax.axis("off")
    for ax, (title, points) in zip(axes.flat, charts, strict=False):
        classes = list(dict.fromkeys(p.worker_class for p in points))
        configs = list(dict.fromkeys(p.config for p in points))
        width = 0.8 / len(configs)
        for i, config in enumerate(configs):
            values = {p.worker_class: p.median("rps") or 0.0 for p in points if p.config == config}
            xs = [classes.index(cls) - 0.4 + width * (i + 0.5) for cls in values]
            bars = ax.bar(xs, list(values.values()), width, label=config)
            ax.bar_label(bars, labels=[f"{v:,.0f}" for v in values.values()], fontsize=7)
        ax.set_xticks(range(len(classes)), classes)
        ax.set(title=f"{title}: {points[0].path}", ylabel="2xx responses / s")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize="x-small")
    fig.suptitle(f"scripts/bench {results.options.label}: {results.machine['versions']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
