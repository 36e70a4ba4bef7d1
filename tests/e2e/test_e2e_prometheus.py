"""A real Prometheus scrapes `--metrics` and agrees with what the test did.

Debian's prometheus (package `prometheus`, with `promtool`) runs on a free loopback port
with a storage directory under tmp_path and a 1 s scrape of the server's metrics endpoint,
loading the rules of docs/prometheus/rules.yml. The test sends a known number of requests
through workers that --max-requests recycles, kills one worker, and reads the totals back
through Prometheus' HTTP query API: the request counter's sum equals what was sent, and
worker starts and exits by reason equal what the responses' pids show.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import requests

from harness import Server

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "docs" / "prometheus" / "rules.yml"
RULES_TEST = ROOT / "docs" / "prometheus" / "rules-test.yml"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus and promtool are not installed (scripts/system-deps installs them)",
)

#: Requests the test sends, and the --max-requests of the two workers.
SENT = 95
MAX_REQUESTS = 10
#: How long Prometheus may take to show what the server counted (it scrapes each second).
QUERY_DEADLINE = 60.0

SCRAPE_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {rules}
scrape_configs:
  - job_name: microsvc
    scrape_interval: 1s
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
"""


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> dict[str, float]:
        """An instant query: {"label=value,...": value}, the metric's name left out."""
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        answer.raise_for_status()
        result: dict[str, float] = {}
        for sample in answer.json()["data"]["result"]:
            labels = sorted(sample["metric"].items())
            key = ",".join(f"{name}={value}" for name, value in labels if name != "__name__")
            result[key] = float(sample["value"][1])
        return result

    def wait_for(self, expected: dict[str, dict[str, float]]) -> dict[str, Any]:
        """Query every expression of `expected` until all answer as expected; fail with
        the last answers after QUERY_DEADLINE seconds."""
        end = time.monotonic() + QUERY_DEADLINE
        seen: dict[str, Any] = {}
        while True:
            try:  # 503 until Prometheus has replayed its storage
                seen = {expr: self.query(expr) for expr in expected}
            except requests.RequestException as error:
                seen = {"error": str(error)}
            if seen == expected:
                return seen
            if time.monotonic() > end:
                pytest.fail(f"Prometheus answered {seen}, expected {expected}")
            time.sleep(0.5)


def wait_two_workers(server: Server, gone: set[int]) -> list[int]:
    """The pids of the server's two workers (its metrics exporter left out), once none of
    `gone` is among them and the set has held for a second."""
    end = time.monotonic() + 30
    last: list[int] = []
    since = time.monotonic()
    while time.monotonic() < end:
        pids = sorted(child.pid for child in server.app_workers())
        if pids != last:
            last, since = pids, time.monotonic()
        elif len(pids) == 2 and not set(pids) & gone and time.monotonic() - since >= 1.0:
            return pids
        time.sleep(0.1)
    pytest.fail(f"workers {last}, expected two not in {sorted(gone)}: {server.describe()}")


@needs_prometheus
def test_docs_rules_pass_promtool() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(RULES_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr


@needs_prometheus
def test_prometheus_counts_what_was_sent(
    serve: ServeFactory, free_port: Callable[[], int], tmp_path: Path
) -> None:
    metrics_port = free_port()
    server = serve(
        [
            "--workers", "2", "--max-requests", str(MAX_REQUESTS),
            "--metrics", "--metrics-bind", f"127.0.0.1:{metrics_port}",
        ],
        wait=False,
    )  # fmt: skip
    config = tmp_path / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(rules=RULES, metrics_port=metrics_port))
    checked = promtool("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    prometheus_server = serve(
        command=[
            str(PROMETHEUS),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        ready_path="/-/ready",
        name="prometheus",
    )
    prometheus = Prometheus(prometheus_server.url)

    # Every request reports the pid of the worker that served it: a worker that served
    # MAX_REQUESTS requests has been recycled. Connection errors are retried only until
    # the server first answers (the app cannot have counted a refused connection).
    served: collections.Counter[int] = collections.Counter()
    end = time.monotonic() + 45
    while sum(served.values()) < SENT:
        try:
            answer = requests.get(server.url + "/io?ms=0", timeout=30)
        except requests.ConnectionError:
            assert not served and time.monotonic() < end, server.describe()
            time.sleep(0.1)
            continue
        assert answer.status_code == 200, answer.text
        served[answer.json()["pid"]] += 1
    assert max(served.values()) == MAX_REQUESTS
    recycled = sum(1 for count in served.values() if count == MAX_REQUESTS)

    # Both workers of the last generation running, then one of them killed.
    done = {pid for pid, count in served.items() if count == MAX_REQUESTS}
    victim = wait_two_workers(server, gone=done)[0]
    os.kill(victim, signal.SIGKILL)
    server.wait_log(rf"Worker \(pid:{victim}\) was sent SIGKILL")
    wait_two_workers(server, gone=done | {victim})

    seen = prometheus.wait_for(
        {
            'up{job="microsvc"}': {f"instance=127.0.0.1:{metrics_port},job=microsvc": 1.0},
            "sum(microsvc_http_requests_total)": {"": float(SENT)},
            'sum(microsvc_http_requests_total{route="/io",status="200"})': {"": float(SENT)},
            "sum(microsvc_worker_starts_total)": {"": float(2 + recycled + 1)},
            "sum by (reason) (microsvc_worker_exits_total > 0)": {
                "reason=max-requests": float(recycled),
                "reason=crash": 1.0,
            },
            "sum(microsvc_workers)": {"": 2.0},
        }
    )
    rules = requests.get(prometheus.url + "/api/v1/rules", timeout=10).json()["data"]
    loaded = [rule["name"] for group in rules["groups"] for rule in group["rules"]]
    assert "MicrosvcWorkersCrashing" in loaded

    exposition = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    linted = promtool("check", "metrics", stdin=exposition)
    assert linted.returncode == 0 and not linted.stdout.strip(), linted.stdout + linted.stderr
    print(
        f"FIGURES prometheus: {SENT} requests over {len(served)} workers "
        f"(--max-requests {MAX_REQUESTS}), {recycled} recycled, 1 killed; Prometheus saw {seen}"
    )
