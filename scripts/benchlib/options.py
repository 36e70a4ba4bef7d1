"""The command line of `scripts/bench`."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from benchlib.errors import UsageError

CLASSES = ("sync", "gthread", "gevent", "eventlet")
ENDPOINTS = {"data": "/data", "io": "/io?ms=50"}
SECTIONS = ("auto", "plain", "guide", "sweep", "metrics", "parser", "engine")
#: The engine section pins its servers to one CPU: it runs only when named.
DEFAULT_SECTIONS = SECTIONS[:-1]
PEERS = ("granian",)

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "docs" / "benchmarks"


@dataclass(frozen=True)
class Options:
    duration: int
    warmup: int
    repeat: int
    classes: tuple[str, ...]
    endpoints: tuple[str, ...]
    #: Worker counts of the sweep; None: around the formulas (1, cpus/2, cpus, ...).
    sweep: tuple[int, ...] | None
    sections: tuple[str, ...]
    #: Other servers the engine section compares with (installed on demand).
    peers: tuple[str, ...]
    #: None: chosen from the CPUs (/data) or the configuration (/io).
    connections_data: int | None
    connections_io: int | None
    label: str
    out: Path
    pin: bool
    plot: bool
    strict: bool
    start_timeout: int

    def command_line(self) -> str:
        """The command that reruns exactly this benchmark."""
        parts = [
            "scripts/bench",
            "--duration",
            str(self.duration),
            "--warmup",
            str(self.warmup),
            "--repeat",
            str(self.repeat),
            "--classes",
            ",".join(self.classes),
            "--endpoints",
            ",".join(self.endpoints),
            "--sections",
            ",".join(self.sections),
            "--sweep",
            ",".join(map(str, self.sweep)) if self.sweep else "auto",
            "--connections-data",
            str(self.connections_data or "auto"),
            "--connections-io",
            str(self.connections_io or "auto"),
            "--label",
            self.label,
            "--out",
            _shown_path(self.out),
        ]
        if self.peers:
            parts += ["--peers", ",".join(self.peers)]
        if not self.pin:
            parts.append("--no-pin")
        if not self.plot:
            parts.append("--no-plot")
        if self.strict:
            parts.append("--strict")
        return shlex.join(parts)


def _shown_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _positive(name: str, minimum: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = name
    return parse


def _auto_or_positive(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    return _positive("count")(text)


def _choices(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = [item.strip().lower() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given")
        for item in items:
            if item not in allowed:
                raise argparse.ArgumentTypeError(f"{item!r} is not a {what} ({', '.join(allowed)})")
        return tuple(dict.fromkeys(items))

    parse.__name__ = what
    return parse


def _sweep(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "auto":
        return None
    counts: list[int] = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not a worker count (auto or N,N,...)"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"worker count {value} is less than 1")
        counts.append(value)
    if not counts:
        raise argparse.ArgumentTypeError("no worker counts given (auto or N,N,...)")
    return tuple(sorted(set(counts)))


def _label(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a label (letters, digits, '.', '_', '-')"
        )
    return text


def default_label() -> str:
    return f"{os.cpu_count() or 1}-core"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scripts/bench",
        description="Benchmark microsvc against plain gunicorn and the guide's command, "
        "with wrk, over the demo app's /data and /io?ms=50. Writes LABEL.md, LABEL.json "
        "and LABEL.png under --out and prints the ratios.",
    )
    parser.add_argument(
        "--duration",
        type=_positive("duration"),
        default=10,
        metavar="SECONDS",
        help="seconds of load per run (default 10)",
    )
    parser.add_argument(
        "--warmup",
        type=_positive("warmup", 0),
        default=2,
        metavar="SECONDS",
        help="seconds of load before each run, not measured (default 2; 0 for none)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive("repeat"),
        default=3,
        metavar="N",
        help="runs of each point, interleaved with the points it is compared to; "
        "medians are reported (default 3)",
    )
    parser.add_argument(
        "--classes",
        type=_choices(CLASSES, "worker class"),
        default=CLASSES,
        metavar="LIST",
        help=f"worker classes (default {','.join(CLASSES)})",
    )
    parser.add_argument(
        "--endpoints",
        type=_choices(tuple(ENDPOINTS), "endpoint"),
        default=tuple(ENDPOINTS),
        metavar="LIST",
        help="data (/data, small JSON) and/or io (/io?ms=50) (default data,io)",
    )
    parser.add_argument(
        "--sweep",
        type=_sweep,
        default=None,
        metavar="auto|N,N,...",
        help="worker counts of the sweep; auto: 1, cpus/2, cpus, 2*cpus+1, 3*cpus",
    )
    parser.add_argument(
        "--sections",
        type=_choices(SECTIONS, "section"),
        default=DEFAULT_SECTIONS,
        metavar="LIST",
        help=f"parts to run: {','.join(SECTIONS)} (default {','.join(DEFAULT_SECTIONS)})",
    )
    parser.add_argument(
        "--peers",
        type=_choices(PEERS, "peer"),
        default=(),
        metavar="LIST",
        help="other servers for the engine section, installed into build/bench-peers/.venv "
        "(granian; default none)",
    )
    parser.add_argument(
        "--connections-data",
        type=_auto_or_positive,
        default=None,
        metavar="auto|N",
        help="wrk connections on /data (auto: max(64, 20*server CPUs))",
    )
    parser.add_argument(
        "--connections-io",
        type=_auto_or_positive,
        default=None,
        metavar="auto|N",
        help="wrk connections on /io (auto: 2*workers*threads for sync and gthread, "
        "1000 for gevent and eventlet)",
    )
    parser.add_argument(
        "--label",
        type=_label,
        default=None,
        help="name of the result files (default: HOST_CPUS-core, e.g. 2-core)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help="directory for the result files (default docs/benchmarks)",
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="never pin server and wrk to separate CPUs (pinned from 8 CPUs on)",
    )
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write no PNG")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a target is missed or a run failed",
    )
    parser.add_argument(
        "--start-timeout",
        type=_positive("start timeout"),
        default=60,
        metavar="SECONDS",
        help="seconds a server may take to answer after it starts (default 60)",
    )
    return parser


def parse_options(argv: Sequence[str]) -> Options:
    args = build_parser().parse_args(list(argv))
    sections: tuple[str, ...] = args.sections
    # Keep the documented order, whatever order they were given in.
    sections = tuple(name for name in SECTIONS if name in sections)
    classes = tuple(name for name in CLASSES if name in args.classes)
    endpoints = tuple(name for name in ENDPOINTS if name in args.endpoints)
    return Options(
        duration=args.duration,
        warmup=args.warmup,
        repeat=args.repeat,
        classes=classes,
        endpoints=endpoints,
        sweep=args.sweep,
        sections=sections,
        peers=args.peers,
        connections_data=args.connections_data,
        connections_io=args.connections_io,
        label=args.label or default_label(),
        out=args.out,
        pin=args.pin,
        plot=args.plot,
        strict=args.strict,
        start_timeout=args.start_timeout,
    )
