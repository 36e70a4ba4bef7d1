"""The command line of `scripts/bench`, and the errors that end it."""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn


class BenchError(Exception):
    """Ends the benchmark with one `Error: ...` line (a failed run is recorded instead)."""

    exit_code = 1


class UsageError(BenchError):
    exit_code = 2


CLASSES = ("sync", "gthread", "gevent", "eventlet")
ENDPOINTS = {"data": "/data", "io": "/io?ms=50"}
SECTIONS = ("auto", "plain", "guide", "sweep", "metrics", "engine", "overload")
#: engine wants a quiet machine for a while, overload needs nginx: run only when named.
DEFAULT_SECTIONS = SECTIONS[:-2]
ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Options:
    duration: int
    warmup: int
    repeat: int
    classes: tuple[str, ...]
    endpoints: tuple[str, ...]
    sweep: tuple[int, ...] | None  # None: auto
    sections: tuple[str, ...]
    peers: tuple[str, ...]
    connections_data: int | None  # None: auto
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
        for action in build_parser()._actions[1:]:  # all but --help
            value = getattr(self, action.dest)
            if isinstance(action, argparse._StoreConstAction):  # --no-pin, --strict, ...
                parts += action.option_strings[:1] if value == action.const else []
            elif value != ():
                parts += [action.option_strings[0], _shown(value)]
        return shlex.join(parts)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    if isinstance(value, Path) and value.resolve().is_relative_to(ROOT):
        return str(value.resolve().relative_to(ROOT))
    return "auto" if value is None else str(value)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _count(minimum: int = 1, auto: bool = False) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if auto and text.strip().lower() == "auto":
            return None
        if not text.strip().isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text.strip()!r} is not a whole number >= {minimum}")
        return int(text)

    return parse


def _choices(allowed: Sequence[str], what: str) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated list of `allowed` names, in the documented order."""

    def parse(text: str) -> tuple[str, ...]:
        items = {item.strip().lower() for item in text.split(",") if item.strip()}
        for item in sorted(items - set(allowed)) or ([] if items else [""]):
            raise argparse.ArgumentTypeError(f"{item!r} is not a {what} ({', '.join(allowed)})")
        return tuple(name for name in allowed if name in items)

    return parse


def _sweep(text: str) -> tuple[int, ...] | None:
    if text.strip().lower() == "auto":
        return None
    return tuple(sorted({_count()(item) or 0 for item in text.split(",")}))


def _label(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a label (letters, digits, . _ -)")
    return text


def build_parser() -> argparse.ArgumentParser:
    about = "Benchmark microsvc with wrk; write LABEL.md, .json and .png under --out."
    parser = _Parser(prog="scripts/bench", description=about)
    add = parser.add_argument
    counts, auto = _count(), _count(auto=True)
    # fmt: off
    add("--duration", type=counts, default=10, metavar="SECONDS", help="load per run (default 10)")
    add("--warmup", type=_count(0), default=2, metavar="SECONDS",
        help="load before each run, not measured (default 2; 0 for none)")
    add("--repeat", type=counts, default=3, metavar="N",
        help="runs of each point, interleaved with the points it is compared to (default 3)")
    add("--classes", type=_choices(CLASSES, "worker class"), default=CLASSES, metavar="LIST",
        help=f"worker classes (default {','.join(CLASSES)})")
    add("--endpoints", type=_choices(tuple(ENDPOINTS), "endpoint"), default=tuple(ENDPOINTS),
        metavar="LIST", help="data (/data, small JSON) and/or io (/io?ms=50) (default data,io)")
    add("--sweep", type=_sweep, default=None, metavar="auto|N,N,...",
        help="worker counts of the sweep; auto: 1, cpus/2, cpus, 2*cpus+1, 3*cpus")
    add("--sections", type=_choices(SECTIONS, "section"), default=DEFAULT_SECTIONS,
        metavar="LIST", help=f"parts to run: {','.join(SECTIONS)} "
        f"(default {','.join(DEFAULT_SECTIONS)})")
    add("--peers", type=_choices(("granian",), "peer"), default=(), metavar="LIST",
        help="granian: install it into build/bench-peers/.venv, compare in the engine section")
    add("--connections-data", type=auto, metavar="auto|N", help="wrk connections on /data "
        "(auto: max(64, 20*server CPUs))")
    add("--connections-io", type=auto, metavar="auto|N", help="wrk connections on /io (auto: "
        "2*workers*threads for sync and gthread, 1000 for gevent and eventlet)")
    add("--label", type=_label, default=f"{os.cpu_count() or 1}-core",
        help="name of the result files (default HOST_CPUS-core)")
    add("--out", type=Path, default=ROOT / "docs" / "benchmarks", metavar="DIR",
        help="directory for the result files (default docs/benchmarks)")
    add("--no-pin", dest="pin", action="store_false", help="never pin server and wrk to CPUs "
        "of their own (pinned from 8 CPUs on; metrics and engine from 2)")
    add("--no-plot", dest="plot", action="store_false", help="write no PNG")
    add("--strict", action="store_true", help="exit 1 when a target is missed or a run failed")
    add("--start-timeout", type=counts, default=60, metavar="SECONDS",
        help="how long a server may take to answer (default 60)")
    # fmt: on
    return parser


def parse_options(argv: Sequence[str]) -> Options:
    return Options(**vars(build_parser().parse_args(list(argv))))
