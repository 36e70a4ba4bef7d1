"""`--metrics`: Prometheus metrics for the whole server, correct across workers and
restarts of workers (recycling, crashes, reloads), served on their own address.

Every test counts the requests it sends and compares them with the scraped totals.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import is_running
from microsvc._version import __version__

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

Key = tuple[str, str, str]


class Scrape:
    """One scrape of /metrics, parsed."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def by_request(self, name: str = "microsvc_http_requests_total") -> dict[Key, float]:
        found: dict[Key, float] = {}
        for (sample, labels), value in self.samples.items():
            if sample == name and value:
                label = dict(labels)
                found[(label["method"], label["route"], label["status"])] = value
        return found

    def total(self, name: str = "microsvc_http_requests_total") -> float:
        return sum(self.by_request(name).values())

    def exits(self) -> dict[str, float]:
        return {
            dict(labels)["reason"]: value
            for (sample, labels), value in self.samples.items()
            if sample == "microsvc_worker_exits_total"
        }


class Client:
    """Sends requests to the app and remembers what it sent, by (method, route, status)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.sent: Counter[Key] = Counter()
        self.pids: set[int] = set()
        self._lock = threading.Lock()

    def send(self, method: str, path: str, route: str, status: int) -> None:
        response = requests.request(method, self.url + path, timeout=30)
        assert response.status_code == status, f"{method} {path}: {response.status_code}"
        if path.startswith("/io"):
            with self._lock:
                self.pids.add(response.json()["pid"])
        with self._lock:
            self.sent[(method, route, str(status))] += 1

    def mix(self, rounds: int) -> None:
        for _ in range(rounds):
            self.send("GET", "/data", "/data", 200)
            self.send("GET", "/io?ms=1", "/io", 200)
            self.send("GET", "/nope", "(unmatched)", 404)
            self.send("POST", "/data", "(unmatched)", 405)
            self.send("HEAD", "/data", "/data", 200)
            self.send("GET", "/healthz", "/healthz", 200)

    def concurrent_io(self, count: int, ms: int) -> None:
        with ThreadPoolExecutor(count) as pool:
            for future in [
                pool.submit(self.send, "GET", f"/io?ms={ms}", "/io", 200) for _ in range(count)
            ]:
                future.result()


def scrape(address: str) -> Scrape:
    response = requests.get(f"http://{address}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return Scrape(response.text)


def wait_for(check, what: str, server, deadline: float = 30.0):  # type: ignore[no-untyped-def]
    end = time.monotonic() + deadline
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > end:
            pytest.fail(f"{what} did not happen within {deadline:.0f} s: {server.describe()}")
        time.sleep(0.2)


def find_exporter(server) -> psutil.Process | None:  # type: ignore[no-untyped-def]
    """The exporter process, or None (between a death and the restart, none runs; the
    dead one may be a zombie, or gone while it is being looked at)."""
    for child in psutil.Process(server.pid).children():
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "microsvc.metrics.exporter" in command:
            return child
    return None


def exporter_of(server) -> psutil.Process:  # type: ignore[no-untyped-def]
    found = find_exporter(server)
    if found is None:
        pytest.fail(f"no metrics exporter process: {server.describe()}")
    return found


def store_of(server) -> Path:  # type: ignore[no-untyped-def]
    for part in exporter_of(server).cmdline():
        if part.startswith("--store="):
            return Path(part.removeprefix("--store="))
    pytest.fail("the exporter names no store")


def start(serve, free_port, *args: str):  # type: ignore[no-untyped-def]
    address = f"127.0.0.1:{free_port()}"
    # Wait on the log, not on HTTP: every request to the app counts.
    server = serve(["--metrics", "--metrics-bind", address, *args], wait=False)
    server.wait_log(r"Ready: \d+ workers booted", deadline=45)
    return server, address


def assert_totals(client: Client, address: str, deadline: float = 10.0) -> Scrape:
    """Scrape until every request the client sent is counted (or `deadline` seconds
    pass), check the totals in that scrape and return it. A request is counted when the
    server closes its response, just after the client has it: on a busy machine, after
    the client has had the answers to later requests from other workers too."""
    sent = {key: float(count) for key, count in client.sent.items()}

    def counted(scraped: Scrape) -> bool:
        return (
            scraped.by_request() == sent
            and scraped.by_request("microsvc_http_request_duration_seconds_count") == sent
            and scraped.value("microsvc_http_requests_in_flight") == 0
        )

    end = time.monotonic() + deadline
    scraped = scrape(address)
    while not counted(scraped) and time.monotonic() < end:
        time.sleep(0.1)
        scraped = scrape(address)
    assert scraped.by_request() == sent
    assert scraped.by_request("microsvc_http_request_duration_seconds_count") == sent
    assert scraped.value("microsvc_http_requests_in_flight") == 0
    return scraped


@pytest.mark.both_engines
def test_totals_equal_requests_sent_through_three_workers_and_recycles(
    serve: ServeFactory, free_port: Callable[[], int]
) -> None:
    server, address = start(
        serve, free_port, "--workers", "3", "--max-requests", "40", "--max-requests-jitter", "5"
    )
    client = Client(server.url)
    for _ in range(5):  # nine at once, until every one of the three workers has served
        client.concurrent_io(9, ms=300)
        if len(client.pids) == 3:
            break
    assert len(client.pids) == 3, client.pids
    client.mix(5)
    assert_totals(client, address)

    client.mix(25)  # 150 more requests: each worker recycles after 40..45

    def settled() -> Scrape | None:
        scraped = scrape(address)
        recycles = server.log_text().count("Recycling worker")
        exits = scraped.exits()["max-requests"]
        return scraped if exits == recycles and scraped.value("microsvc_workers") == 3 else None

    scraped = wait_for(settled, "every recycled worker to be counted and replaced", server)
    assert_totals(client, address)
    assert scraped.exits()["max-requests"] >= 2
    assert scraped.value("microsvc_worker_starts_total") == 3 + sum(scraped.exits().values())

    # The files of exited workers were folded away: only live processes and the archive
    # (a worker may still be exiting: gunicorn's engine logs its recycle after the response).
    store = store_of(server)

    def folded() -> bool:
        live = {str(pid) for pid in {server.pid} | server.worker_pids()} | {"archive"}
        return {path.stem.rsplit("_", 1)[1] for path in store.glob("*.db")} <= live

    wait_for(folded, "the files of exited workers to be folded away", server)

    assert server.stop() == 0
    assert not store.exists(), "the store outlived the server"


def test_crash_and_reload_are_counted_with_their_reasons(
    serve: ServeFactory, free_port: Callable[[], int]
) -> None:
    server, address = start(serve, free_port, "--workers", "2")
    client = Client(server.url)
    client.mix(3)
    # A request is counted when the server closes its response, just after the client
    # has it: wait until every one is counted, or the kill may take a count with it.
    sent = {key: float(count) for key, count in client.sent.items()}
    wait_for(lambda: scrape(address).by_request() == sent, "every request counted", server)
    victim = server.app_workers()[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: scrape(address).exits()["crash"] == 1, "the crash count", server)
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: scrape(address).exits()["reload"] == 2, "the reload count", server)
    client.mix(3)
    scraped = assert_totals(client, address)
    assert {reason: count for reason, count in scraped.exits().items() if count} == {
        "crash": 1,
        "reload": 2,
    }
    assert scraped.value("microsvc_worker_starts_total") == 2 + 3
    assert server.stop() == 0


def test_lifetime_recycles_are_counted(serve: ServeFactory, free_port: Callable[[], int]) -> None:
    server, address = start(serve, free_port, "--workers", "2", "--max-worker-lifetime", "2s")
    client = Client(server.url)
    client.mix(2)
    wait_for(lambda: scrape(address).exits()["lifetime"] >= 2, "two lifetime recycles", server)
    client.mix(2)
    scraped = assert_totals(client, address)
    assert scraped.exits()["crash"] == 0


@pytest.mark.both_engines
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_requests_in_flight_across_workers(
    serve: ServeFactory, free_port: Callable[[], int], worker_class: str
) -> None:
    # Six threads a worker: however the six connections spread over the two workers,
    # none waits in a worker's line for a thread (it would not be in flight yet).
    threads = ["--threads", "6"] if worker_class == "gthread" else []
    server, address = start(serve, free_port, "-k", worker_class, "--workers", "2", *threads)
    client = Client(server.url)
    slow = threading.Thread(target=client.concurrent_io, args=(6, 6000))
    slow.start()
    try:
        wait_for(
            lambda: scrape(address).value("microsvc_http_requests_in_flight") == 6,
            "six requests in flight",
            server,
            deadline=5,
        )
    finally:
        slow.join()
    client.mix(4)
    scraped = assert_totals(client, address)
    assert scraped.value("microsvc_info", version=__version__, worker_class=worker_class) == 1


def test_metrics_are_not_on_the_app_address_and_speak_openmetrics(
    serve: ServeFactory, free_port: Callable[[], int]
) -> None:
    server, address = start(serve, free_port)
    assert requests.get(server.url + "/metrics", timeout=10).status_code == 404
    assert requests.get(f"http://{address}/", timeout=10).status_code == 404
    head = requests.head(f"http://{address}/metrics", timeout=10)
    assert head.status_code == 200 and not head.content
    open_metrics = requests.get(
        f"http://{address}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=10,
    )
    assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert open_metrics.text.rstrip().endswith("# EOF")
    gzipped = requests.get(
        f"http://{address}/metrics", headers={"Accept-Encoding": "gzip"}, timeout=10
    )
    assert gzipped.headers.get("Content-Encoding") == "gzip"
    assert "microsvc_workers" in gzipped.text


@pytest.mark.parametrize("worker_class", ["sync", "gevent"])
def test_a_killed_exporter_is_reported_as_killed_restarted_and_loses_nothing(
    serve: ServeFactory, free_port: Callable[[], int], worker_class: str
) -> None:
    """Also in a gevent-patched master, whose patched waitpid would not see the end of a
    process that gevent's subprocess started (gunicorn's arbiter handles SIGCHLD)."""
    server, address = start(
        serve, free_port, "-k", worker_class, "--workers", "2", "--log-format", "json"
    )
    client = Client(server.url)
    client.mix(3)
    first = exporter_of(server)
    first.kill()
    # Under gevent the status may be taken by a wait of gevent's own before the master's.
    ended = r"(was killed by signal 9 \(SIGKILL\)|ended \(its exit status was not seen\))"
    if worker_class == "sync":
        ended = r"was killed by signal 9 \(SIGKILL\)"
    server.wait_log(rf"Metrics exporter \(pid: {first.pid}\) {ended}; starting it again")
    wait_for(
        lambda: (new := find_exporter(server)) is not None and new.pid != first.pid,
        "a new exporter",
        server,
    )
    wait_for(lambda: _try_scrape(address), "metrics again", server)
    assert_totals(client, address)
    assert server.stop() == 0
    # Both exporters shared the master's output: every line of it is still JSON.
    for number, line in enumerate(server.log_text().splitlines(), 1):
        try:
            assert isinstance(json.loads(line), dict)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}\n{server.log_text()}")


@pytest.mark.parametrize("worker_class", ["sync", "gevent", "eventlet"])
def test_term_to_the_master_alone_stops_the_exporter_and_the_server(
    serve: ServeFactory, free_port: Callable[[], int], worker_class: str
) -> None:
    """TERM to the master alone, as a container runtime sends it: the master stops the
    exporter and exits 0 (a gevent-patched master once waited for it forever)."""
    server, _ = start(serve, free_port, "-k", worker_class, "--workers", "1")
    Client(server.url).mix(1)
    exporter = exporter_of(server)
    assert server.stop(group=False) == 0
    assert not is_running(exporter)


def _try_scrape(address: str) -> Scrape | None:
    try:
        return scrape(address)
    except requests.ConnectionError:
        return None


def test_the_exporter_cleans_up_after_a_killed_master(
    serve: ServeFactory, free_port: Callable[[], int]
) -> None:
    server, _ = start(serve, free_port, "--workers", "1")
    exporter = exporter_of(server)
    store = store_of(server)
    server.proc.kill()
    server.proc.wait(10)
    exporter.wait(15)
    assert not store.exists()


#: An app with gauges of its own, in modes whose values prometheus_client keeps for
#: processes that have ended.
GAUGE_APP = """\
import os

from prometheus_client import Gauge

PID = Gauge("app_worker_pid", "The worker's pid, one series per worker.", multiprocess_mode="all")
SERVED = Gauge("app_served", "Requests served by every worker.", multiprocess_mode="sum")
HIGHEST = Gauge("app_highest_pid", "The highest worker pid seen.", multiprocess_mode="max")


def app(environ, start_response):
    PID.set(os.getpid())
    SERVED.inc()
    HIGHEST.set(os.getpid())
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_the_apps_gauges_of_recycled_workers_are_folded_or_dropped(
    serve: ServeFactory, free_port: Callable[[], int], tmp_path: Path
) -> None:
    (tmp_path / "gauges.py").write_text(GAUGE_APP)
    server, address = start(serve, free_port, "gauges:app", "--workers", "2", "--max-requests", "5")
    served = [int(requests.get(server.url + "/", timeout=30).text) for _ in range(60)]
    assert len(set(served)) >= 6, "the workers were not recycled"

    def settled() -> Scrape | None:
        scraped = scrape(address)
        recycles = server.log_text().count("Recycling worker")
        exits = scraped.exits()["max-requests"]
        return scraped if exits == recycles and scraped.value("microsvc_workers") == 2 else None

    store = store_of(server)

    def quiet() -> tuple[Scrape, list[str]] | None:
        # `all` gauges: no series of an ended worker; files: those of the processes
        # running now, and one archive per type and mode. A worker may still be exiting
        # (gunicorn's engine logs its recycle after the response): looked at again.
        scraped = settled()
        if scraped is None:
            return None
        live = {str(pid) for pid in server.worker_pids()}
        per_worker = {
            dict(labels)["pid"]
            for (sample, labels), _ in scraped.samples.items()
            if sample == "app_worker_pid"
        }
        gauges = sorted(path.name for path in store.glob("gauge_*.db"))
        owners = {name.rsplit("_", 1)[1].removesuffix(".db") for name in gauges}
        if per_worker <= live and owners <= live | {str(server.pid), "archive"}:
            return scraped, gauges
        return None

    scraped, gauges = wait_for(quiet, "ended workers to leave no series nor file", server)
    assert scraped.value("app_served") == 60  # `sum`: the values of ended workers are kept
    assert scraped.value("app_highest_pid") == max(served)  # `max`: likewise
    archives = [name for name in gauges if name.endswith("_archive.db")]
    assert archives == ["gauge_max_archive.db", "gauge_sum_archive.db"], gauges
