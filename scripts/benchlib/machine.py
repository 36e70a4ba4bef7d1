"""The machine the benchmark runs on, and how its CPUs are split between server and wrk."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from harness import cpu_list

#: From this many CPUs on, the server and wrk get CPUs of their own.
PIN_MIN_CPUS = 8

#: Open files the benchmark asks for (gevent and eventlet run at 1000 connections).
WANTED_NOFILE = 65536


@dataclass(frozen=True)
class Pinning:
    """The CPUs the bench may use; the server's and wrk's share when pinned."""

    available: tuple[int, ...]
    server_cpus: tuple[int, ...] | None = None
    wrk_cpus: tuple[int, ...] | None = None
    reason: str = ""

    @property
    def pinned(self) -> bool:
        return self.server_cpus is not None

    def describe(self) -> str:
        if self.server_cpus and self.wrk_cpus:
            return (
                f"server pinned to CPUs {cpu_list(self.server_cpus)} "
                f"({len(self.server_cpus)}), wrk to CPUs {cpu_list(self.wrk_cpus)} "
                f"({len(self.wrk_cpus)}) with taskset"
            )
        return (
            f"unpinned: server and wrk share {len(self.available)} CPUs "
            f"({cpu_list(self.available)}); {self.reason}"
        )


def choose_pinning(pin: bool, per_core: bool = False) -> Pinning:
    """From PIN_MIN_CPUS on, a quarter of the CPUs (at least 2) for wrk and the rest for
    the server; fewer CPUs are too few to split, and both run unpinned. `per_core` (the
    engine section): the server on the first CPU, wrk on the second, from 2 CPUs on."""
    available = tuple(sorted(os.sched_getaffinity(0)))
    count = len(available)
    if not pin:
        return Pinning(available, reason="--no-pin was given")
    if per_core and count < 2:
        return Pinning(available, reason="one CPU only: server and wrk share it")
    if not per_core and count < PIN_MIN_CPUS:
        return Pinning(
            available,
            reason=f"fewer than {PIN_MIN_CPUS} CPUs are too few to give wrk CPUs of its own, "
            "so wrk takes CPU time from the server and absolute numbers are low; "
            "compare the ratios",
        )
    if shutil.which("taskset") is None:
        return Pinning(available, reason="taskset is not installed")
    if per_core:
        return Pinning(available, available[:1], available[1:2])
    wrk_count = max(2, count // 4)
    return Pinning(available, available[: count - wrk_count], available[count - wrk_count :])


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE (inherited by servers and wrk)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_NOFILE if hard == resource.RLIM_INFINITY else min(hard, WANTED_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return soft, hard
        soft = wanted
    return soft, hard


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() in ("model name", "Processor", "cpu model"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(pinning: Pinning, wrk_version: str, nofile: tuple[int, int]) -> dict[str, Any]:
    memory = psutil.virtual_memory().total
    packages = ("microsvc", "gunicorn", "flask", "gevent", "eventlet", "gunicorn_h1c")
    return {
        "cpu_model": cpu_model(),
        "host_cpus": os.cpu_count(),
        "available_cpus": len(pinning.available),
        "available_cpu_list": cpu_list(pinning.available),
        "pinned": pinning.pinned,
        "server_cpus": cpu_list(pinning.server_cpus) or None,
        "wrk_cpus": cpu_list(pinning.wrk_cpus) or None,
        "pinning": pinning.describe(),
        "memory_bytes": memory,
        "memory": f"{memory / 1024**3:.1f} GiB",
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "versions": {name: package_version(name) for name in packages},
        "wrk": wrk_version,
        "open_files_limit": {"soft": nofile[0], "hard": nofile[1]},
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
