"""Planning inside a real cgroup v1 CPU quota.

The test creates /sys/fs/cgroup/cpu/microsvc-test-<random>, sets cpu.cfs_quota_us, and
starts microsvc with a preexec_fn that moves the child into that cgroup before exec.
Needs root and a cgroup v1 cpu controller; skipped otherwise.
"""

from __future__ import annotations

import math
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from harness import remove_cgroup

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = [pytest.mark.e2e, pytest.mark.cgroup]

CPU_CONTROLLER = Path("/sys/fs/cgroup/cpu")
PERIOD_US = 100_000


def _skip_reason() -> str | None:
    if not (CPU_CONTROLLER / "cpu.cfs_quota_us").is_file():
        return f"no cgroup v1 cpu controller at {CPU_CONTROLLER}"
    if not os.access(CPU_CONTROLLER, os.W_OK):
        return f"{CPU_CONTROLLER} is not writable (needs root)"
    return None


class CpuCgroup:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.quota_file = path / "cpu.cfs_quota_us"

    def set_quota(self, cpus: float) -> None:
        period = int((self.path / "cpu.cfs_period_us").read_text())
        assert period == PERIOD_US, f"unexpected cpu.cfs_period_us {period}"
        self.quota_file.write_text(str(int(cpus * period)))

    def enter(self) -> Callable[[], None]:
        """A preexec_fn: the child moves itself into this cgroup before exec."""
        procs = str(self.path / "cgroup.procs")

        def move_self() -> None:
            with open(procs, "w") as handle:
                handle.write("0")

        return move_self

    def pids(self) -> list[int]:
        text = (self.path / "cgroup.procs").read_text()
        return [int(pid) for pid in text.split()]


@pytest.fixture
def cpu_cgroup() -> Iterator[Callable[[float], CpuCgroup]]:
    """`cpu_cgroup(cpus)` creates a fresh cgroup with that CPU quota; all are removed
    at teardown. Request it before `serve`, so servers stop before the cgroup goes."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    made: list[CpuCgroup] = []

    def make(cpus: float) -> CpuCgroup:
        path = CPU_CONTROLLER / f"microsvc-test-{secrets.token_hex(4)}"
        path.mkdir()
        group = CpuCgroup(path)
        made.append(group)
        group.set_quota(cpus)
        return group

    yield make

    for group in made:
        remove_cgroup(group.path)


def host_cpus() -> int:
    return min(psutil.cpu_count(logical=True) or 1, len(os.sched_getaffinity(0)))


def quota_source(plan: dict[str, Any]) -> dict[str, Any]:
    sources: dict[str, dict[str, Any]] = {
        source["name"]: source for source in plan["plan"]["cpu_sources"]
    }
    return sources["quota"]


def test_one_cpu_quota_plans_for_one_cpu(
    cpu_cgroup: Callable[[float], CpuCgroup], microsvc_plan: Callable[..., dict[str, Any]]
) -> None:
    group = cpu_cgroup(1)
    plan = microsvc_plan("-k", "sync", preexec_fn=group.enter())
    assert plan["usable_cpus"] == 1, plan["plan"]
    assert plan["plan"]["cpu_limited_by"] == "quota", plan["plan"]
    quota = quota_source(plan)
    assert quota["cpus"] == 1.0, quota
    assert str(group.quota_file) in quota["detail"], quota
    assert "cpu.cfs_quota_us" in quota["detail"], quota
    assert plan["workers"] == 3, plan["plan"]


def test_one_and_a_half_cpu_quota_rounds_up_to_two(
    cpu_cgroup: Callable[[float], CpuCgroup], microsvc_plan: Callable[..., dict[str, Any]]
) -> None:
    group = cpu_cgroup(1.5)
    plan = microsvc_plan("-k", "sync", preexec_fn=group.enter())
    assert plan["usable_cpus"] == min(2, host_cpus()), plan["plan"]
    quota = quota_source(plan)
    assert quota["cpus"] == 1.5, quota
    assert str(group.quota_file) in quota["detail"], quota
    assert math.ceil(quota["cpus"]) == 2


def test_run_auto_in_one_cpu_cgroup_starts_three_sync_workers(
    cpu_cgroup: Callable[[float], CpuCgroup], serve: ServeFactory
) -> None:
    group = cpu_cgroup(1)
    server = serve(["-k", "sync", "--workers", "auto"], preexec_fn=group.enter())
    assert server.pid in group.pids()
    count = server.wait_workers(3)
    assert count == 3, server.describe()
    # The workers are in the cgroup too: they inherit it from the master.
    assert server.worker_pids() <= set(group.pids())
    assert server.stop() == 0, server.describe()
    line = server.wait_log(r".*usable CPUs.*").group(0)
    assert re.search(r"\b3 sync workers\b", line), line
    assert "1 usable CPUs (limited by quota)" in line, line
