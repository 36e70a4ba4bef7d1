"""`microsvc nginx` against a real nginx, on loopback addresses only.

nginx comes from `harness.nginx` through the `start_nginx` fixture (tests/conftest.py):
in a process group of its own, its error log in PREFIX/nginx.log, killed at teardown.
The tests carry the `nginx` marker: skipped where nginx is not installed.

1. The output (`--full`, and the conf.d blocks inside a minimal nginx.conf) passes `nginx -t`.
2. Three microsvc instances behind nginx all get traffic under load (worker pids mapped to
   their masters), and when one instance's process group is killed with SIGKILL mid-load,
   the client sees no failed GET: nginx retries on the next instance.
3. The app sees the real client address (127.0.0.3, connecting to nginx on 127.0.0.2) and
   not a forged X-Forwarded-For, with microsvc trusting nginx's address (127.0.0.1) only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
import requests

from harness import free_port_on, nginx_test, render, upstream_args, wrapper_conf

if TYPE_CHECKING:
    from tests.conftest import NginxFactory, ServeFactory

pytestmark = [pytest.mark.e2e, pytest.mark.nginx]

ADDR_APP = """\
from flask import Flask, request

app = Flask(__name__)


@app.get("/addr")
def addr():
    return {
        "remote_addr": request.remote_addr,
        "forwarded_for": request.headers.get("X-Forwarded-For"),
        "scheme": request.scheme,
    }
"""


def test_rendered_config_passes_nginx_t(tmp_path: Path) -> None:
    ports = [50001, 50002, 50003]  # nginx -t does not connect to the instances
    args = [*upstream_args(ports), "--listen", "127.0.0.1:58080", "--server-name", "api.test"]

    full = tmp_path / "full"
    full.mkdir()
    (full / "nginx.conf").write_text(render("--full", *args))
    nginx_test(full, full / "nginx.conf")

    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    blocks = render(*args)
    assert "events" not in blocks and "http {" not in blocks, blocks
    (wrapped / "microsvc.conf").write_text(blocks)
    (wrapped / "nginx.conf").write_text(wrapper_conf(wrapped, wrapped / "microsvc.conf"))
    nginx_test(wrapped, wrapped / "nginx.conf")


class Load:
    """Client threads, each with its own keep-alive session, GETting `url` until stopped;
    every status, error and worker pid is recorded."""

    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.statuses: list[int] = []
        self.errors: list[str] = []
        self.pids: set[int] = set()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with requests.Session() as session:
            while not self.stop_event.is_set():
                try:
                    with session.get(self.url, timeout=15) as response:
                        status = response.status_code
                        pid = response.json()["pid"] if status == 200 else None
                except (requests.RequestException, ValueError, KeyError) as exc:
                    with self.lock:
                        self.errors.append(repr(exc))
                    continue
                with self.lock:
                    self.statuses.append(status)
                    if pid is not None:
                        self.pids.add(pid)

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(20)

    def snapshot(self) -> tuple[int, set[int]]:
        with self.lock:
            return len(self.statuses), set(self.pids)


def masters_of(pids: set[int]) -> set[int]:
    masters = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            masters.add(psutil.Process(pid).ppid())
    return masters


def test_three_instances_share_load_and_survive_a_killed_one(
    serve: ServeFactory, start_nginx: NginxFactory, free_port: Callable[[], int]
) -> None:
    instances = [serve(["-k", "sync", "--workers", "2"], name=f"inst{i}") for i in range(3)]
    port = free_port()
    conf = render(
        "--full", *upstream_args([s.port for s in instances]), "--listen", f"127.0.0.1:{port}"
    )
    nginx = start_nginx(conf, "127.0.0.1", port)

    with Load(nginx.url + "/io?ms=20", clients=8) as load:
        # Every instance serves: worker pids seen through nginx belong to all three masters.
        end = time.monotonic() + 10
        masters: set[int] = set()
        while time.monotonic() < end:
            time.sleep(0.5)
            count, pids = load.snapshot()
            masters = masters_of(pids)
            if count >= 60 and masters >= {s.pid for s in instances}:
                break
        assert masters == {s.pid for s in instances}, (masters, nginx.describe())

        # One instance dies at once, requests in flight and all.
        before, _ = load.snapshot()
        victim = instances[1]
        victim.signal_group(signal.SIGKILL)
        victim.proc.wait(10)
        time.sleep(3)
        after, pids_after = load.snapshot()

    assert load.errors == [], (load.errors[:5], nginx.describe())
    bad = [status for status in load.statuses if status != 200]
    assert bad == [], (len(bad), bad[:10], nginx.describe())
    assert after - before >= 30, (before, after, nginx.describe())
    # Traffic went on to the two that are left.
    live_masters = masters_of(pids_after) - {victim.pid}
    assert live_masters == {instances[0].pid, instances[2].pid}, live_masters


def get_addr(host: str, port: int, source: str, headers: dict[str, str]) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/addr", headers=headers)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
        data: dict[str, Any] = json.loads(body)
        return data
    finally:
        conn.close()


def test_app_sees_the_client_address_not_a_forged_one(
    serve: ServeFactory, start_nginx: NginxFactory, tmp_path: Path
) -> None:
    (tmp_path / "addr_app.py").write_text(ADDR_APP)
    # Only nginx's address (it connects from 127.0.0.1) is a trusted proxy.
    instance = serve(["addr_app:app", "--forwarded-allow-ips", "127.0.0.1"], name="addr")
    port = free_port_on("127.0.0.2")
    conf = render(
        "--full", "--upstream", f"127.0.0.1:{instance.port}", "--listen", f"127.0.0.2:{port}"
    )
    nginx = start_nginx(conf, "127.0.0.2", port)

    plain = get_addr("127.0.0.2", port, "127.0.0.3", {})
    assert plain == {
        "remote_addr": "127.0.0.3",
        "forwarded_for": "127.0.0.3",
        "scheme": "http",
    }, (plain, nginx.describe())

    forged = get_addr("127.0.0.2", port, "127.0.0.3", {"X-Forwarded-For": "6.6.6.6"})
    # nginx appends the real peer; microsvc believes only what its trusted proxy wrote.
    assert forged["forwarded_for"] == "6.6.6.6, 127.0.0.3", (forged, nginx.describe())
    assert forged["remote_addr"] == "127.0.0.3", (forged, instance.describe())

    # Straight to microsvc from an untrusted peer, the forged header changes nothing either.
    direct = get_addr("127.0.0.1", instance.port, "127.0.0.3", {"X-Forwarded-For": "6.6.6.6"})
    assert direct["remote_addr"] == "127.0.0.3", direct
