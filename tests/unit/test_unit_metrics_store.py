"""The metrics store: dead processes' files fold into the archive, totals unchanged;
request metrics written in place add up exactly, across threads, forks and kills."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client import values as prometheus_values
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from microsvc.demo import bare
from microsvc.metrics.exporter import StoreCollector
from microsvc.metrics.store import MetricsStore
from microsvc.metrics.wsgi import InstrumentedApp
from microsvc.serving import middleware
from microsvc.serving.middleware import SHED_ROUTE


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
    collected = StoreCollector(store).collect()  # what the exporter serves
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


def test_a_file_a_starting_process_has_not_sized_yet_holds_no_values(
    store: MetricsStore,
) -> None:
    # prometheus_client creates a process's file empty, then sizes it: a scrape at that
    # moment sums the other files, and the empty one adds nothing.
    write(store, f"counter_{os.getpid()}.db", {("hits", "hits_total", ""): 3})
    (store.path / f"histogram_{os.getpid()}.db").write_bytes(b"")
    assert totals(store) == {("hits_total", ()): 3}
    assert store.value_files() == [str(store.path / f"counter_{os.getpid()}.db")]


def test_a_dead_process_that_left_only_unsized_files_is_folded_away(
    store: MetricsStore,
) -> None:
    write(store, "counter_archive.db", {("hits", "hits_total", ""): 4})
    gone = dead_pid()
    for name in (f"counter_{gone}.db", f"gauge_max_{gone}.db", f"gauge_all_{gone}.db"):
        (store.path / name).write_bytes(b"")
    assert store.compact() == [gone]
    names = sorted(path.name for path in store.path.glob("*.db"))
    assert names == ["counter_archive.db", "gauge_max_archive.db"]
    assert totals(store) == {("hits_total", ()): 4}


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


# request metrics written in place (what a worker does under --metrics)


@pytest.fixture
def multiprocess(store: MetricsStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """prometheus_client's multiprocess mode writing into `store`, for this test only;
    yields its value class."""
    value_class = prometheus_values.MultiProcessValue()
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(store.path))
    monkeypatch.setattr(prometheus_values, "ValueClass", value_class)
    yield value_class
    value_class.close_all_files()


def instrumented_flask() -> InstrumentedApp:
    """A Flask app behind microsvc's middleware (shedding after 1 s), with metrics."""
    user = Flask("store-test")

    @user.get("/items/<int:item>")
    def item(item: int) -> dict[str, int]:
        return {"item": item}

    wrapped = middleware.wrap(
        user,
        health_path="/healthz",
        ready_path="/readyz",
        is_ready=lambda: True,
        trusted_proxies=("127.0.0.1",),
        max_queue_time=1.0,
    )
    return InstrumentedApp(wrapped, routes_from=user)


def waited(seconds: float) -> dict[str, str]:
    """The environ of a request a trusted proxy says waited `seconds`."""
    return {"REMOTE_ADDR": "127.0.0.1", "HTTP_X_REQUEST_START": f"t={time.time() - seconds:.3f}"}


def serve_one(app: Any, path: str, **extra: Any) -> str:
    """One request as a server makes it: call, iterate, close; returns the status."""
    seen: list[str] = []
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": io.StringIO(),
        **extra,
    }
    body = app(environ, lambda status, headers, exc_info=None: seen.append(status))
    for _chunk in body:
        pass
    body.close()
    return seen[-1]


def request_totals(store: MetricsStore, route: str, status: str) -> tuple[float, float]:
    """(requests, duration observations) of GET `route` `status`, scraped from the files."""
    found = totals(store)
    labels = (("method", "GET"), ("route", route), ("status", status))
    count = found.get(("microsvc_http_requests_total", labels), 0.0)
    observed = found.get(("microsvc_http_request_duration_seconds_count", labels), 0.0)
    return count, observed


def test_the_request_counter_is_read_from_the_histogram_and_never_written(
    store: MetricsStore, multiprocess: Any
) -> None:
    app = instrumented_flask()
    for item in range(5):
        assert serve_one(app, f"/items/{item}") == "200 OK"
    assert serve_one(app, "/nope").startswith("404")
    written = {
        key
        for path in store.path.glob("*.db")
        for key, *_rest in MmapedDict.read_all_values_from_file(str(path))
    }
    assert not any('"microsvc_http_requests"' in key for key in written)
    found = totals(store)
    counted = {k: v for k, v in found.items() if k[0] == "microsvc_http_requests_total"}
    observed = {
        ("microsvc_http_requests_total", labels): value
        for (name, labels), value in found.items()
        if name == "microsvc_http_request_duration_seconds_count"
    }
    assert counted == observed
    assert sum(counted.values()) == 6


def test_a_request_counter_left_in_the_files_is_not_exported_twice(
    store: MetricsStore, multiprocess: Any
) -> None:
    app = instrumented_flask()
    for item in range(3):
        assert serve_one(app, f"/items/{item}") == "200 OK"
    # What a worker of an earlier microsvc, still running after an upgrade, writes.
    stale = MmapedDict(str(store.path / f"counter_{dead_pid()}.db"))
    labels = ["method", "route", "status"]
    key = mmap_key(
        "microsvc_http_requests",
        "microsvc_http_requests_total",
        labels,
        ["GET", "/items/<int:item>", "200"],
        "help",
    )
    stale.write_value(key, 3.0, 0.0)
    stale.close()
    families = [family.name for family in StoreCollector(store).collect()]
    assert families.count("microsvc_http_requests") == 1
    assert request_totals(store, "/items/<int:item>", "200") == (3, 3)


def test_requests_are_written_in_place_and_add_up_exactly(
    store: MetricsStore, multiprocess: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = instrumented_flask()

    def not_per_value(self: Any, amount: float) -> None:
        raise AssertionError("a request metric went through prometheus_client's inc()")

    monkeypatch.setattr(multiprocess, "inc", not_per_value)
    for item in range(40):
        assert serve_one(app, f"/items/{item}", **waited(0)) == "200 OK"
    for _ in range(3):
        assert serve_one(app, "/nope").startswith("404")  # no queue time known
    assert serve_one(app, "/items/1", **waited(7)).startswith("503")

    assert request_totals(store, "/items/<int:item>", "200") == (40, 40)
    assert request_totals(store, "(unmatched)", "404") == (3, 3)
    found = totals(store)
    assert found[("microsvc_http_requests_in_flight", ())] == 0
    assert found[("microsvc_http_request_queue_seconds_count", ())] == 41
    assert found[("microsvc_http_request_queue_seconds_bucket", (("le", "1.0"),))] == 40
    assert found[("microsvc_http_request_queue_seconds_bucket", (("le", "10.0"),))] == 41
    assert 7.0 <= found[("microsvc_http_request_queue_seconds_sum", ())] < 9.0
    assert found[("microsvc_http_requests_shed_total", ())] == 1
    assert (
        totals(store)[
            (
                "microsvc_http_requests_total",
                (("method", "GET"), ("route", SHED_ROUTE), ("status", "503")),
            )
        ]
        == 1
    )
    buckets = [
        value
        for (name, labels), value in found.items()
        if name == "microsvc_http_request_duration_seconds_bucket"
        and ("route", "/items/<int:item>") in labels
    ]
    assert max(buckets) == 40  # cumulative: the +Inf bucket holds every one


def test_threads_record_at_the_same_time_without_losing_a_count(
    store: MetricsStore, multiprocess: Any
) -> None:
    app = InstrumentedApp(bare)
    threads = [
        threading.Thread(target=lambda: [serve_one(app, "/") for _ in range(500)]) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert request_totals(store, "(unknown)", "200") == (4000, 4000)
    assert totals(store)[("microsvc_http_requests_in_flight", ())] == 0


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_worker_writes_its_own_file_and_a_kill_loses_nothing_it_recorded(
    store: MetricsStore, multiprocess: Any
) -> None:
    app = InstrumentedApp(bare)
    for _ in range(3):
        serve_one(app, "/")  # the parent's places are found before the fork
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child is killed
        try:
            for _ in range(5):
                serve_one(app, "/")
            os.write(ready_write, b"x")
            time.sleep(60)
        finally:
            os._exit(1)
    os.close(ready_write)
    try:
        assert os.read(ready_read, 1) == b"x"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_read)
    assert (store.path / f"counter_{child}.db").exists()
    assert request_totals(store, "(unknown)", "200") == (8, 8)
    store.compact()  # as the master does when it reaps the worker
    assert request_totals(store, "(unknown)", "200") == (8, 8)
    serve_one(app, "/")  # the parent still writes its own file
    assert request_totals(store, "(unknown)", "200") == (9, 9)


class CountingLock:
    """Stands in for the recorder's lock and counts how often it is taken."""

    def __init__(self) -> None:
        self.taken = 0

    def __enter__(self) -> None:
        self.taken += 1

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.mark.parametrize("threads", [False, True])
def test_only_threaded_workers_take_the_lock_and_in_flight_can_be_left_to_the_scoreboard(
    store: MetricsStore, multiprocess: Any, threads: bool
) -> None:
    app = InstrumentedApp(bare, in_flight=False, threads=threads)
    serve_one(app, "/")  # the first request places the values (under the lock)
    lock = CountingLock()
    app._recorder._lock = lock  # type: ignore[assignment]
    for _ in range(20):
        serve_one(app, "/")
    assert lock.taken == (20 if threads else 0)
    assert request_totals(store, "(unknown)", "200") == (21, 21)
    body = app({"REQUEST_METHOD": "GET"}, lambda *args: None)
    # The scoreboard counts requests in flight: the gauge in the files stays 0.
    assert totals(store).get(("microsvc_http_requests_in_flight", ()), 0.0) == 0
    body.close()  # type: ignore[attr-defined]
    assert request_totals(store, "(unknown)", "200") == (22, 22)
