"""The command line of `scripts/bench`."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from benchlib.errors import UsageError

CLASSES = ("sync", "gthread", "gevent", "eventlet")
ENDPOINTS = {"data": "/data", "io": "/io?ms=50"}
SECTIONS = ("auto", "plain", "guide", "sweep", "metrics", "parser", "engine", "overload")
#: The engine section pins its servers to one CPU, the overload section needs nginx:
#: they run only when named.
DEFAULT_SECTIONS = SECTIONS[:-2]
PEERS = ("granian",)

ROOT = Path(__file__).resolve().parents[2]


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
        parts = ["scripts/bench"]
        for action in build_parser()._actions:
            if not hasattr(self, action.dest):  # --help
                continue
            value = getattr(self, action.dest)
            if isinstance(action, argparse._StoreConstAction):  # --no-pin, --strict, ...
                parts += [action.option_strings[0]] if value == action.const else []
            elif action.option_strings and value != ():
                parts += [action.option_strings[0], _shown(value)]
        return shlex.join(parts)


def _shown(value: Any) -> str:
    if value is None:
        return "auto"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, Path):
        try:
            return str(value.resolve().relative_to(ROOT))
        except ValueError:
            return str(value)
    return str(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _count(minimum: int = 1, auto: bool = False) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if auto and text.strip().lower() == "auto":
            return None
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text.strip()!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def _choices(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of `allowed` names, in the documented order."""

    def parse(text: str) -> tuple[str, ...]:
        items = {item.strip().lower() for item in text.split(",") if item.strip()}
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given")
        unknown = sorted(items - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{unknown[0]!r} is not a {what} ({', '.join(allowed)})"
            )
        return tuple(name for name in allowed if name in items)

    return parse


def _sweep(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "auto":
        return None
    counts = {_count()(item) for item in text.split(",") if item.strip()}
    if not counts:
        raise argparse.ArgumentTypeError("no worker counts given (auto or N,N,...)")
    return tuple(sorted(count for count in counts if count is not None))


def _label(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a label (letters, digits, . _ -)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scripts/bench",
        description="Benchmark microsvc against plain gunicorn and the guide's command, "
        "with wrk, over the demo app's /data and /io?ms=50. Writes LABEL.md, LABEL.json "
        "and LABEL.png under --out and prints the ratios.",
    )
    add = parser.add_argument
    # fmt: off
    add("--duration", type=_count(), default=10, metavar="SECONDS",
        help="seconds of load per run (default 10)")
    add("--warmup", type=_count(0), default=2, metavar="SECONDS",
        help="seconds of load before each run, not measured (default 2; 0 for none)")
    add("--repeat", type=_count(), default=3, metavar="N",
        help="runs of each point, interleaved with the points it is compared to; "
        "medians are reported (default 3)")
    add("--classes", type=_choices(CLASSES, "worker class"), default=CLASSES, metavar="LIST",
        help=f"worker classes (default {','.join(CLASSES)})")
    add("--endpoints", type=_choices(tuple(ENDPOINTS), "endpoint"), default=tuple(ENDPOINTS),
        metavar="LIST",
        help="data (/data, small JSON) and/or io (/io?ms=50) (default data,io)")
    add("--sweep", type=_sweep, default=None, metavar="auto|N,N,...",
        help="worker counts of the sweep; auto: 1, cpus/2, cpus, 2*cpus+1, 3*cpus")
    add("--sections", type=_choices(SECTIONS, "section"), default=DEFAULT_SECTIONS,
        metavar="LIST",
        help=f"parts to run: {','.join(SECTIONS)} "
        f"(default {','.join(DEFAULT_SECTIONS)})")
    add("--peers", type=_choices(PEERS, "peer"), default=(), metavar="LIST",
        help="other servers for the engine section, installed into build/bench-peers/.venv "
        "(granian; default none)")
    add("--connections-data", type=_count(auto=True), default=None, metavar="auto|N",
        help="wrk connections on /data (auto: max(64, 20*server CPUs))")
    add("--connections-io", type=_count(auto=True), default=None, metavar="auto|N",
        help="wrk connections on /io (auto: 2*workers*threads for sync and gthread, "
        "1000 for gevent and eventlet)")
    add("--label", type=_label, default=f"{os.cpu_count() or 1}-core",
        help="name of the result files (default: HOST_CPUS-core, e.g. 2-core)")
    add("--out", type=Path, default=ROOT / "docs" / "benchmarks", metavar="DIR",
        help="directory for the result files (default docs/benchmarks)")
    add("--no-pin", dest="pin", action="store_false",
        help="never pin server and wrk to separate CPUs (pinned from 8 CPUs on)")
    add("--no-plot", dest="plot", action="store_false", help="write no PNG")
    add("--strict", action="store_true", help="exit 1 when a target is missed or a run failed")
    add("--start-timeout", type=_count(), default=60, metavar="SECONDS",
        help="seconds a server may take to answer after it starts (default 60)")
    # fmt: on
    return parser


def parse_options(argv: Sequence[str]) -> Options:
    return Options(**vars(build_parser().parse_args(list(argv))))
