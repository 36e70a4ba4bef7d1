"""USR2, gunicorn's binary upgrade, under load: the master starts a new master on the same
listening sockets, WINCH stops the old workers gracefully, QUIT ends the old master.
No request fails, and the new master serves afterwards.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import requests

from harness import Wrk

if TYPE_CHECKING:
    from tests.conftest import ServeFactory
    from tests.reliability.conftest import Figures

pytestmark = pytest.mark.e2e

MASTER_PID_APP = """\
import os


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getppid()).encode()]
"""


def wait_for(
    condition: Callable[[], object], what: str, describe: Callable[[], str], deadline: float = 30.0
) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"{what} did not happen within {deadline:.0f} s: {describe()}")
        time.sleep(0.1)


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@pytest.mark.parametrize("worker_class", ["sync", "gthread", "gevent"])
def test_usr2_upgrade_under_load_loses_no_request(
    serve: ServeFactory, wrk: Wrk, figures: Figures, tmp_path: Path, worker_class: str
) -> None:
    (tmp_path / "pid_app.py").write_text(textwrap.dedent(MASTER_PID_APP))
    pidfile = tmp_path / "master.pid"
    server = serve(
        ["pid_app:app", "-k", worker_class, "-w", "2", "--set", f"pidfile={pidfile}"],
        cwd=tmp_path,
        ready_path="/",
    )
    old = server.pid
    server.wait_log(r"Ready: 2 workers booted")
    # Long enough for the slowest machine; SIGINT ends wrk (with its figures) once the
    # sequence is over.
    load = wrk.start(server.url + "/", seconds=120, connections=10)
    time.sleep(1.0)

    os.kill(old, signal.SIGUSR2)
    new_pidfile = Path(f"{pidfile}.2")
    wait_for(lambda: read_pid(new_pidfile) is not None, "the new master", server.describe)
    new = read_pid(new_pidfile)
    assert new is not None, server.describe()
    server.wait_log(rf"\[{new}\] \[INFO\] Ready: 2 workers booted", deadline=30)

    os.kill(old, signal.SIGWINCH)
    wait_for(
        lambda: [child.pid for child in psutil.Process(old).children()] == [new],
        "the old workers' graceful stop",
        server.describe,
    )
    os.kill(old, signal.SIGQUIT)
    assert server.proc.wait(20) == 0, server.describe()
    time.sleep(1.0)  # load on the new master alone
    assert load.proc.poll() is None, "wrk ended before the upgrade was over"
    load.proc.send_signal(signal.SIGINT)

    result = load.result()
    figures(result)
    assert result.sent > 0, result.text
    assert result.failed == 0, f"{result}\n{server.describe()}"
    assert psutil.pid_exists(new), server.describe()
    with requests.get(server.url + "/", timeout=10) as response:
        assert response.text == str(new), server.describe()
    # The new master notices its parent is gone on its next turn (at least once a second).
    wait_for(
        lambda: "Master has been promoted" in server.log_text(),
        "the promotion of the new master",
        server.describe,
        deadline=10,
    )
