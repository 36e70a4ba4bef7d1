"""Two servers side by side on one machine: each has its own control socket, and
stopping one with SIGTERM does not disturb the other. The first is stopped with SIGTERM
to its process group (as a terminal or systemd does), the second with SIGTERM to the
master only (as a container runtime does); both must exit 0 and leave no worker behind."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

CONTROL_LINE = re.compile(r"Control socket listening at (\S+)")


def control_socket(server: Server) -> str:
    server.wait_log(CONTROL_LINE.pattern)
    paths: list[str] = CONTROL_LINE.findall(server.log_text())
    assert len(paths) == 1, server.describe()
    return paths[0]


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_two_instances_run_side_by_side_and_stop_cleanly(
    serve: ServeFactory, runtime_dir: Path, worker_class: str
) -> None:
    options = ["-k", worker_class, "--workers", "2"]
    first = serve(options, name="first")
    second = serve(options, name="second")
    assert first.port != second.port

    for server in (first, second):
        with requests.get(server.url + "/data", timeout=10) as response:
            assert response.status_code == 200, server.describe()
            assert response.json() == {"message": "Microservice response"}

    first_socket, second_socket = control_socket(first), control_socket(second)
    assert first_socket != second_socket
    for path in (first_socket, second_socket):
        # Both in the one runtime directory the two share, both alive at once.
        assert os.path.dirname(path) == str(runtime_dir), path
        assert stat.S_ISSOCK(os.stat(path).st_mode), path

    assert first.stop() == 0, first.describe()
    # The second still serves, and still has its control socket.
    with requests.get(second.url + "/health", timeout=10) as response:
        assert response.status_code == 200, second.describe()
    assert stat.S_ISSOCK(os.stat(second_socket).st_mode), second_socket

    # SIGTERM to the master alone this time, as `docker stop` sends it to PID 1.
    assert second.stop(group=False) == 0, second.describe()
    for server in (first, second):
        assert server.orphans == [], server.describe()
        assert "Shutting down: Master" in server.log_text(), server.describe()
    assert not os.path.exists(first_socket)
    assert not os.path.exists(second_socket)
