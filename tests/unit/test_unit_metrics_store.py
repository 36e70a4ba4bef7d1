"""The metrics store: dead processes' files fold into the archive, totals unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from microsvc.metrics.store import MetricsStore


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write(
    store: MetricsStore,
    name: str,
    samples: dict[tuple[str, str, str], float],
    timestamp: float = 0.0,
) -> None:
    """Write (metric, sample name, status label) -> value into one process file."""
    values = MmapedDict(str(store.path / name))
    try:
        for (metric, sample, status), value in samples.items():
            labels = ["status"] if status else []
            key = mmap_key(metric, sample, labels, [status] if status else [], "help")
            values.write_value(key, value, timestamp)
    finally:
        values.close()


def totals(store: MetricsStore) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    collected = MultiProcessCollector(None, path=str(store.path)).collect()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in collected
        for sample in family.samples
    }


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetricsStore]:
    path = tmp_path / "store"
    path.mkdir()
    store = MetricsStore(path)
    yield store
    store.close()


def test_create_makes_a_private_directory_and_remove_deletes_it(tmp_path: Path) -> None:
    store = MetricsStore.create(str(tmp_path))
    assert store.path.is_dir() and store.path.parent == tmp_path
    assert store.path.name.startswith("microsvc-metrics-")
    assert oct(store.path.stat().st_mode & 0o777) == "0o700"
    store.remove()
    assert not store.path.exists()


def test_compaction_keeps_every_total_and_removes_dead_files(store: MetricsStore) -> None:
    live, gone_a, gone_b = os.getpid(), dead_pid(), dead_pid()
    counter = "requests"
    write(store, f"counter_{live}.db", {(counter, "requests_total", "200"): 5})
    write(store, f"counter_{gone_a}.db", {(counter, "requests_total", "200"): 7})
    write(
        store,
        f"counter_{gone_b}.db",
        {(counter, "requests_total", "200"): 2, (counter, "requests_total", "500"): 1},
    )
    hist = "latency"
    write(
        store,
        f"histogram_{gone_a}.db",
        {(hist, "latency_sum", ""): 1.5, (hist, "latency_count", ""): 3},
    )
    write(store, f"gauge_livesum_{gone_a}.db", {("in_flight", "in_flight", ""): 2})
    write(store, f"gauge_livesum_{live}.db", {("in_flight", "in_flight", ""): 1})
    write(store, f"gauge_all_{gone_a}.db", {("temperature", "temperature", ""): 20})
    before = totals(store)

    assert sorted(store.compact()) == sorted([gone_a, gone_b])

    after = totals(store)
    in_flight = ("in_flight", ())
    assert after.pop(in_flight) == 1  # the dead process's requests are no longer in flight
    assert before.pop(in_flight) == 3
    assert before.pop(("temperature", (("pid", str(gone_a)),))) == 20  # a dead pid's series
    assert after == before
    names = sorted(path.name for path in store.path.glob("*.db"))
    assert names == sorted(
        [
            f"counter_{live}.db",
            "counter_archive.db",
            "histogram_archive.db",
            f"gauge_livesum_{live}.db",
        ]
    )
    assert store.compact() == []


def test_compaction_adds_to_the_archive_again_and_again(store: MetricsStore) -> None:
    for round_ in range(1, 4):
        write(store, f"counter_{dead_pid()}.db", {("hits", "hits_total", ""): 10})
        store.compact()
        assert totals(store)[("hits_total", ())] == 10 * round_
    assert [path.name for path in store.path.glob("*.db")] == ["counter_archive.db"]


def test_keep_protects_a_process(store: MetricsStore) -> None:
    pid = dead_pid()
    write(store, f"counter_{pid}.db", {("hits", "hits_total", ""): 1})
    assert store.compact(keep=frozenset({pid})) == []
    assert (store.path / f"counter_{pid}.db").exists()


def test_unrelated_files_are_left_alone(store: MetricsStore) -> None:
    for name in ("notes.txt", "counter.db", "weird_name_here_x.db", "counter_abc.db"):
        (store.path / name).write_bytes(b"")
    assert store.compact() == []
    assert len(list(store.path.iterdir())) == 4


def test_exit_notes_are_taken_once(store: MetricsStore) -> None:
    store.note_exit(1234, "memory")
    assert store.take_exit_note(1234) == "memory"
    assert store.take_exit_note(1234) is None
    assert store.take_exit_note(999) is None
    assert not list(store.path.glob("*.exit*"))


def test_a_scrape_holding_the_read_lock_delays_compaction(store: MetricsStore) -> None:
    write(store, f"counter_{dead_pid()}.db", {("hits", "hits_total", ""): 1})
    done = threading.Event()

    def compact() -> None:
        store.compact()
        done.set()

    with store.reading():
        worker = threading.Thread(target=compact)
        worker.start()
        time.sleep(0.3)
        assert not done.is_set()
    worker.join(10)
    assert done.is_set()
    assert totals(store)[("hits_total", ())] == 1


def gauge_files(store: MetricsStore) -> list[str]:
    return sorted(path.name for path in store.path.glob("gauge_*.db"))


@pytest.mark.parametrize(
    ("mode", "dead_values", "live_value", "expected"),
    [
        ("sum", [4, -1, 0], 2, 5),  # every process's value, alive or dead, added up
        ("min", [4, -1, 0], 2, -1),
        ("max", [4, -1, 0], 2, 4),
        ("max", [-4, -1], -2, -1),  # a dead process's value is kept, even below zero
        ("min", [0], 3, 0),  # and when it is zero
    ],
)
def test_dead_processes_gauges_fold_into_one_archive_per_mode_keeping_the_value(
    store: MetricsStore, mode: str, dead_values: list[float], live_value: float, expected: float
) -> None:
    live = os.getpid()
    load = ("load", "load", "")
    for value in dead_values:  # one compaction per reaped worker, as in the master
        write(store, f"gauge_{mode}_{dead_pid()}.db", {load: value})
        write(store, f"gauge_{mode}_{live}.db", {load: live_value})
        store.compact()
        assert len(gauge_files(store)) == 2
    assert totals(store) == {("load", ()): expected}
    assert gauge_files(store) == sorted([f"gauge_{mode}_archive.db", f"gauge_{mode}_{live}.db"])


def test_a_dead_processes_mostrecent_gauge_is_kept_until_a_later_value(
    store: MetricsStore,
) -> None:
    live = os.getpid()
    version = ("version", "version", "")
    write(store, f"gauge_mostrecent_{dead_pid()}.db", {version: 2}, timestamp=200.0)
    write(store, f"gauge_mostrecent_{dead_pid()}.db", {version: 1}, timestamp=100.0)
    store.compact()
    assert totals(store) == {("version", ()): 2}
    write(store, f"gauge_mostrecent_{dead_pid()}.db", {version: 3}, timestamp=300.0)
    store.compact()
    assert totals(store) == {("version", ()): 3}
    write(store, f"gauge_mostrecent_{live}.db", {version: 4}, timestamp=250.0)
    assert totals(store) == {("version", ()): 3}
    assert gauge_files(store) == sorted(
        ["gauge_mostrecent_archive.db", f"gauge_mostrecent_{live}.db"]
    )


@pytest.mark.parametrize(
    "mode", ["all", "liveall", "livesum", "livemin", "livemax", "livemostrecent"]
)
def test_a_dead_processes_per_process_and_live_gauges_are_dropped(
    store: MetricsStore, mode: str
) -> None:
    live, gone = os.getpid(), dead_pid()
    write(store, f"gauge_{mode}_{gone}.db", {("load", "load", ""): 7}, timestamp=100.0)
    write(store, f"gauge_{mode}_{live}.db", {("load", "load", ""): 1}, timestamp=50.0)
    assert store.compact() == [gone]
    assert gauge_files(store) == [f"gauge_{mode}_{live}.db"]
    expected = (
        {("load", (("pid", str(live)),)): 1.0} if mode.endswith("all") else {("load", ()): 1.0}
    )
    assert totals(store) == expected


def test_gauge_files_stay_bounded_however_many_processes_come_and_go(
    store: MetricsStore,
) -> None:
    modes = ("all", "sum", "min", "max", "mostrecent", "livesum")
    for round_ in range(20):
        gone = dead_pid()
        for mode in modes:
            write(store, f"gauge_{mode}_{gone}.db", {(mode, mode, ""): round_}, round_ + 1.0)
        store.compact()
    assert gauge_files(store) == sorted(
        f"gauge_{mode}_archive.db" for mode in ("sum", "min", "max", "mostrecent")
    )
    assert totals(store) == {
        ("sum", ()): sum(range(20)),
        ("min", ()): 0,
        ("max", ()): 19,
        ("mostrecent", ()): 19,
    }
