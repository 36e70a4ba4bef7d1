"""`microsvc manifest` output run as a pod by `podman kube play`: the pod gets the limits the
manifest sets, the plan inside sees them, the readiness path answers, and the pod stops
cleanly within terminationGracePeriodSeconds.

podman 4.3's `kube down` kills a pod's containers at once (SIGKILL, no grace: podman issue
22397, fixed in podman 5.1), so the pod is stopped as Kubernetes stops it first, with
`podman pod stop -t terminationGracePeriodSeconds`, and `kube down` then removes it.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from podmanlib import Podman, figure

MiB = 1024**2
READY_DEADLINE = 60.0

_READYZ = (
    "import sys, urllib.request\n"
    "try:\n"
    "    answer = urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=3)\n"
    "except Exception as error:\n"
    "    sys.exit(f'{error}')\n"
    "print(answer.status, answer.read().decode())\n"
)


@pytest.fixture
def manifest(podman: Podman, image: str, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """`microsvc manifest` for the test image, one replica, 1 CPU and 512Mi; the file and
    the name of its objects. Whatever `kube play` made from it is removed at teardown."""
    name = podman.name("kube")
    done = subprocess.run(
        [
            sys.executable, "-m", "microsvc", "manifest",
            "--image", image, "--name", name, "--replicas", "1",
            "--cpu", "1", "--memory", "512Mi",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )  # fmt: skip
    path = tmp_path / "k8s.yaml"
    path.write_text(done.stdout)
    yield path, name
    with contextlib.suppress(subprocess.TimeoutExpired):
        podman("kube", "down", str(path), check=False, timeout=120)
        podman("pod", "rm", "-f", "-t", "0", f"{name}-pod-0", check=False, timeout=120)


def _deployment(path: Path) -> dict[str, Any]:
    (deployment,) = [
        doc for doc in yaml.safe_load_all(path.read_text()) if doc["kind"] == "Deployment"
    ]
    return dict(deployment)


def test_manifest_runs_under_kube_play(podman: Podman, manifest: tuple[Path, str]) -> None:
    path, name = manifest
    pod_spec = _deployment(path)["spec"]["template"]["spec"]
    (container_spec,) = pod_spec["containers"]
    grace = int(pod_spec["terminationGracePeriodSeconds"])
    assert container_spec["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}

    # The manifest's containerPort needs port mappings, which the host network lacks.
    played = podman("kube", "play", "--network", "slirp4netns", str(path))
    pod, container = f"{name}-pod-0", f"{name}-pod-0-{name}"

    end = time.monotonic() + READY_DEADLINE
    while True:
        ready = podman("exec", container, "python", "-c", _READYZ, check=False)
        if ready.returncode == 0:
            break
        assert time.monotonic() < end, f"{ready.describe()}\n{podman.logs(container)}"
        time.sleep(0.5)
    assert ready.stdout.startswith("200 "), ready.describe()
    ready_after = time.monotonic() - end + READY_DEADLINE

    host = podman.inspect(container)["HostConfig"]
    assert host["CpuQuota"] / host["CpuPeriod"] == 1.0
    assert host["Memory"] == 512 * MiB

    plan: dict[str, Any] = json.loads(
        podman("exec", container, "microsvc", "plan", "--json").stdout
    )["plan"]
    assert plan["usable_cpus"] == 1 and plan["cpu_limited_by"] == "quota"
    assert plan["memory"] == 512 * MiB
    uid = podman("exec", container, "id", "-u").stdout.strip()
    assert uid == "10001"

    stopped = podman("pod", "stop", "-t", str(grace), pod)
    state = podman.inspect(container)["State"]
    logs = podman.logs(container)
    assert state["ExitCode"] == 0, f"{state}\n{logs}"
    assert "Handling signal: term" in logs and "Shutting down: Master" in logs, logs
    down = podman("kube", "down", str(path))
    assert podman("pod", "exists", pod, check=False).returncode != 0
    figure(
        f"kube play of `microsvc manifest --cpu 1 --memory 512Mi`: played in "
        f"{played.seconds:.1f} s, /readyz 200 after {ready_after:.1f} s; pod limits quota "
        f"{host['CpuQuota']}/{host['CpuPeriod']}, memory {host['Memory']}; plan inside "
        f"{plan['workers']} {plan['worker_class']} workers, {plan['usable_cpus']} CPU "
        f"({plan['cpu_limited_by']}), memory {plan['memory']}; pod stop -t {grace}: exit 0 in "
        f"{stopped.seconds:.1f} s; kube down {down.seconds:.1f} s"
    )
