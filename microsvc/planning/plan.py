"""Worker planning: pure arithmetic from what the system allows to a worker plan.

Nothing here reads the machine; `microsvc.planning.system` does that and hands in `SystemFacts`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from microsvc.config.options import WorkerClass
from microsvc.config.values import Auto, format_size

#: Threads per gthread worker when --threads is auto.
GTHREAD_THREADS = 4
#: --memory-per-worker by default, and with `auto` when the app was not measured.
DEFAULT_MEMORY_PER_WORKER = 128 * 1024**2


@dataclass(frozen=True)
class SystemFacts:
    """What limits this process: CPUs and memory, each with where it was read."""

    host_cpus: int
    affinity_cpus: int | None = None
    cpu_quota: float | None = None
    cpu_quota_source: str | None = None
    memory_limit: int | None = None
    memory_limit_source: str | None = None
    host_memory: int | None = None
    #: What a worker's own memory is on this platform: USS (its private pages), or RSS
    #: where the platform gives no USS. --max-worker-memory compares it.
    memory_measure: str = "USS"
    #: The own memory of a process that has imported the app (`microsvc plan --measure`,
    #: `--memory-per-worker auto`), and how it was measured; None: not measured.
    app_memory: int | None = None
    app_memory_source: str = ""


@dataclass(frozen=True)
class CpuSource:
    name: str
    cpus: float | None
    detail: str


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers of which class, and why."""

    worker_class: WorkerClass
    workers: int
    threads: int
    usable_cpus: int
    cpu_sources: tuple[CpuSource, ...]
    cpu_limited_by: str
    workers_from: str
    formula: str | None
    formula_workers: int | None
    memory_cap: int | None
    caps: tuple[str, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)
    memory: int | None = None
    memory_source: str = ""
    memory_per_worker: int | None = None
    #: Where memory_per_worker came from: "--memory-per-worker", "measured: ...", or
    #: "auto, not measured: ...".
    memory_per_worker_from: str = "--memory-per-worker"
    #: What a worker's own memory is here (USS, or RSS where there is no USS).
    memory_measure: str = "USS"

    def summary(self) -> str:
        """One line for the start-up log."""
        threads = f", {self.threads} threads each" if self.worker_class == "gthread" else ""
        why = (
            f"{self.formula} = {self.formula_workers} for {self.worker_class}"
            if self.formula
            else self.workers_from
        )
        caps = f"; capped: {'; '.join(self.caps)}" if self.caps else ""
        return (
            f"{self.workers} {self.worker_class} workers{threads}; {self.usable_cpus} usable "
            f"CPUs (limited by {self.cpu_limited_by}); {why}{caps}"
        )

    def explain(self) -> list[str]:
        """The plan as lines a person reads."""
        lines = [f"usable CPUs: {self.usable_cpus}"]
        for source in self.cpu_sources:
            mark = "*" if source.name == self.cpu_limited_by else " "
            value = "none" if source.cpus is None else _number(source.cpus)
            lines.append(f"  {mark} {source.name:<9} {value:<6} {source.detail}")
        lines.append(f"worker class: {self.worker_class}")
        if self.formula:
            lines.append(
                f"workers: {self.workers}  (formula for {self.worker_class}: "
                f"{self.formula} with cpus={self.usable_cpus} gives "
                f"{self.formula_workers})"
            )
        else:
            lines.append(f"workers: {self.workers}  ({self.workers_from})")
        if self.memory_cap is not None and self.memory and self.memory_per_worker:
            lines.append(
                f"  memory allows at most {self.memory_cap} workers: "
                f"{format_size(self.memory)} ({self.memory_source}) / "
                f"{format_size(self.memory_per_worker)} per worker"
            )
        if self.memory_per_worker:
            lines.append(
                f"memory per worker: {format_size(self.memory_per_worker)} "
                f"({self.memory_per_worker_from})"
            )
        lines.append(
            f"worker memory measure: {self.memory_measure} (a worker's own pages; "
            "--max-worker-memory compares it, pages shared after --preload do not count)"
            if self.memory_measure == "USS"
            else f"worker memory measure: {self.memory_measure} (this platform gives no "
            "USS; --max-worker-memory compares resident memory)"
        )
        for cap in self.caps:
            lines.append(f"  capped: {cap}")
        lines.append(f"threads per worker: {self.threads}")
        lines.extend(f"note: {note}" for note in self.notes)
        return lines

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["worker_class"] = str(self.worker_class)
        return data


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def usable_cpus(facts: SystemFacts) -> tuple[int, str, tuple[CpuSource, ...]]:
    """The CPUs this process may use: the smallest of host, affinity and quota.

    A fractional quota rounds up (1.5 CPUs of time keep 2 CPUs busy part of the time);
    the result is at least 1.
    """
    sources = (
        CpuSource("host", facts.host_cpus, "logical CPUs of the machine"),
        CpuSource(
            "affinity",
            facts.affinity_cpus,
            "CPUs this process may run on (taskset, cpuset)"
            if facts.affinity_cpus
            else "not available",
        ),
        CpuSource(
            "quota",
            facts.cpu_quota,
            f"CPU time limit from {facts.cpu_quota_source}"
            if facts.cpu_quota
            else "no CPU quota in this process's cgroup",
        ),
    )
    limits = [(math.ceil(s.cpus), s.name) for s in sources if s.cpus]
    count, name = min(limits, key=lambda item: item[0]) if limits else (1, "host")
    return max(1, count), name, sources


def formula(worker_class: WorkerClass, cpus: int) -> tuple[str, int]:
    """The worker count each class peaks at, from measurement.

    sync: a worker blocks on each request, so extra workers cover I/O waits: 2*cpus+1.
    gevent, eventlet: one worker runs many requests and keeps a CPU busy by itself;
    beyond one per CPU the workers only compete (2*cpus+1 measured 39% slower).
    gthread: the GIL limits each worker to one CPU of Python, threads cover I/O: 2*cpus+1.
    """
    if worker_class in (WorkerClass.GEVENT, WorkerClass.EVENTLET):
        return "cpus", cpus
    return "2*cpus+1", 2 * cpus + 1


def plan_workers(
    facts: SystemFacts,
    worker_class: WorkerClass,
    workers: int | Auto = "auto",
    threads: int | Auto = "auto",
    max_workers: int | None = None,
    memory_per_worker: int | Auto = DEFAULT_MEMORY_PER_WORKER,
    workers_from: str = "default",
) -> WorkerPlan:
    """Decide workers and threads. `workers_from` says where an explicit count came from.
    `memory_per_worker="auto"` takes the app's measured memory (`facts.app_memory`)."""
    cpus, limited_by, sources = usable_cpus(facts)
    caps: list[str] = []
    notes: list[str] = []
    memory_per_worker, per_worker_from = _memory_per_worker(facts, memory_per_worker)
    if per_worker_from.startswith("auto, not measured"):
        notes.append(f"--memory-per-worker auto: {per_worker_from}")

    memory, memory_source = _memory_limit(facts)
    memory_cap = max(1, memory // memory_per_worker) if memory else None

    if workers == "auto":
        formula_text, count = formula(worker_class, cpus)
        planned_from = "planned"
        if memory_cap is not None and count > memory_cap:
            caps.append(
                f"memory: {format_size(memory or 0)} ({memory_source}) / "
                f"{format_size(memory_per_worker)} per worker = {memory_cap} workers"
            )
            count_after = memory_cap
        else:
            count_after = count
        formula_workers: int | None = count
    else:
        formula_text, formula_workers, count_after = None, None, workers
        planned_from = f"set explicitly ({workers_from})"
        if memory_cap is not None and workers > memory_cap:
            notes.append(
                f"{workers} workers x {format_size(memory_per_worker)} exceed the "
                f"memory limit of {format_size(memory or 0)} ({memory_source})"
            )
    if max_workers is not None and count_after > max_workers:
        caps.append(f"--max-workers {max_workers}")
        count_after = max_workers

    if worker_class == WorkerClass.GTHREAD:
        thread_count = GTHREAD_THREADS if threads == "auto" else threads
    else:
        thread_count = 1
    return WorkerPlan(
        worker_class=worker_class,
        workers=count_after,
        threads=thread_count,
        usable_cpus=cpus,
        cpu_sources=sources,
        cpu_limited_by=limited_by,
        workers_from=planned_from,
        formula=formula_text,
        formula_workers=formula_workers,
        memory_cap=memory_cap,
        caps=tuple(caps),
        notes=tuple(notes),
        memory=memory,
        memory_source=memory_source,
        memory_per_worker=memory_per_worker,
        memory_per_worker_from=per_worker_from,
        memory_measure=facts.memory_measure,
    )


def _memory_per_worker(facts: SystemFacts, setting: int | Auto) -> tuple[int, str]:
    """The memory budget of one worker, and where it came from."""
    if setting != "auto":
        return setting, "--memory-per-worker"
    if facts.app_memory:
        return facts.app_memory, f"measured: {facts.app_memory_source}"
    return DEFAULT_MEMORY_PER_WORKER, (
        f"auto, not measured: the app could not be imported to measure it; "
        f"{format_size(DEFAULT_MEMORY_PER_WORKER)} assumed"
    )


def _memory_limit(facts: SystemFacts) -> tuple[int | None, str]:
    candidates = [
        (facts.memory_limit, facts.memory_limit_source or "cgroup"),
        (facts.host_memory, "host memory"),
    ]
    known = [(size, source) for size, source in candidates if size]
    if not known:
        return None, ""
    size, source = min(known, key=lambda item: item[0] or 0)
    return size, source
