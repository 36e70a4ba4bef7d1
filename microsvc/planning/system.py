"""Reading what limits this process from /proc and /sys (cgroup v1 and v2).

Every function takes `root`, the directory that stands for `/`, so tests can point it
at a fixture tree; the arithmetic on what is read lives in `microsvc.planning.plan`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import psutil

from microsvc.planning.plan import SystemFacts

T = TypeVar("T", int, float)

#: cgroup v1 writes a number this large (or larger) for "no memory limit".
_V1_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class CgroupDir:
    """One controller's directory for this process, and the mount it lives under."""

    path: Path
    mount: Path
    version: int

    def up_to_mount(self) -> Iterator[Path]:
        """This cgroup and each parent up to the mount point: limits nest."""
        path = self.path
        while True:
            yield path
            if path == self.mount or self.mount not in path.parents:
                return
            path = path.parent


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _mounts(root: Path) -> list[tuple[str, Path, str, set[str]]]:
    """(mount root, mount point, fstype, super options) of every cgroup mount."""
    text = _read(root / "proc/self/mountinfo") or ""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        fstype = tail[0]
        if fstype in ("cgroup", "cgroup2"):
            point = root / fields[4].lstrip("/")
            mounts.append((fields[3], point, fstype, set(tail[2].split(","))))
    return mounts


def _memberships(root: Path) -> tuple[dict[str, str], str | None]:
    """This process's cgroup path per v1 controller, and its v2 path."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in (_read(root / "proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        for controller in controllers.split(","):
            v1[controller] = path
    return v1, v2


def _join(mount: Path, mount_root: str, path: str) -> Path:
    relative = path
    if mount_root != "/" and (path == mount_root or path.startswith(mount_root + "/")):
        relative = path[len(mount_root) :]
    return mount / relative.lstrip("/")


def cgroup_dirs(controller: str, root: Path) -> list[CgroupDir]:
    """The directories of `controller` for this process: a v1 one, a v2 one, or both
    (hybrid hosts mount both; a limit may be set in either)."""
    v1, v2 = _memberships(root)
    found: list[CgroupDir] = []
    for mount_root, point, fstype, options in _mounts(root):
        if fstype == "cgroup" and controller in options and controller in v1:
            found.append(CgroupDir(_join(point, mount_root, v1[controller]), point, 1))
        elif fstype == "cgroup2" and v2 is not None:
            found.append(CgroupDir(_join(point, mount_root, v2), point, 2))
    return found


def _cpu_quota_at(directory: Path, version: int) -> float | None:
    if version == 2:
        text = _read(directory / "cpu.max")
        if not text:
            return None
        quota, _, period = text.partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or 100000)
    quota_text = _read(directory / "cpu.cfs_quota_us")
    period_text = _read(directory / "cpu.cfs_period_us")
    if quota_text is None or period_text is None or int(quota_text) <= 0:
        return None
    return int(quota_text) / int(period_text)


def _memory_limit_at(directory: Path, version: int) -> int | None:
    text = _read(directory / ("memory.max" if version == 2 else "memory.limit_in_bytes"))
    if not text or text == "max":
        return None
    limit = int(text)
    return None if limit >= _V1_NO_LIMIT else limit


def _tightest(
    controller: str, root: Path, read: Callable[[Path, int], T | None], files: tuple[str, str]
) -> tuple[T | None, str | None]:
    """The smallest limit `read` finds on this process's cgroup or its parents, and the
    file it came from (`files` names the v1 and the v2 file)."""
    best: tuple[T | None, str | None] = (None, None)
    for group in cgroup_dirs(controller, root):
        for directory in group.up_to_mount():
            limit = read(directory, group.version)
            if limit is not None and (best[0] is None or limit < best[0]):
                name = files[group.version - 1]
                best = (limit, str(Path("/") / (directory / name).relative_to(root)))
    return best


def read_cpu_quota(root: Path = Path("/")) -> tuple[float | None, str | None]:
    """The tightest CPU quota on this process's cgroup or its parents, in CPUs."""
    return _tightest("cpu", root, _cpu_quota_at, ("cpu.cfs_quota_us", "cpu.max"))


def read_memory_limit(root: Path = Path("/")) -> tuple[int | None, str | None]:
    """The tightest memory limit on this process's cgroup or its parents, in bytes."""
    return _tightest("memory", root, _memory_limit_at, ("memory.limit_in_bytes", "memory.max"))


def read_affinity() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def read_memory_measure() -> str:
    """What a worker's own memory is here: USS, or RSS where the platform gives no USS."""
    from microsvc.observe.scoreboard import read_memory

    sample = read_memory(os.getpid())
    return sample.measure if sample is not None else "RSS"


def with_app_memory(facts: SystemFacts, own: int, measure: str) -> SystemFacts:
    """`facts` with the measured own memory of a process that imported the app (the
    budget of one worker for `--memory-per-worker auto`)."""
    return replace(
        facts,
        app_memory=own,
        app_memory_source=f"own memory ({measure}) of a process that imported the app",
    )


def read_system_facts(root: Path = Path("/")) -> SystemFacts:
    """Everything planning needs about this process, read from the live system."""
    quota, quota_source = read_cpu_quota(root)
    memory, memory_source = read_memory_limit(root)
    return SystemFacts(
        memory_measure=read_memory_measure(),
        host_cpus=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        affinity_cpus=read_affinity(),
        cpu_quota=quota,
        cpu_quota_source=quota_source,
        memory_limit=memory,
        memory_limit_source=memory_source,
        host_memory=psutil.virtual_memory().total,
    )
