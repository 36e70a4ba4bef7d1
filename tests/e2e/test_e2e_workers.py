"""The server runs the number of worker processes its plan states, and says so once."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_auto_runs_the_planned_number_of_workers(
    serve: ServeFactory, microsvc_plan: Callable[..., dict[str, Any]], worker_class: str
) -> None:
    options = ["-k", worker_class, "--workers", "auto"]
    planned = microsvc_plan(*options)["workers"]
    assert isinstance(planned, int) and planned >= 1

    server = serve(options)
    count = server.wait_workers(planned)
    assert count == planned, (
        f"plan says {planned} {worker_class} workers, the master has {count} children\n"
        f"{server.describe()}"
    )


def test_explicit_worker_count_runs_that_many_workers(serve: ServeFactory) -> None:
    server = serve(["-k", "sync", "--workers", "3"])
    count = server.wait_workers(3)
    assert count == 3, server.describe()
    assert server.stop() == 0, server.describe()
    assert server.orphans == [], f"workers left after the master stopped: {server.orphans}"


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["-k", "sync", "--workers", "2"], "2 sync workers"),
        (["-k", "gthread", "--workers", "2", "--threads", "3"], "2 gthread workers, 3 threads"),
        (["-k", "gevent", "--workers", "auto"], None),
    ],
    ids=["sync", "gthread", "gevent-auto"],
)
def test_start_log_states_the_plan_in_one_line(
    serve: ServeFactory,
    microsvc_plan: Callable[..., dict[str, Any]],
    options: list[str],
    expected: str | None,
) -> None:
    worker_class = options[1]
    plan = microsvc_plan(*options)
    server = serve(options)
    server.wait_workers(plan["workers"])
    assert server.stop() == 0, server.describe()

    log = server.log_text()
    plan_lines = [line for line in log.splitlines() if "usable CPUs" in line]
    assert len(plan_lines) == 1, log
    line = plan_lines[0]
    assert "microsvc" in line, line
    assert worker_class in line, line
    assert re.search(rf"\b{plan['workers']} {worker_class} workers\b", line), line
    assert re.search(rf"\b{plan['usable_cpus']} usable CPUs\b", line), line
    if expected:
        assert expected in line, line
