"""Each worker class serves 50 simultaneous slow requests with the concurrency it should.

50 client threads, each on its own connection, start together on /io?ms=200 (the demo's
endpoint that sleeps 0.2 s; under gevent and eventlet the sleep is cooperative). Serial
service would take 10 s. The wall time shows how many requests overlapped:

    sync      --workers 5               5 at a time   >= ~2.0 s
    gthread   --workers 2 --threads 5   10 at a time  >= ~1.0 s
    gevent    --workers 1               all 50        ~0.2 s
    eventlet  --workers 1               all 50        ~0.2 s

The margins are generous: they tell "N at a time" apart, not milliseconds.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

CLIENTS = 50
SLEEP_MS = 200
SERIAL_SECONDS = CLIENTS * SLEEP_MS / 1000  # 10 s


@dataclass
class Burst:
    seconds: float
    statuses: list[int]
    bodies: list[Any]
    errors: list[str]

    @property
    def pids(self) -> set[int]:
        return {body["pid"] for body in self.bodies if isinstance(body, dict) and "pid" in body}

    def summary(self) -> str:
        return (
            f"{len(self.statuses)} answers in {self.seconds:.2f} s, statuses "
            f"{sorted(set(self.statuses))}, {len(self.pids)} worker pids, errors {self.errors[:3]}"
        )


def burst(port: int, path: str, clients: int = CLIENTS, timeout: float = 60.0) -> Burst:
    """`clients` threads, each with its own HTTP connection, GET `path` at the same time."""
    barrier = threading.Barrier(clients + 1)
    statuses: list[int] = []
    bodies: list[Any] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            barrier.wait(timeout)
            connection.request("GET", path)
            response = connection.getresponse()
            raw = response.read()
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw[:200]
            with lock:
                statuses.append(response.status)
                bodies.append(body)
        except Exception as exc:
            with lock:
                errors.append(repr(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout)
    started = time.monotonic()
    for thread in threads:
        thread.join(timeout + 10)
    return Burst(time.monotonic() - started, statuses, bodies, errors)


def check_all_ok(result: Burst, server: Server) -> None:
    assert not result.errors, f"{result.summary()}\n{server.describe()}"
    assert result.statuses == [200] * CLIENTS, f"{result.summary()}\n{server.describe()}"


def test_sync_serves_as_many_at_once_as_it_has_workers(serve: ServeFactory) -> None:
    server = serve(["-k", "sync", "--workers", "5"])
    server.wait_booted()
    result = burst(server.port, f"/io?ms={SLEEP_MS}")
    print(f"sync --workers 5: {result.summary()}")
    check_all_ok(result, server)
    # 5 at a time: 10 rounds of 0.2 s. The upper bound only tells it from one at a time:
    # on a machine busy with other tests, 50 client threads send their requests slowly.
    assert result.seconds >= 1.6, result.summary()
    assert result.seconds < SERIAL_SECONDS, result.summary()
    assert len(result.pids) >= 3, result.summary()


def late_requests(port: int, path: str, clients: int) -> tuple[float, list[int]]:
    """`clients` connections opened first, silent for a moment, then each sends one
    request for `path`: the seconds until every answer was read, and the pid of the
    worker that gave each."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(clients)]
    try:
        time.sleep(0.3)
        started = time.monotonic()
        request = f"GET {path} HTTP/1.1\r\nHost: late\r\nConnection: close\r\n\r\n".encode()
        for sock in socks:
            sock.sendall(request)
        pids = []
        for sock in socks:
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), answer[:300]
            pids.append(json.loads(body)["pid"])
        return time.monotonic() - started, pids
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize(
    ("options", "at_once"),
    [
        (["-k", "sync", "--workers", "4"], 4),
        (["-k", "gthread", "--workers", "2", "--threads", "1"], 2),
    ],
    ids=["sync", "gthread"],
)
def test_connections_whose_requests_come_late_are_spread_over_the_workers(
    serve: ServeFactory, options: list[str], at_once: int
) -> None:
    # A worker accepts a connection once its request is there (the listener defers
    # accepts): one worker cannot take every silent connection while the others idle,
    # and then serve their requests one after another.
    server = serve(options)
    server.wait_booted()  # spread over the workers: all of them must serve
    clients = 4 * at_once
    seconds, pids = late_requests(server.port, f"/io?ms={SLEEP_MS}", clients)
    counts = sorted((pids.count(pid) for pid in set(pids)), reverse=True)
    summary = f"{clients} late requests in {seconds:.2f} s, answers per worker {counts}"
    print(summary)
    assert len(pids) == clients, summary
    # Serial would be every answer from one worker; spread, at most about a quarter each.
    assert counts[0] <= clients // 2, f"{summary}\n{server.describe()}"
    assert len(counts) >= at_once // 2 + 1, f"{summary}\n{server.describe()}"


def test_gthread_serves_workers_times_threads_at_once_on_every_worker(serve: ServeFactory) -> None:
    server = serve(["-k", "gthread", "--workers", "2", "--threads", "5"])
    server.wait_booted()
    result = burst(server.port, f"/io?ms={SLEEP_MS}")
    print(f"gthread --workers 2 --threads 5: {result.summary()}")
    check_all_ok(result, server)
    # 10 at a time: 5 rounds of 0.2 s, far from serial.
    assert result.seconds >= 0.8, result.summary()
    assert result.seconds < SERIAL_SECONDS / 2, result.summary()
    # worker_connections == threads: one worker does not take every connection.
    assert len(result.pids) == 2, result.summary()


@pytest.mark.parametrize("worker_class", ["gevent", "eventlet"])
def test_cooperative_class_overlaps_all_requests_in_one_worker(
    serve: ServeFactory, worker_class: str
) -> None:
    server = serve(["-k", worker_class, "--workers", "1"])
    result = burst(server.port, f"/io?ms={SLEEP_MS}")
    print(f"{worker_class} --workers 1: {result.summary()}")
    check_all_ok(result, server)
    assert len(result.pids) == 1, result.summary()
    # All 50 overlap: one round of 0.2 s, where serial would take 10 s.
    assert result.seconds < 1.5, result.summary()
