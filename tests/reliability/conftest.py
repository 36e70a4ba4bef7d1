"""Helpers of the reliability tier: wrk as a load generator, and a record of the figures.

`wrk` is `harness.Wrk` (shared with scripts/bench): the real load generator against a
loopback URL for a few seconds, with a Lua script that counts every response and every
non-2xx status exactly, cross-checked with the text wrk prints.

    failed = socket errors (connect + read + write + timeout) + non-2xx responses

`figures` keeps one line of figures per test: it is printed at once (seen with -s and in
the captured output of a failing test) and again in a table at the end of the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from harness import LUA_SCRIPT, Wrk, WrkResult, find_wrk


@pytest.fixture(scope="session")
def wrk_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("wrk") / "count.lua"
    path.write_text(LUA_SCRIPT)
    return path


@pytest.fixture
def wrk(wrk_script: Path) -> Iterator[Wrk]:
    """`wrk.start(url, seconds=, connections=, threads=, timeout=)` runs wrk in the
    background, `wrk.run(url, ...)` waits for its `WrkResult`; the test is skipped where
    wrk is not installed."""
    if find_wrk() is None:
        pytest.skip("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    runner = Wrk(wrk_script.parent)
    yield runner
    runner.kill_all()


# --- figures -------------------------------------------------------------------------

#: The name of a figure line among a test's `user_properties` (tests/conftest.py prints
#: them at the end of the run).
FIGURE = "figures"


@dataclass
class Figures:
    """One line of figures per test: printed now, and in a table at the end of the run."""

    nodeid: str
    node: Any
    lines: list[str] = field(default_factory=list)

    def __call__(self, text: str | WrkResult) -> str:
        line = str(text)
        self.lines.append(line)
        self.node.user_properties.append((FIGURE, line))
        print(f"FIGURES {self.nodeid}: {line}", flush=True)
        return line


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Figures:
    return Figures(request.node.nodeid.rpartition("/")[2], request.node)
