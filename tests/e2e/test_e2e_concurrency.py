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
    result = burst(server.port, f"/io?ms={SLEEP_MS}")
    print(f"sync --workers 5: {result.summary()}")
    check_all_ok(result, server)
    # 5 at a time: 10 rounds of 0.2 s.
    assert result.seconds >= 1.6, result.summary()
    assert result.seconds < 8.0, result.summary()
    assert len(result.pids) > 1, result.summary()


def test_gthread_serves_workers_times_threads_at_once_on_every_worker(serve: ServeFactory) -> None:
    server = serve(["-k", "gthread", "--workers", "2", "--threads", "5"])
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
