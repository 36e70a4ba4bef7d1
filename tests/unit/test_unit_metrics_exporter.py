"""The master's side of the metrics exporter: how a real exporter process ended, in
words, and why, without a line of its own on the shared output."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from microsvc.metrics import exporter as exporter_module
from microsvc.metrics.exporter import IN_FLIGHT, Exporter, describe_wait_status, main
from microsvc.metrics.store import MetricsStore


class Log:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def error(self, message: str, *args: object) -> None:
        self.errors.append(message % args)


@pytest.fixture
def exporter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Exporter]:
    monkeypatch.setattr(exporter_module, "RESTART_INTERVAL", 0.0)
    exporter = Exporter(MetricsStore(tmp_path), "127.0.0.1:0")
    yield exporter
    exporter.stop()


def until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30  # a hang detector, not a measurement
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen")
        time.sleep(0.02)


def serving(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False


def checked(exporter: Exporter) -> list[str]:
    log = Log()
    exporter.check(log)
    return log.errors


def test_a_killed_exporter_is_reported_by_its_signal_and_started_again(
    exporter: Exporter,
) -> None:
    exporter.start()
    assert exporter.process is not None
    first = exporter.process.pid
    os.kill(first, signal.SIGKILL)
    seen: list[str] = []

    def reported() -> bool:
        seen.extend(checked(exporter))
        return bool(seen)

    until(reported, "the report")
    assert seen == [
        f"Metrics exporter (pid: {first}) was killed by signal 9 (SIGKILL); starting it again"
    ]
    assert exporter.process is not None and exporter.process.pid != first


def test_an_exit_status_taken_by_another_wait_is_not_reported_as_success(
    exporter: Exporter,
) -> None:
    exporter.start()
    assert exporter.process is not None
    first = exporter.process.pid
    os.kill(first, signal.SIGKILL)
    os.waitpid(first, 0)  # as gunicorn's waitpid(-1) does with any child that ended
    assert checked(exporter) == [
        f"Metrics exporter (pid: {first}) ended (its exit status was not seen); starting it again"
    ]


def test_a_failing_exporter_writes_nothing_and_leaves_its_reason_for_the_master(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    closed = socket.socket()
    fd = closed.detach()
    os.close(fd)
    store = MetricsStore(tmp_path)
    assert main([f"--fd={fd}", f"--store={tmp_path}", f"--parent={os.getppid()}"]) == 1
    assert capfd.readouterr() == ("", "")
    reason = store.take_exit_note(os.getpid())
    assert reason is not None and reason.startswith("OSError: "), reason


def test_the_reason_is_logged_with_the_exit_status(exporter: Exporter) -> None:
    exporter.start()
    assert exporter.process is not None
    first = exporter.process.pid
    port = exporter.socket.getsockname()[1]
    until(lambda: serving(port), "the exporter to serve")
    exporter.store.note_exit(first, "OSError: bad things")
    os.kill(first, signal.SIGTERM)  # it exits 0 when asked to stop
    seen: list[str] = []

    def reported() -> bool:
        seen.extend(checked(exporter))
        return bool(seen)

    until(reported, "the report")
    assert seen == [
        f"Metrics exporter (pid: {first}) exited with status 0: OSError: bad things; "
        "starting it again"
    ]


def test_a_scrape_that_cannot_be_collected_is_answered_500_and_writes_nothing(
    exporter: Exporter, capfd: pytest.CaptureFixture[str]
) -> None:
    # A values file whose first entry claims more bytes than the file says it uses.
    used, claimed = 64, 1000
    corrupt = used.to_bytes(4, "little") + bytes(4) + claimed.to_bytes(4, "little")
    (exporter.store.path / "counter_1.db").write_bytes(corrupt.ljust(used, b"\0"))
    exporter.start()
    port = exporter.socket.getsockname()[1]
    for _ in range(2):  # the exporter goes on serving after a failed scrape
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert response.status_code == 500
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert response.text == (
            "Error: metrics could not be collected: "
            "RuntimeError: Read beyond file size detected, file is corrupted.\n"
        )
    (exporter.store.path / "counter_1.db").unlink()
    assert serving(port)
    assert capfd.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("import sys; sys.exit(3)", "exited with status 3"),
        ("pass", "exited with status 0"),
        ("import os; os.kill(os.getpid(), 15)", "was killed by signal 15 (SIGTERM)"),
    ],
)
def test_wait_statuses_in_words(code: str, expected: str) -> None:
    process = subprocess.Popen([sys.executable, "-c", code])
    _, status = os.waitpid(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    assert describe_wait_status(status) == expected


def test_requests_in_flight_are_read_from_the_scoreboard_not_the_files(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from microsvc.observe.scoreboard import Scoreboard

    store = MetricsStore(tmp_path / "store")
    store.path.mkdir()
    # A worker's file still holds the gauge (as workers create it): it is not reported.
    values = MmapedDict(str(store.path / "gauge_livesum_1.db"))
    values.write_value(mmap_key(IN_FLIGHT, IN_FLIGHT, [], [], "help"), 5.0, 0.0)
    values.close()
    board = Scoreboard.create(4, worker_class="sync", http_engine="gunicorn", directory=tmp_path)
    try:
        board.reserve(generation=1)
        board.attach(board.reserved, 1)
        board.booted()
        board.started(os.getpid())
        board.request_started(b"GET", b"/a", b"")
        board.request_started(b"GET", b"/b", b"")
        registry = CollectorRegistry(auto_describe=True)
        registry.register(exporter_module.StoreCollector(store, frozenset({IN_FLIGHT})))
        registry.register(exporter_module._ScoreboardCollector(board.path))
        text = generate_latest(registry).decode()
    finally:
        board.remove()
    assert [line for line in text.splitlines() if line.startswith(IN_FLIGHT)] == [
        f"{IN_FLIGHT} 2.0"
    ]
