"""The image under real limits: the plan inside follows the CPU quota, the cpuset and the
memory limit; the HEALTHCHECK passes; `podman stop` lets a request in flight finish; a
leaking app is recycled by --max-worker-memory before the kernel's OOM killer acts."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
from podmanlib import ROOT, Container, Podman, figure

RunContainer = Callable[..., Container]

MiB = 1024**2


def master_uid(container: Container) -> int:
    status = container.podman("exec", container.name, "cat", "/proc/1/status").stdout
    match = re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)
    assert match, status
    return int(match.group(1))


def test_image_is_the_dockerfile_on_the_local_base(
    podman: Podman, image: str, base_image: str
) -> None:
    # Both stages (the wheel's, with a compiler, and the image's) start from the base.
    (from_line,) = {
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.upper().startswith("FROM ")
    }
    assert base_image.endswith("/" + from_line)
    inspected = podman.inspect(image)
    config = inspected["Config"]
    assert config["User"] == "10001"
    # Kept only in Docker's image format; podman shows it next to Config.
    healthcheck = inspected.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "/healthz" in " ".join(healthcheck.get("Test", [])), inspected
    assert config["Cmd"][:2] == ["microsvc", "run"]
    python = podman("run", "--rm", "--pull=never", image, "python", "--version")
    figure(f"image {image}: Python inside is {python.stdout.strip()} (Debian's, on the local base)")
    # The request path as the wheel stage built it, with its compiler and Python's headers.
    code = "import microsvc.http as h; print(h.BUILD.describe())"
    build = podman("run", "--rm", "--pull=never", image, "python", "-c", code).stdout.strip()
    assert build == "compiled", build
    figure(f"image {image}: request path {build}")


def test_limited_container_plans_from_quota_and_memory_limit(run_container: RunContainer) -> None:
    # The image's own CMD: the demo, `--workers auto`, on port 8000.
    container = run_container(["--cpus", "1", "--memory", "512m"])
    assert master_uid(container) == 10001

    plan = container.plan()["plan"]
    sources = {source["name"]: source["cpus"] for source in plan["cpu_sources"]}
    assert plan["usable_cpus"] == 1
    assert plan["cpu_limited_by"] == "quota"
    assert sources["quota"] == 1.0
    assert plan["memory"] == 512 * MiB
    assert "memory" in plan["memory_source"]  # memory.limit_in_bytes (v1) or memory.max (v2)
    assert plan["worker_class"] == "sync" and plan["workers"] == 3

    start = re.search(r"microsvc [^:]+: (.*)", container.logs())
    assert start, container.logs()
    assert "3 sync workers; 1 usable CPUs (limited by quota)" in start.group(1)
    figure(
        f"--cpus 1 --memory 512m: uid {master_uid(container)}, plan {plan['usable_cpus']} CPU "
        f"(limited by {plan['cpu_limited_by']}), memory {plan['memory']} bytes from "
        f"{plan['memory_source']}; start line: {start.group(1)}"
    )

    health = container.podman("healthcheck", "run", container.name, check=False)
    assert health.returncode == 0, health.describe()
    assert container.podman.inspect(container.name)["State"]["Health"]["Status"] == "healthy"
    assert requests.get(container.url + "/data", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("limits", "options", "expected"),
    [
        (["--cpus", "0.5"], [], {"usable_cpus": 1, "cpu_limited_by": "quota", "quota": 0.5}),
        (["--cpuset-cpus", "0"], [], {"usable_cpus": 1, "cpu_limited_by": "affinity"}),
        (["--cpus", "1"], ["-k", "gevent"], {"usable_cpus": 1, "workers": 1}),
        (["--cpus", "0.5"], ["-k", "gevent"], {"usable_cpus": 1, "workers": 1}),
    ],
    ids=["cpus-0.5", "cpuset-0", "cpus-1-gevent", "cpus-0.5-gevent"],
)
def test_plan_follows_the_cpu_limits(
    podman: Podman,
    image: str,
    limits: list[str],
    options: list[str],
    expected: dict[str, Any],
) -> None:
    done = podman(
        "run", "--rm", "--pull=never", "--label", podman.label, *limits, image,
        "microsvc", "plan", "--json", *options,
    )  # fmt: skip
    plan = json.loads(done.stdout)["plan"]
    sources = {source["name"]: source["cpus"] for source in plan["cpu_sources"]}
    seen = {
        "usable_cpus": plan["usable_cpus"],
        "cpu_limited_by": plan["cpu_limited_by"],
        "quota": sources["quota"],
        "workers": plan["workers"],
    }
    assert {key: seen[key] for key in expected} == expected, plan
    figure(
        f"{' '.join(limits)} {' '.join(options)}: {plan['workers']} {plan['worker_class']} "
        f"workers, {plan['usable_cpus']} usable CPU (limited by {plan['cpu_limited_by']}; "
        f"affinity {sources['affinity']}, quota {sources['quota']})"
    )


def test_stop_lets_the_request_in_flight_finish(run_container: RunContainer) -> None:
    container = run_container(
        ["--cpus", "1", "--memory", "512m"],
        ["microsvc", "run", "apps.slow:app", "--bind", "0.0.0.0:8000", "-k", "gevent"],
    )
    assert "1 gevent workers; 1 usable CPUs (limited by quota)" in container.logs()

    answers: list[requests.Response | Exception] = []

    def slow_request() -> None:
        try:
            answers.append(requests.get(container.url + "/slow?s=3", timeout=60))
        except requests.RequestException as error:
            answers.append(error)

    client = threading.Thread(target=slow_request)
    client.start()
    try:
        end = time.monotonic() + 30
        while container.podman("exec", container.name, "test", "-e", "/tmp/in-flight",
                               check=False).returncode != 0:  # fmt: skip
            assert time.monotonic() < end, "the request never reached the app"
            assert client.is_alive(), answers
            time.sleep(0.1)
        grace = 30
        stopped = container.podman("stop", "-t", str(grace), container.name)
    finally:
        client.join(60)
    (answer,) = answers
    assert isinstance(answer, requests.Response), answer
    assert answer.status_code == 200 and answer.text.startswith("done by")
    assert container.exit_code() == 0, container.logs()
    assert "Shutting down: Master" in container.logs()
    figure(
        f"podman stop -t {grace} with a 3 s request in flight: request 200, exit 0, "
        f"stop took {stopped.seconds:.1f} s"
    )


def _leak(
    container: Container, requests_to_send: int, *, until_failure: bool = False
) -> list[dict[str, Any] | str]:
    """Send /leak requests one after another (8 MiB kept per request), a quarter of a
    second apart, so the worker's memory grows at about 32 MiB/s at most."""
    seen: list[dict[str, Any] | str] = []
    for _ in range(requests_to_send):
        try:
            answer = requests.get(container.url + "/leak", timeout=30)
            seen.append(answer.json())
        except requests.RequestException as error:
            seen.append(type(error).__name__)
            if until_failure:
                break
        time.sleep(0.25)
    return seen


def _oom_kills(container: Container) -> int:
    control = container.podman(
        "exec", container.name, "cat", "/sys/fs/cgroup/memory/memory.oom_control", check=False
    )
    if control.returncode != 0:  # cgroup v2: memory.events
        control = container.podman("exec", container.name, "cat", "/sys/fs/cgroup/memory.events")
    match = re.search(r"^oom_kill (\d+)", control.stdout, re.MULTILINE)
    assert match, control.stdout
    return int(match.group(1))


def _peak_memory(container: Container) -> int | None:
    done = container.podman(
        "exec", container.name, "cat", "/sys/fs/cgroup/memory/memory.max_usage_in_bytes",
        check=False,
    )  # fmt: skip
    return int(done.stdout) if done.returncode == 0 else None


#: 48 requests keep 384 MiB in all: more than the container's 256 MiB.
LEAK_REQUESTS = 48


def test_leaking_worker_is_recycled_before_the_oom_killer(run_container: RunContainer) -> None:
    container = run_container(
        ["--memory", "256m"],
        [
            "microsvc", "run", "apps.leak:app", "--bind", "0.0.0.0:8000",
            "--workers", "1", "--max-worker-memory", "96MiB",
        ],
    )  # fmt: skip
    seen = _leak(container, LEAK_REQUESTS)
    failed = [answer for answer in seen if not isinstance(answer, dict)]
    assert not failed, seen
    logs = container.logs()
    recycled = re.findall(r"Recycling worker \(pid: \d+\): (memory \(\w+\) [\d.]+MiB)", logs)
    assert recycled, logs
    assert "SIGKILL" not in logs and "out of memory" not in logs, logs
    assert _oom_kills(container) == 0
    pids = {answer["pid"] for answer in seen if isinstance(answer, dict)}
    assert len(pids) >= 2
    peak = _peak_memory(container)
    highest = max(answer["rss"] for answer in seen if isinstance(answer, dict))
    figure(
        f"--memory 256m, leak 8 MiB/request, --max-worker-memory 96MiB: {LEAK_REQUESTS} "
        f"requests all 200, {len(recycled)} recycles ({', '.join(recycled)}), {len(pids)} "
        f"workers, worker RSS at most {highest / MiB:.0f} MiB, container peak "
        f"{(peak or 0) / MiB:.0f} MiB, kernel OOM kills 0"
    )


def test_leaking_worker_without_the_limit_is_killed_by_the_kernel(
    run_container: RunContainer,
) -> None:
    # The same app and limit without --max-worker-memory: the limit is real.
    container = run_container(
        ["--memory", "256m"],
        ["microsvc", "run", "apps.leak:app", "--bind", "0.0.0.0:8000", "--workers", "1"],
    )
    seen = _leak(container, LEAK_REQUESTS, until_failure=True)
    failed = [answer for answer in seen if not isinstance(answer, dict)]
    kills = _oom_kills(container)
    assert kills >= 1, seen
    assert failed, seen
    container.wait_log(r"Worker \(pid:\d+\) was sent SIGKILL")
    container.wait_ready()  # the master survived and booted another worker
    highest = max(answer["rss"] for answer in seen if isinstance(answer, dict))
    figure(
        f"--memory 256m, same leak, no --max-worker-memory: kernel OOM kills {kills}, "
        f"{len(failed)} of {len(seen)} requests failed, worker RSS seen up to "
        f"{highest / MiB:.0f} MiB; the master lived on and booted another worker"
    )
