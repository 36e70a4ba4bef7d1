"""`microsvc status` against real servers: the busy worker with the request the test
sent, the listen queue, finding the instance by itself, `--pid`, the error lines; and the
scoreboard's gauges on /metrics."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import clean_env, microsvc_command

pytestmark = pytest.mark.e2e


def status(runtime: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        microsvc_command("status", *args),
        env=clean_env({"XDG_RUNTIME_DIR": str(runtime)}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def status_json(runtime: Path, *args: str) -> dict[str, Any]:
    done = status(runtime, "--json", *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    data: dict[str, Any] = json.loads(done.stdout)
    return data


class SlowRequest:
    """GET /io (sleeps `ms`) with a query string and an X-Request-ID, in a thread."""

    def __init__(self, url: str, ms: int = 4000) -> None:
        self.request_id = f"test-{uuid.uuid4().hex[:12]}"
        self.status: int | None = None
        self._thread = threading.Thread(target=self._send, args=(url, ms))
        self._thread.start()

    def _send(self, url: str, ms: int) -> None:
        response = requests.get(
            f"{url}/io?ms={ms}&token=secret",
            headers={"X-Request-ID": self.request_id},
            timeout=60,
        )
        self.status = response.status_code

    def join(self) -> None:
        self._thread.join(60)


def wait_busy(runtime: Path, pid: int, request_id: str, server: Any) -> dict[str, Any]:
    end = time.monotonic() + 20
    data: dict[str, Any] = {}
    while time.monotonic() < end:
        data = status_json(runtime, "--pid", str(pid))
        for worker in data["workers"]:
            request = worker["request"]
            if request and request["request_id"] == request_id:
                return data
        time.sleep(0.2)
    pytest.fail(f"no busy worker with {request_id} in {data}: {server.describe()}")


@pytest.mark.parametrize(
    ("worker_class", "engine"),
    [
        ("sync", "microsvc"),
        ("gthread", "microsvc"),
        ("gevent", "microsvc"),
        ("eventlet", "microsvc"),
        ("sync", "gunicorn"),
        ("gevent", "gunicorn"),
    ],
)
def test_status_shows_the_busy_worker_with_the_request_sent(
    serve: Any, runtime_dir: Path, worker_class: str, engine: str
) -> None:
    server = serve(["-k", worker_class, "--workers", "2"], env={"MICROSVC_HTTP_ENGINE": engine})
    slow = SlowRequest(server.url)
    try:
        data = wait_busy(runtime_dir, server.pid, slow.request_id, server)
    finally:
        slow.join()
    assert slow.status == 200
    assert data["master_pid"] == server.pid
    assert (data["worker_class"], data["http_engine"]) == (worker_class, engine)
    [busy] = [worker for worker in data["workers"] if worker["request"]]
    assert busy["state"] == "busy"
    assert busy["pid"] in server.worker_pids()
    assert busy["request"]["method"] == "GET"
    assert busy["request"]["path"] == "/io"  # no query string
    assert busy["request"]["seconds"] >= 0
    assert data["workers_busy"] >= 1
    assert data["in_flight"] >= 1
    assert 0 < data["busy_ratio"] <= 1
    assert data["workers_running"] == 2
    [listener] = data["listeners"] or pytest.fail(f"{data}\n{server.describe()}")
    assert listener["address"].endswith(f"127.0.0.1:{server.port}")
    assert isinstance(listener["queue"], int) and listener["queue"] >= 0
    assert isinstance(listener["queue_limit"], int) and listener["queue_limit"] > 0
    for worker in data["workers"]:
        assert worker["memory"] is None or worker["memory"]["own"] > 0


@pytest.fixture
def own_runtime() -> Iterator[Path]:
    """A runtime directory for this test's servers only."""
    path = Path(tempfile.mkdtemp(prefix="msvc-st-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_status_finds_the_only_instance_and_asks_which_when_several(
    serve: Any, own_runtime: Path
) -> None:
    done = status(own_runtime)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("Error: no running microsvc instance of this user")
    assert len(done.stderr.splitlines()) == 1

    env = {"XDG_RUNTIME_DIR": str(own_runtime)}
    first = serve(["--workers", "1"], env=env)
    data = status_json(own_runtime)
    assert data["master_pid"] == first.pid
    text = status(own_runtime)
    assert text.returncode == 0, text.stderr
    assert f"microsvc master {first.pid}" in text.stdout
    assert "PID" in text.stdout

    second = serve(["--workers", "1"], env=env)
    done = status(own_runtime)
    assert done.returncode == 2
    assert done.stderr.startswith("Error: several microsvc instances run")
    assert str(first.pid) in done.stderr and str(second.pid) in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert status_json(own_runtime, "--pid", str(second.pid))["master_pid"] == second.pid

    done = status(own_runtime, "--pid", "1")
    assert done.returncode == 1
    assert done.stderr.startswith("Error: no running microsvc instance with master pid 1 ")

    assert first.stop() == 0
    assert status_json(own_runtime)["master_pid"] == second.pid
    assert second.stop() == 0
    assert list(own_runtime.glob("*.scoreboard")) == []  # removed at a clean stop


def test_status_watch_refreshes_until_interrupted(serve: Any, own_runtime: Path) -> None:
    server = serve(["--workers", "1"], env={"XDG_RUNTIME_DIR": str(own_runtime)})
    process = subprocess.Popen(
        microsvc_command("status", "--watch", "--json", "--interval", "0.2"),
        env=clean_env({"XDG_RUNTIME_DIR": str(own_runtime)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
    finally:
        process.send_signal(2)  # SIGINT, as Ctrl-C
        _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr
    assert stderr == ""
    assert [json.loads(line)["master_pid"] for line in lines] == [server.pid] * 3


def test_metrics_have_the_scoreboard_gauges(serve: Any, free_port: Any) -> None:
    address = f"127.0.0.1:{free_port()}"
    server = serve(["--workers", "2", "--metrics", "--metrics-bind", address])
    slow = SlowRequest(server.url, ms=4000)
    try:
        end = time.monotonic() + 20
        samples: dict[str, list[Any]] = {}
        while time.monotonic() < end:
            text = requests.get(f"http://{address}/metrics", timeout=10).text
            samples = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    samples.setdefault(sample.name, []).append(sample)
            busy = samples.get("microsvc_workers_busy")
            if busy and busy[0].value >= 1 and samples.get("microsvc_worker_memory_own_bytes"):
                break
            time.sleep(0.3)
    finally:
        slow.join()
    assert samples["microsvc_workers_busy"][0].value >= 1
    assert 0 < samples["microsvc_workers_busy_ratio"][0].value <= 1
    [queue] = samples["microsvc_listen_queue_length"]
    assert queue.labels["listener"].endswith(f":{server.port}") and queue.value >= 0
    assert samples["microsvc_listen_queue_limit"][0].value > 0
    own = samples["microsvc_worker_memory_own_bytes"]
    assert len(own) == 2 and all(sample.value > 0 for sample in own)
    assert len(samples["microsvc_worker_memory_shared_bytes"]) == 2


def test_status_counts_recycled_workers_by_reason(serve: Any, own_runtime: Path) -> None:
    server = serve(
        ["--workers", "1", "--max-requests", "5", "--max-requests-jitter", "0"],
        env={"XDG_RUNTIME_DIR": str(own_runtime)},
    )
    for _ in range(12):
        requests.get(server.url + "/data", timeout=10)
    end = time.monotonic() + 20
    data: dict[str, Any] = {}
    while time.monotonic() < end:
        data = status_json(own_runtime)
        if data["recycled"]["max-requests"] >= 1 and data["workers_running"] == 1:
            break
        time.sleep(0.2)
    assert data["recycled"]["max-requests"] >= 1, data
    assert data["recycled"]["crash"] == 0
    [worker] = data["workers"]
    assert worker["generation"] >= 2
    assert worker["previous_worker"]["reason"] == "max-requests"
    assert worker["pid"] in {child.pid for child in server.workers()}


def test_a_killed_worker_leaves_no_slot(serve: Any, own_runtime: Path) -> None:
    server = serve(["--workers", "2"], env={"XDG_RUNTIME_DIR": str(own_runtime)})
    before = status_json(own_runtime)
    victim = before["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    end = time.monotonic() + 20
    data = before
    while time.monotonic() < end:
        data = status_json(own_runtime)
        pids = [worker["pid"] for worker in data["workers"]]
        if data["recycled"]["crash"] == 1 and len(pids) == 2 and victim not in pids:
            break
        time.sleep(0.2)
    pids = [worker["pid"] for worker in data["workers"]]
    assert victim not in pids, data
    assert data["recycled"]["crash"] == 1, data
    assert sorted(pids) == sorted(child.pid for child in server.workers())


def test_the_listen_queue_counts_connections_no_worker_took(serve: Any, own_runtime: Path) -> None:
    """One sync worker busy with a slow request: the next connections wait in the
    kernel's accept queue, and the master reports them."""
    server = serve(["-k", "sync", "--workers", "1"], env={"XDG_RUNTIME_DIR": str(own_runtime)})
    slow = [SlowRequest(server.url, ms=1500) for _ in range(3)]
    try:
        end = time.monotonic() + 10
        queue = 0
        while time.monotonic() < end and queue < 1:
            queue = status_json(own_runtime)["listeners"][0]["queue"]
            time.sleep(0.2)
    finally:
        for request in slow:
            request.join()
    assert queue >= 1


def test_status_shows_the_queue_time_of_the_last_request(serve: Any, own_runtime: Path) -> None:
    """With nothing else reading queue times (no metrics, no access log, no shedding) a
    worker measures them for one request per 10 ms at most: three slow requests at once
    to one sync worker, the last waits in the listen queue for the two before it, and
    status shows that wait (about 2 s; at least 1 s however late the clients start)."""
    server = serve(["-k", "sync", "--workers", "1"], env={"XDG_RUNTIME_DIR": str(own_runtime)})
    slow = [SlowRequest(server.url, ms=1000) for _ in range(3)]
    for request in slow:
        request.join()
    assert [request.status for request in slow] == [200, 200, 200]
    data = status_json(own_runtime)
    [worker] = data["workers"]
    assert worker["requests"] >= 3
    assert worker["queue"] is not None and worker["queue"]["shed"] == 0
    assert 1.0 <= worker["queue"]["seconds"] < 10, worker["queue"]
    assert data["queue_time_seconds"] == worker["queue"]["seconds"]


#: Each call to /leak keeps ~20 MB more in the worker (written, so it is its own).
LEAKY_APP = """\
import os

LEAK = []


def app(environ, start_response):
    if environ["PATH_INFO"] == "/leak":
        LEAK.append(b"x" * (20 * 1000 * 1000))
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"""


def test_a_memory_recycle_is_counted_in_status_and_metrics(
    serve: Any, own_runtime: Path, free_port: Any, tmp_path: Path
) -> None:
    (tmp_path / "leaky.py").write_text(LEAKY_APP)
    address = f"127.0.0.1:{free_port()}"
    server = serve(
        [
            *("leaky:app", "--workers", "1", "--max-worker-memory", "100MB"),
            *("--metrics", "--metrics-bind", address),
        ],
        env={"XDG_RUNTIME_DIR": str(own_runtime)},
    )
    first = int(requests.get(server.url + "/", timeout=10).text)
    end = time.monotonic() + 30
    data: dict[str, Any] = {}
    while time.monotonic() < end:
        requests.get(server.url + "/leak", timeout=30)
        data = status_json(own_runtime)
        if data["recycled"]["memory"] >= 1 and data["workers_running"] == 1:
            break
        time.sleep(0.3)
    assert data["recycled"]["memory"] == 1, f"{data}\n{server.describe()}"
    assert data["recycled"]["crash"] == 0, data
    assert (data["max_worker_memory"], data["memory_measure"]) == (100_000_000, "USS")
    [worker] = data["workers"]
    assert worker["previous_worker"]["pid"] == first
    assert worker["previous_worker"]["reason"] == "memory"
    text = status(own_runtime).stdout
    assert "OWN = USS" in text and "--max-worker-memory 95.4M (of OWN)" in text
    assert "workers ended: memory 1" in text
    exits = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(
            requests.get(f"http://{address}/metrics", timeout=10).text
        )
        for sample in family.samples
        if sample.name == "microsvc_worker_exits_total"
    }
    assert exits["memory"] == 1 and exits["crash"] == 0, exits
    log = server.log_text()
    assert log.count(f"Recycling worker (pid: {first}): memory (USS) ") == 1, log
