"""Memory after --preload: microsvc freezes the collector's view of the app before it forks
(`gc.freeze()`), so the workers keep sharing the app's objects with the master, and
--max-worker-memory counts each worker's own memory (USS), not the pages it shares.

The app (apps/bigheap.py) builds about 200 MB of Python objects at import and runs a full
collection in each worker on its first request and every 50 requests after. Both
servers run it with --preload and 4 sync workers and get REQUESTS requests, spread over
the workers; then each worker's memory is read from /proc/PID/smaps_rollup.

- Plain gunicorn: a collection writes to the header of every object it tracks, so each
  worker copies the whole heap: its own memory (USS) is about the heap's size.
- microsvc: the frozen objects are never visited, so they stay shared: a worker's own
  memory is what it allocated itself, a small part of the heap. The test asserts at
  most half of plain gunicorn's (it measures far less: see docs/observing.md).
- With --max-worker-memory 150MB no worker is recycled, though each worker's RSS (which
  counts the shared heap) is above 150 MB: a limit on RSS would recycle every one.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from harness import Server
from microsvc.observe.scoreboard import MemorySample, read_memory

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

APPS = Path(__file__).resolve().parent / "apps"
WORKERS = 4
REQUESTS = 1000
LIMIT = "150MB"
LIMIT_BYTES = 150_000_000
MB = 1e6


def load(url: str, count: int) -> set[int]:
    """`count` GETs of / from 8 threads; the worker pids that answered."""

    def one(_: int) -> int:
        with requests.get(url + "/", timeout=60) as response:
            assert response.status_code == 200, response.text
            return int(response.json()["pid"])

    with ThreadPoolExecutor(8) as pool:
        return set(pool.map(one, range(count)))


def memory_of(server: Server) -> list[MemorySample]:
    samples = [read_memory(worker.pid) for worker in server.app_workers()]
    assert all(sample is not None for sample in samples)
    return [sample for sample in samples if sample is not None]


def describe(samples: list[MemorySample]) -> str:
    """Each worker's USS, PSS and RSS in MB, sorted: `USS 6/6/7/7 MB, PSS ..., RSS ...`."""

    def each(values: list[int | None]) -> str:
        return "/".join(
            f"{(value or 0) / MB:.0f}" for value in sorted(values, key=lambda v: v or 0)
        )

    return (
        f"USS {each([s.own for s in samples])} MB, PSS {each([s.pss for s in samples])} MB, "
        f"RSS {each([s.rss for s in samples])} MB"
    )


def test_preload_keeps_the_app_shared_and_the_limit_counts_own_memory(
    serve: ServeFactory, figures: Figures
) -> None:
    gunicorn = serve(
        [sys.executable, "-m", "gunicorn", "--preload", "-w", str(WORKERS)],
        command=[
            *(sys.executable, "-m", "gunicorn", "--preload", "-w", str(WORKERS)),
            *("-b", "127.0.0.1:{port}", "bigheap:app"),
        ],
        cwd=APPS,
        name="gunicorn",
    )
    microsvc = serve(
        [
            *("bigheap:app", "--preload", "-k", "sync", "--workers", str(WORKERS)),
            *("--max-worker-memory", LIMIT),
        ],
        cwd=APPS,
        name="microsvc",
    )
    for server in (gunicorn, microsvc):
        assert server.wait_workers(WORKERS, stable_for=0.3) == WORKERS, server.describe()
    before = {worker.pid for worker in microsvc.app_workers()}

    served = {
        name: load(server.url, REQUESTS)
        for name, server in (("gunicorn", gunicorn), ("microsvc", microsvc))
    }
    plain, ours = memory_of(gunicorn), memory_of(microsvc)
    time.sleep(3.0)  # the master reads memory once a second; two reads above would recycle

    figures(f"plain gunicorn --preload: {describe(plain)}; microsvc --preload: {describe(ours)}")
    for name, pids in served.items():
        assert len(pids) == WORKERS, f"{name}: only workers {pids} answered"
    # Structural, not a timing: the collector copies the heap in plain gunicorn's
    # workers and never sees it in microsvc's.
    assert max(s.own for s in ours) <= 0.5 * min(s.own for s in plain), (
        describe(ours),
        describe(plain),
    )
    assert all(s.rss > LIMIT_BYTES for s in ours), describe(ours)  # RSS would recycle
    log = microsvc.log_text()
    assert "Recycling worker" not in log, log
    assert {worker.pid for worker in microsvc.app_workers()} == before, microsvc.describe()
