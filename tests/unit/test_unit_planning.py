"""microsvc.planning.plan: usable CPUs, the formula per class, memory and --max-workers caps."""

from __future__ import annotations

import json

import pytest

from microsvc.config.options import WorkerClass
from microsvc.planning.plan import (
    DEFAULT_MEMORY_PER_WORKER,
    GTHREAD_THREADS,
    SystemFacts,
    formula,
    plan_workers,
    usable_cpus,
)

MiB = 1024**2
GiB = 1024**3
QUOTA_FILE = "/sys/fs/cgroup/cpu.max"
MEMORY_FILE = "/sys/fs/cgroup/memory.max"


# --- usable_cpus ---------------------------------------------------------------------


def test_usable_cpus_without_limits_is_the_host() -> None:
    cpus, limited_by, sources = usable_cpus(SystemFacts(host_cpus=8))
    assert (cpus, limited_by) == (8, "host")
    assert [s.name for s in sources] == ["host", "affinity", "quota"]
    assert [s.cpus for s in sources] == [8, None, None]


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        pytest.param(SystemFacts(host_cpus=8, affinity_cpus=8), (8, "host"), id="no-quota"),
        pytest.param(
            SystemFacts(host_cpus=8, affinity_cpus=8, cpu_quota=1.5, cpu_quota_source=QUOTA_FILE),
            (2, "quota"),
            id="fractional-quota-rounds-up",
        ),
        pytest.param(
            SystemFacts(host_cpus=8, cpu_quota=0.2, cpu_quota_source=QUOTA_FILE),
            (1, "quota"),
            id="small-quota-gives-one",
        ),
        pytest.param(
            SystemFacts(host_cpus=8, affinity_cpus=2, cpu_quota=3.0, cpu_quota_source=QUOTA_FILE),
            (2, "affinity"),
            id="affinity-below-quota",
        ),
        pytest.param(
            SystemFacts(host_cpus=8, affinity_cpus=6, cpu_quota=2.0, cpu_quota_source=QUOTA_FILE),
            (2, "quota"),
            id="quota-below-affinity",
        ),
        pytest.param(
            SystemFacts(host_cpus=2, affinity_cpus=4, cpu_quota=6.0, cpu_quota_source=QUOTA_FILE),
            (2, "host"),
            id="host-smallest",
        ),
        pytest.param(SystemFacts(host_cpus=0), (1, "host"), id="at-least-one"),
    ],
)
def test_usable_cpus_takes_the_smallest_source(
    facts: SystemFacts, expected: tuple[int, str]
) -> None:
    cpus, limited_by, _ = usable_cpus(facts)
    assert (cpus, limited_by) == expected


def test_usable_cpus_sources_describe_the_quota_file() -> None:
    _, _, sources = usable_cpus(
        SystemFacts(host_cpus=8, cpu_quota=1.5, cpu_quota_source=QUOTA_FILE)
    )
    quota = next(s for s in sources if s.name == "quota")
    assert quota.cpus == 1.5
    assert QUOTA_FILE in quota.detail


# --- formula ---------------------------------------------------------------------------


@pytest.mark.parametrize("cpus", [1, 2, 4, 16])
@pytest.mark.parametrize("worker_class", [WorkerClass.SYNC, WorkerClass.GTHREAD])
def test_formula_for_blocking_classes_is_two_per_cpu_plus_one(
    worker_class: WorkerClass, cpus: int
) -> None:
    assert formula(worker_class, cpus) == ("2*cpus+1", 2 * cpus + 1)


@pytest.mark.parametrize("cpus", [1, 2, 4, 16])
@pytest.mark.parametrize("worker_class", [WorkerClass.GEVENT, WorkerClass.EVENTLET])
def test_formula_for_cooperative_classes_is_one_per_cpu(
    worker_class: WorkerClass, cpus: int
) -> None:
    assert formula(worker_class, cpus) == ("cpus", cpus)


@pytest.mark.parametrize(
    ("worker_class", "workers", "threads"),
    [
        (WorkerClass.SYNC, 9, 1),
        (WorkerClass.GTHREAD, 9, GTHREAD_THREADS),
        (WorkerClass.GEVENT, 4, 1),
        (WorkerClass.EVENTLET, 4, 1),
    ],
)
def test_plan_workers_auto_follows_the_formula(
    worker_class: WorkerClass, workers: int, threads: int
) -> None:
    plan = plan_workers(SystemFacts(host_cpus=4), worker_class)
    assert (plan.workers, plan.threads) == (workers, threads)
    assert plan.formula_workers == workers
    assert plan.workers_from == "planned"
    assert plan.usable_cpus == 4
    assert plan.caps == ()
    assert plan.notes == ()


def test_gthread_auto_threads_is_four() -> None:
    assert GTHREAD_THREADS == 4


def test_plan_uses_the_quota_for_the_formula() -> None:
    facts = SystemFacts(host_cpus=16, cpu_quota=1.5, cpu_quota_source=QUOTA_FILE)
    plan = plan_workers(facts, WorkerClass.SYNC)
    assert plan.usable_cpus == 2
    assert plan.cpu_limited_by == "quota"
    assert plan.workers == 5


# --- memory caps -----------------------------------------------------------------------


def test_cgroup_memory_limit_caps_auto_workers() -> None:
    facts = SystemFacts(host_cpus=8, memory_limit=512 * MiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(facts, WorkerClass.SYNC, memory_per_worker=128 * MiB)
    assert plan.formula_workers == 17
    assert plan.memory_cap == 4
    assert plan.workers == 4
    assert len(plan.caps) == 1
    cap = plan.caps[0]
    assert cap.startswith("memory:")
    assert MEMORY_FILE in cap
    assert "512MiB" in cap and "128MiB" in cap and "4 workers" in cap


def test_memory_cap_is_at_least_one_worker() -> None:
    facts = SystemFacts(host_cpus=8, memory_limit=64 * MiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(facts, WorkerClass.GEVENT, memory_per_worker=128 * MiB)
    assert plan.memory_cap == 1
    assert plan.workers == 1


def test_memory_per_worker_changes_the_cap() -> None:
    facts = SystemFacts(host_cpus=8, memory_limit=1 * GiB, memory_limit_source=MEMORY_FILE)
    small = plan_workers(facts, WorkerClass.SYNC, memory_per_worker=64 * MiB)
    large = plan_workers(facts, WorkerClass.SYNC, memory_per_worker=256 * MiB)
    assert (small.memory_cap, small.workers) == (16, 16)
    assert (large.memory_cap, large.workers) == (4, 4)


def test_memory_above_the_formula_does_not_cap() -> None:
    facts = SystemFacts(host_cpus=2, memory_limit=4 * GiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(facts, WorkerClass.SYNC, memory_per_worker=128 * MiB)
    assert plan.memory_cap == 32
    assert plan.workers == 5
    assert plan.caps == ()


def test_host_memory_caps_when_there_is_no_cgroup_limit() -> None:
    facts = SystemFacts(host_cpus=8, host_memory=1 * GiB)
    plan = plan_workers(facts, WorkerClass.SYNC, memory_per_worker=256 * MiB)
    assert plan.memory_cap == 4
    assert plan.workers == 4
    assert "host memory" in plan.caps[0]


@pytest.mark.parametrize(
    ("memory_limit", "host_memory", "cap", "source"),
    [
        (512 * MiB, 16 * GiB, 4, MEMORY_FILE),
        (2 * GiB, 256 * MiB, 2, "host memory"),
    ],
)
def test_smaller_of_cgroup_and_host_memory_caps(
    memory_limit: int, host_memory: int, cap: int, source: str
) -> None:
    facts = SystemFacts(
        host_cpus=8,
        memory_limit=memory_limit,
        memory_limit_source=MEMORY_FILE,
        host_memory=host_memory,
    )
    plan = plan_workers(facts, WorkerClass.SYNC, memory_per_worker=128 * MiB)
    assert plan.memory_cap == cap
    assert plan.workers == cap
    assert source in plan.caps[0]


def test_no_memory_facts_means_no_memory_cap() -> None:
    plan = plan_workers(SystemFacts(host_cpus=8), WorkerClass.SYNC)
    assert plan.memory_cap is None
    assert plan.workers == 17


# --- explicit workers, max_workers, threads -------------------------------------------


def test_explicit_workers_override_the_formula() -> None:
    plan = plan_workers(
        SystemFacts(host_cpus=8), WorkerClass.SYNC, workers=3, workers_from="command line"
    )
    assert plan.workers == 3
    assert plan.formula is None
    assert plan.formula_workers is None
    assert plan.workers_from == "set explicitly (command line)"


def test_explicit_workers_are_not_memory_capped_but_noted() -> None:
    facts = SystemFacts(host_cpus=8, memory_limit=512 * MiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(
        facts,
        WorkerClass.SYNC,
        workers=10,
        memory_per_worker=128 * MiB,
        workers_from="environment (WEB_CONCURRENCY)",
    )
    assert plan.workers == 10
    assert plan.memory_cap == 4
    assert plan.caps == ()
    assert len(plan.notes) == 1
    note = plan.notes[0]
    assert "10 workers" in note and "exceed" in note
    assert "512MiB" in note and MEMORY_FILE in note


def test_explicit_workers_within_memory_get_no_note() -> None:
    facts = SystemFacts(host_cpus=8, memory_limit=512 * MiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(facts, WorkerClass.SYNC, workers=4, memory_per_worker=128 * MiB)
    assert plan.workers == 4
    assert plan.notes == ()


def test_max_workers_caps_auto() -> None:
    plan = plan_workers(SystemFacts(host_cpus=8), WorkerClass.SYNC, max_workers=5)
    assert plan.formula_workers == 17
    assert plan.workers == 5
    assert plan.caps == ("--max-workers 5",)


def test_max_workers_above_the_plan_changes_nothing() -> None:
    plan = plan_workers(SystemFacts(host_cpus=2), WorkerClass.SYNC, max_workers=50)
    assert plan.workers == 5
    assert plan.caps == ()


def test_max_workers_caps_explicit_workers() -> None:
    plan = plan_workers(SystemFacts(host_cpus=8), WorkerClass.SYNC, workers=10, max_workers=3)
    assert plan.workers == 3
    assert plan.caps == ("--max-workers 3",)


def test_memory_and_max_workers_caps_both_apply() -> None:
    facts = SystemFacts(host_cpus=8, memory_limit=1 * GiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(facts, WorkerClass.SYNC, memory_per_worker=128 * MiB, max_workers=3)
    assert plan.workers == 3
    assert len(plan.caps) == 2
    assert plan.caps[0].startswith("memory:")
    assert plan.caps[1] == "--max-workers 3"


@pytest.mark.parametrize(
    ("worker_class", "threads", "expected"),
    [
        (WorkerClass.GTHREAD, 8, 8),
        (WorkerClass.GTHREAD, 1, 1),
        (WorkerClass.GTHREAD, "auto", GTHREAD_THREADS),
        (WorkerClass.SYNC, "auto", 1),
        (WorkerClass.GEVENT, 8, 1),
        (WorkerClass.EVENTLET, "auto", 1),
    ],
)
def test_threads(worker_class: WorkerClass, threads: int | str, expected: int) -> None:
    plan = plan_workers(SystemFacts(host_cpus=2), worker_class, threads=threads)  # type: ignore[arg-type]
    assert plan.threads == expected


# --- explain, summary, as_dict --------------------------------------------------------


@pytest.fixture
def capped_plan():  # type: ignore[no-untyped-def]
    facts = SystemFacts(
        host_cpus=16,
        affinity_cpus=8,
        cpu_quota=2.5,
        cpu_quota_source=QUOTA_FILE,
        memory_limit=256 * MiB,
        memory_limit_source=MEMORY_FILE,
    )
    return plan_workers(facts, WorkerClass.GTHREAD, memory_per_worker=128 * MiB)


def test_explain_marks_the_winning_cpu_source(capped_plan) -> None:  # type: ignore[no-untyped-def]
    lines = capped_plan.explain()
    assert lines[0] == "usable CPUs: 3"
    source_lines = lines[1:4]
    marked = [line for line in source_lines if line.startswith("  * ")]
    unmarked = [line for line in source_lines if line.startswith("    ")]
    assert len(marked) == 1 and len(unmarked) == 2
    assert marked[0].split()[1:3] == ["quota", "2.5"]
    assert QUOTA_FILE in marked[0]
    assert sorted(line.split()[0] for line in unmarked) == ["affinity", "host"]


def test_explain_shows_formula_memory_cap_and_threads(capped_plan) -> None:  # type: ignore[no-untyped-def]
    text = "\n".join(capped_plan.explain())
    assert "worker class: gthread" in text
    assert "workers: 2  (formula for gthread: 2*cpus+1 with cpus=3 gives 7)" in text
    memory_line = next(line for line in capped_plan.explain() if "memory allows" in line)
    assert memory_line.startswith("  memory allows at most 2 workers: 256MiB")
    assert "capped: memory:" in text
    assert "threads per worker: 4" in text


def test_explain_for_explicit_workers_shows_origin_and_note() -> None:
    facts = SystemFacts(host_cpus=4, memory_limit=256 * MiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(
        facts, WorkerClass.SYNC, workers=6, memory_per_worker=128 * MiB, workers_from="PORT"
    )
    lines = plan.explain()
    assert "workers: 6  (set explicitly (PORT))" in lines
    assert any(line.startswith("note: 6 workers") for line in lines)
    assert not any("formula" in line for line in lines)


def test_explain_marks_host_when_unlimited() -> None:
    lines = plan_workers(SystemFacts(host_cpus=4), WorkerClass.SYNC).explain()
    marked = [line for line in lines if line.startswith("  * ")]
    assert len(marked) == 1
    assert marked[0].split()[1:3] == ["host", "4"]
    quota_line = next(line for line in lines if line.split()[:1] == ["quota"])
    assert quota_line.split()[1] == "none"


def test_summary_names_limit_formula_and_caps(capped_plan) -> None:  # type: ignore[no-untyped-def]
    summary = capped_plan.summary()
    assert summary.startswith("2 gthread workers, 4 threads each; 3 usable CPUs")
    assert "(limited by quota)" in summary
    assert "2*cpus+1 = 7 for gthread" in summary
    assert "capped: memory:" in summary


def test_summary_of_explicit_sync_plan() -> None:
    plan = plan_workers(
        SystemFacts(host_cpus=4, affinity_cpus=2),
        WorkerClass.SYNC,
        workers=3,
        workers_from="command line",
    )
    summary = plan.summary()
    assert summary == (
        "3 sync workers; 2 usable CPUs (limited by affinity); set explicitly (command line)"
    )
    assert "threads" not in summary


def test_as_dict_is_plain_data(capped_plan) -> None:  # type: ignore[no-untyped-def]
    data = capped_plan.as_dict()
    assert data["worker_class"] == "gthread"
    assert type(data["worker_class"]) is str
    assert data["workers"] == 2
    assert data["threads"] == 4
    assert data["usable_cpus"] == 3
    assert data["cpu_limited_by"] == "quota"
    assert data["formula"] == "2*cpus+1"
    assert data["formula_workers"] == 7
    assert data["memory_cap"] == 2
    assert len(data["caps"]) == 1 and data["caps"][0].startswith("memory:")
    quota = next(s for s in data["cpu_sources"] if s["name"] == "quota")
    assert quota["cpus"] == 2.5
    decoded = json.loads(json.dumps(data))
    assert decoded["cpu_limited_by"] == "quota"


# --- --memory-per-worker auto and the memory measure -------------------------------------


def test_auto_memory_per_worker_plans_with_the_measured_app() -> None:
    facts = SystemFacts(
        host_cpus=8,
        memory_limit=1 * GiB,
        memory_limit_source=MEMORY_FILE,
        app_memory=300 * MiB,
        app_memory_source="own memory (USS) of a process that imported the app",
    )
    plan = plan_workers(facts, WorkerClass.SYNC, memory_per_worker="auto")
    assert (plan.memory_per_worker, plan.memory_cap, plan.workers) == (300 * MiB, 3, 3)
    assert plan.memory_per_worker_from == (
        "measured: own memory (USS) of a process that imported the app"
    )
    assert plan.notes == ()
    assert "memory per worker: 300MiB (measured: own memory (USS)" in "\n".join(plan.explain())
    assert "300MiB per worker = 3 workers" in plan.caps[0]


def test_auto_memory_per_worker_without_a_measurement_assumes_the_default() -> None:
    facts = SystemFacts(host_cpus=8, memory_limit=1 * GiB, memory_limit_source=MEMORY_FILE)
    plan = plan_workers(facts, WorkerClass.SYNC, memory_per_worker="auto")
    assert (plan.memory_per_worker, plan.memory_cap) == (DEFAULT_MEMORY_PER_WORKER, 8)
    assert plan.memory_per_worker_from.startswith("auto, not measured")
    [note] = plan.notes
    assert note.startswith("--memory-per-worker auto: auto, not measured") and "128MiB" in note


def test_the_plan_says_which_memory_measure_workers_are_limited_by() -> None:
    uss = plan_workers(SystemFacts(host_cpus=2), WorkerClass.SYNC)
    assert uss.memory_measure == "USS" and uss.as_dict()["memory_measure"] == "USS"
    assert any(line.startswith("worker memory measure: USS") for line in uss.explain())
    rss = plan_workers(SystemFacts(host_cpus=2, memory_measure="RSS"), WorkerClass.SYNC)
    assert any(
        line.startswith("worker memory measure: RSS (this platform gives no USS")
        for line in rss.explain()
    )
    assert uss.memory_per_worker_from == "--memory-per-worker"
