"""--max-worker-memory: a worker whose memory grows past the limit is recycled, and no
request fails for it.

The app leaks about 20 MB per request (written and kept, so it is resident). The leak
stops growing at LEAK_CAP_MB per worker, so a server that never recycles cannot eat the
machine's memory: the test then fails on the missing log line, not on an OOM kill.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from harness import Wrk

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = pytest.mark.e2e

LEAK_MB = 20
LEAK_CAP_MB = 320
LIMIT = "150MB"

LEAKY_APP = f"""
import os
import time

from flask import Flask

app = Flask(__name__)
KEPT = []


@app.get("/health")
def health():
    return {{"status": "ok"}}


@app.get("/leak")
def leak():
    if len(KEPT) * {LEAK_MB} < {LEAK_CAP_MB}:
        KEPT.append(b"\\x01" * ({LEAK_MB} * 1024 * 1024))
    time.sleep(0.01)
    return {{"pid": os.getpid(), "kept_mb": len(KEPT) * {LEAK_MB}}}
"""

RECYCLING_LINE = re.compile(r"^(?:\[[^\]]*\] )*Recycling worker\b[^\n]*memory", re.M | re.I)


@pytest.fixture
def leaky_app(tmp_path: Path) -> str:
    (tmp_path / "leaky_app.py").write_text(textwrap.dedent(LEAKY_APP))
    return "leaky_app:app"


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_max_worker_memory_recycles_a_leaking_worker_without_failures(
    serve: ServeFactory, wrk: Wrk, figures: Figures, leaky_app: str, worker_class: str
) -> None:
    server = serve([leaky_app, "-k", worker_class, "--workers", "2", "--max-worker-memory", LIMIT])
    assert server.wait_workers(2, stable_for=0.3, deadline=20) == 2, server.describe()
    before = server.worker_pids()

    result = wrk.run(server.url + "/leak", seconds=5, connections=4, timeout=10)
    # A recycled worker finishes its requests before it exits, and the master starts
    # its replacement then: the new pid may come after the load has ended.
    new = server.wait_new_workers(before, deadline=20)
    recycled = RECYCLING_LINE.findall(server.log_text())
    figures(
        f"{result} [{worker_class} x2, leak {LEAK_MB} MB/request, --max-worker-memory {LIMIT}: "
        f"{len(recycled)} 'Recycling worker' lines, {len(new)} new pids]"
    )

    assert server.proc.poll() is None, server.describe()
    assert result.responses > 0, result.text
    assert recycled, f"no 'Recycling worker ... memory' line: {server.describe()}"
    assert result.failed == 0, f"{result}\n{result.text}\n{server.describe()}"
    assert new, f"no new worker pid after 20 s: {before} -> {server.worker_pids()}"
    # gunicorn restarts its control socket at each fork; the line is logged once.
    assert server.log_text().count("Control socket listening at") == 1, server.describe()
