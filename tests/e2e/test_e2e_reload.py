"""HUP with a config file (`microsvc run -c FILE`): the new configuration is checked as a
whole before it replaces the running one. A bad one is logged in one line and the master
keeps serving with the running one; a good one reaches the workers, with and without
--preload (proxy trust, health path)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

KEPT = "Reload kept the running configuration"

WHOAMI_APP = """
def app(environ, start_response):
    body = f"{environ['REMOTE_ADDR']} {environ['wsgi.url_scheme']}".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""

FORWARDED = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}


def h2_installed() -> bool:
    from gunicorn.http2 import is_http2_available

    return bool(is_http2_available())


def write_config(path: Path, lines: list[str]) -> None:
    # Written next to the file and renamed over it: the master never reads half a file.
    scratch = path.with_suffix(".tmp")
    scratch.write_text("\n".join(lines) + "\n")
    scratch.replace(path)


def start_with_config(
    serve: ServeFactory, tmp_path: Path, port: int, lines: list[str], *args: str
) -> tuple[Server, Path]:
    """A server whose bind and settings all come from a config file (no -b)."""
    config = tmp_path / "microsvc_conf.py"
    write_config(config, [f"bind = '127.0.0.1:{port}'", "workers = 1", *lines])
    argv = [sys.executable, "-m", "microsvc", "run", "-c", str(config), *args]
    return serve(command=argv, port=port), config


def hup(server: Server) -> None:
    os.kill(server.pid, signal.SIGHUP)


def assert_serving(server: Server) -> None:
    """The master is alive and answers, and keeps doing so for a moment."""
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        assert server.proc.poll() is None, server.describe()
        with requests.get(server.url + "/healthz", timeout=5) as response:
            assert response.status_code == 200, server.describe()
        time.sleep(0.2)


@pytest.fixture
def busy_port() -> Iterator[Callable[[], int]]:
    """`busy_port()`: a loopback port a socket of this test listens on until the end."""
    held: list[socket.socket] = []

    def take() -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        held.append(sock)
        return int(sock.getsockname()[1])

    yield take
    for sock in held:
        sock.close()


BAD_RELOADS: dict[str, tuple[Callable[[int], list[str]], str]] = {
    # microsvc accepted host bits, gunicorn's cfg.set refused them: the master died
    "network with host bits": (
        lambda busy: ["forwarded_allow_ips = '10.0.0.1/8'"],
        "'10.0.0.1/8' has host bits set",
    ),
    # gunicorn retried the busy address for five seconds, then the master exited
    "address in use": (
        lambda busy: [f"bind = ['127.0.0.1:{{port}}', '127.0.0.1:{busy}']"],
        "cannot listen on 127.0.0.1:{busy}",
    ),
    # gunicorn's Config.validate() was never run: h2 was accepted without the h2 package
    "h2 without the h2 package": (
        lambda busy: ["http_protocols = 'h2,h1'"],
        "h2 package is not installed",
    ),
    # workers could not create their heartbeat files; the master halted
    "missing worker_tmp_dir": (
        lambda busy: ["worker_tmp_dir = '/nonexistent/microsvc-heartbeats'"],
        "worker_tmp_dir '/nonexistent/microsvc-heartbeats' is not a directory",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RELOADS))
def test_a_bad_config_on_hup_is_logged_and_the_running_one_kept(
    serve: ServeFactory,
    tmp_path: Path,
    free_port: Callable[[], int],
    busy_port: Callable[[], int],
    case: str,
) -> None:
    if case == "h2 without the h2 package" and h2_installed():
        pytest.skip("the h2 package is installed")
    port, busy = free_port(), busy_port()
    server, config = start_with_config(serve, tmp_path, port, [])
    new_lines, message = BAD_RELOADS[case]
    lines = [line.replace("{port}", str(port)) for line in new_lines(busy)]
    write_config(config, [f"bind = '127.0.0.1:{port}'", "workers = 1", *lines])

    hup(server)
    line = server.wait_log(f"{KEPT}: .*")
    assert message.replace("{busy}", str(busy)) in line.group(0), server.describe()
    assert_serving(server)
    log = server.log_text()
    assert log.count(KEPT) == 1, server.describe()
    assert "Traceback" not in log, server.describe()
    assert server.stop() == 0


def whoami(server: Server) -> str:
    with requests.get(server.url + "/whoami", headers=FORWARDED, timeout=5) as response:
        assert response.status_code == 200, server.describe()
        return response.text


@pytest.mark.parametrize("preload", [False, True], ids=["fork", "preload"])
def test_hup_applies_proxy_trust_and_health_path_in_every_mode(
    serve: ServeFactory, tmp_path: Path, free_port: Callable[[], int], preload: bool
) -> None:
    (tmp_path / "whoami_app.py").write_text(WHOAMI_APP)
    port = free_port()
    mode = ["--preload"] if preload else []
    server, config = start_with_config(
        serve,
        tmp_path,
        port,
        ["forwarded_allow_ips = '10.9.9.9'", "health_path = '/healthz'"],
        "whoami_app:app",
        *mode,
    )
    assert whoami(server) == "127.0.0.1 http", server.describe()

    write_config(
        config,
        [
            f"bind = '127.0.0.1:{port}'",
            "workers = 1",
            "forwarded_allow_ips = '127.0.0.1'",
            "health_path = '/alive'",
        ],
    )
    hup(server)
    end = time.monotonic() + 20
    while whoami(server) != "6.6.6.6 https" and time.monotonic() < end:
        time.sleep(0.2)
    # address trust (microsvc) and scheme trust (gunicorn) changed together
    assert whoami(server) == "6.6.6.6 https", server.describe()
    with requests.get(server.url + "/alive", timeout=5) as response:
        assert response.status_code == 200, server.describe()
        assert response.json() == {"status": "ok"}, server.describe()
    assert KEPT not in server.log_text(), server.describe()
    assert server.stop() == 0


CHDIR_APP = """
from pathlib import Path

import greeting


def app(environ, start_response):
    body = f"{greeting.WORD} {Path('motd.txt').read_text().strip()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
"""


@pytest.mark.parametrize("preload", [False, True], ids=["fork", "preload"])
def test_chdir_and_pythonpath_are_applied_before_the_app_is_imported(
    serve: ServeFactory, tmp_path: Path, preload: bool
) -> None:
    service = tmp_path / "service"
    (service / "vendor").mkdir(parents=True)
    (service / "chdir_app.py").write_text(CHDIR_APP)
    (service / "motd.txt").write_text("from the service directory\n")
    (service / "vendor" / "greeting.py").write_text("WORD = 'hello'\n")
    mode = ["--preload"] if preload else []
    server = serve(
        [
            "chdir_app:app",
            "--workers",
            "1",
            "--set",
            "chdir=service",
            "--set",
            "pythonpath=vendor",
            *mode,
        ],
        cwd=tmp_path,
    )
    with requests.get(server.url + "/", timeout=5) as response:
        assert response.status_code == 200, server.describe()
        assert response.text == "hello from the service directory", server.describe()
    assert server.stop() == 0
