"""--drain-period: on TERM the readiness path turns 503 while requests are still served,
and the server exits 0 once the period is over.

TERM goes to the master alone (as Kubernetes sends it to the container's first
process); a TERM to the whole process group would reach the workers directly and stop
them without any drain.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import requests

from harness import Wrk

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = pytest.mark.e2e

DRAIN_SECONDS = 3.0
PROBE_TIMEOUT = 2.0


def status_of(url: str) -> int | str:
    try:
        with requests.get(url, timeout=PROBE_TIMEOUT) as response:
            return response.status_code
    except requests.RequestException as exc:
        return type(exc).__name__


def wait_for_status(url: str, expected: int, deadline: float = 10.0) -> int | str:
    end = time.monotonic() + deadline
    status = status_of(url)
    while status != expected and time.monotonic() < end:
        time.sleep(0.1)
        status = status_of(url)
    return status


#: How soon after TERM readiness must answer 503.
TURN_DEADLINE_S = 1.0


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_drain_period_turns_readiness_503_and_keeps_serving_then_exits_0(
    serve: ServeFactory, wrk: Wrk, figures: Figures, worker_class: str
) -> None:
    server = serve(["-k", worker_class, "--workers", "2", "--drain-period", f"{DRAIN_SECONDS:g}s"])
    assert server.wait_workers(2, stable_for=0.3, deadline=20) == 2, server.describe()
    assert wait_for_status(server.url + "/readyz", 200) == 200, server.describe()
    assert status_of(server.url + "/healthz") == 200, server.describe()

    os.kill(server.pid, signal.SIGTERM)
    term_at = time.monotonic()
    load = wrk.start(server.url + "/data", seconds=2, connections=10)
    ready: list[int | str] = []
    live: list[int | str] = []
    asked: list[float] = []  # seconds after TERM of each /readyz
    while time.monotonic() - term_at < DRAIN_SECONDS - 1.0:
        asked.append(time.monotonic() - term_at)
        ready.append(status_of(server.url + "/readyz"))
        live.append(status_of(server.url + "/healthz"))
        time.sleep(0.2)
    result = load.result()
    try:
        code = server.proc.wait(DRAIN_SECONDS + 30)
    except subprocess.TimeoutExpired:
        code = None
    exited_after = time.monotonic() - term_at
    figures(
        f"during a {DRAIN_SECONDS:g} s drain: /data {result.sent} requests, {result.failed} "
        f"failed; /readyz {ready}; /healthz {sorted(set(map(str, live)))}; exit {code} "
        f"{exited_after:.1f} s after TERM [{worker_class} x2]"
    )

    # The master turns readiness at its next turn after the signal: on a busy machine a
    # probe sent at once may come first. Ready until then, never again after, and not to
    # any probe sent TURN_DEADLINE_S after the signal.
    turned = next((index for index, status in enumerate(ready) if status != 200), len(ready))
    detail = f"/readyz {ready} at {[round(at, 2) for at in asked]} s: {server.describe()}"
    late = [status for at, status in zip(asked, ready, strict=True) if at >= TURN_DEADLINE_S]
    assert late and all(status == 503 for status in late), detail
    assert all(status == 503 for status in ready[turned:]), detail
    assert all(status == 200 for status in live), f"/healthz {live}: {server.describe()}"
    assert result.responses > 0, result.text
    assert result.failed == 0, f"{result}\n{result.text}\n{server.describe()}"
    assert code == 0, server.describe()
    assert exited_after >= DRAIN_SECONDS - 0.5, f"exited {exited_after:.1f} s after TERM"
    assert exited_after <= DRAIN_SECONDS + 15, f"exited {exited_after:.1f} s after TERM"
