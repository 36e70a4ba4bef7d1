"""`microsvc plan --measure` and `--memory-per-worker auto`: the app is imported in a child
process and its own memory (USS) after the import is the budget of one worker; inside a
real cgroup v1 memory limit, the limit divided by it caps the worker count.

The memory cgroup test creates /sys/fs/cgroup/memory/microsvc-test-<random> with
memory.limit_in_bytes and runs `microsvc plan` in it (a preexec_fn moves the child in
before exec). Needs root and a cgroup v1 memory controller; skipped otherwise.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import remove_cgroup

pytestmark = pytest.mark.e2e

MEMORY_CONTROLLER = Path("/sys/fs/cgroup/memory")
MiB = 1024**2

#: Keeps 100 MB of its own at import (written, so resident and private).
HEAVY_APP = """\
KEPT = bytearray(100 * 1000 * 1000)
KEPT[::4096] = b"x" * len(KEPT[::4096])


def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
"""


@pytest.fixture
def heavy_app(tmp_path: Path) -> Path:
    (tmp_path / "heavy.py").write_text(HEAVY_APP)
    return tmp_path


@pytest.fixture
def memory_cgroup() -> Iterator[Callable[[int], Path]]:
    """`memory_cgroup(limit)`: a fresh cgroup with that memory limit, removed at teardown."""
    limit_file = MEMORY_CONTROLLER / "memory.limit_in_bytes"
    if not limit_file.is_file():
        pytest.skip(f"no cgroup v1 memory controller at {MEMORY_CONTROLLER}")
    made: list[Path] = []

    def make(limit: int) -> Path:
        path = MEMORY_CONTROLLER / f"microsvc-test-{secrets.token_hex(4)}"
        try:
            path.mkdir()
        except OSError as exc:
            pytest.skip(f"cannot create a memory cgroup (needs root): {exc}")
        made.append(path)
        (path / "memory.limit_in_bytes").write_text(str(limit))
        return path

    yield make

    for path in made:
        remove_cgroup(path)


def enter(path: Path) -> Callable[[], None]:
    procs = str(path / "cgroup.procs")

    def move_self() -> None:
        with open(procs, "w") as handle:
            handle.write("0")

    return move_self


def test_plan_measure_reports_the_apps_memory_and_keeps_the_budget(
    microsvc_plan: Callable[..., dict[str, Any]], heavy_app: Path
) -> None:
    report = microsvc_plan("heavy:app", "--measure", cwd=heavy_app)
    memory = report["app_memory"]
    assert memory["measure"] == "USS"
    assert 95e6 <= memory["imported"] <= 120e6, memory
    assert memory["own"] >= memory["imported"] and memory["rss"] >= memory["own"]
    assert report["plan"]["memory_per_worker"] == 128 * MiB  # measured, not used
    assert report["plan"]["memory_per_worker_from"] == "--memory-per-worker"
    assert report["plan"]["memory_measure"] == "USS"


def test_auto_memory_per_worker_caps_workers_by_the_cgroup_limit(
    microsvc_plan: Callable[..., dict[str, Any]],
    heavy_app: Path,
    memory_cgroup: Callable[[int], Path],
) -> None:
    group = memory_cgroup(512 * MiB)
    report = microsvc_plan(
        *("heavy:app", "-k", "sync", "--memory-per-worker", "auto"),
        cwd=heavy_app,
        preexec_fn=enter(group),
    )
    plan = report["plan"]
    own = report["app_memory"]["own"]
    assert plan["memory"] == 512 * MiB and str(group) in plan["memory_source"], plan
    assert plan["memory_per_worker"] == own, plan
    assert plan["memory_per_worker_from"].startswith("measured: own memory (USS)"), plan
    assert plan["memory_cap"] == 512 * MiB // own, plan
    assert report["workers"] == min(plan["memory_cap"], plan["formula_workers"]), plan
    assert report["settings"]["memory_per_worker"]["value"] == "auto"
