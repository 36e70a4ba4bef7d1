"""`microsvc status` without a running server: one `Error: ` line, exit 1 when there is
nothing to show, exit 2 for bad options or a choice to make; no traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc


@pytest.fixture
def empty_runtime(tmp_path: Path) -> dict[str, str]:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    return {"XDG_RUNTIME_DIR": str(runtime)}


def test_no_instance_is_one_error_line(microsvc: Microsvc, empty_runtime: dict[str, str]) -> None:
    result = microsvc("status", env=empty_runtime)
    result.assert_error(1, "no running microsvc instance of this user", "microsvc run")


def test_no_instance_with_that_pid(microsvc: Microsvc, empty_runtime: dict[str, str]) -> None:
    result = microsvc("status", "--pid", "4194304", "--json", env=empty_runtime)
    result.assert_error(1, "no running microsvc instance with master pid 4194304")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--pid", "0"], "--pid"),
        (["--pid", "abc"], "--pid"),
        (["--watch", "--interval", "0"], "--interval"),
        (["--bogus"], "--bogus"),
    ],
)
def test_bad_options_are_usage_errors(
    microsvc: Microsvc, empty_runtime: dict[str, str], args: list[str], fragment: str
) -> None:
    microsvc("status", *args, env=empty_runtime).assert_error(2, fragment)


def test_several_instances_ask_which(microsvc: Microsvc, empty_runtime: dict[str, str]) -> None:
    """Two scoreboard files of live processes (this test and its parent): status
    names both pids and asks for --pid before it reads either."""
    runtime = Path(empty_runtime["XDG_RUNTIME_DIR"])
    pids = sorted((os.getpid(), os.getppid()))
    for pid in pids:
        (runtime / f"microsvc-{pid}.scoreboard").write_bytes(b"")
    result = microsvc("status", env=empty_runtime)
    result.assert_error(2, "several microsvc instances run", f"{pids[0]}, {pids[1]}", "--pid")


def test_a_file_that_is_not_a_scoreboard_is_a_runtime_error(
    microsvc: Microsvc, empty_runtime: dict[str, str]
) -> None:
    runtime = Path(empty_runtime["XDG_RUNTIME_DIR"])
    (runtime / f"microsvc-{os.getpid()}.scoreboard").write_bytes(b"\0" * 10)
    result = microsvc("status", env=empty_runtime)
    result.assert_error(1, "is not a microsvc scoreboard")
