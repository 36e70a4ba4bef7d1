"""`microsvc manifest`: YAML on stdout for good input; for bad input exit 2 with one
`Error: ` line naming what is wrong, nothing on stdout, no traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import yaml

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc

IMAGE = "registry.example.com/shop:1"


def test_manifest_prints_the_four_objects(microsvc: Microsvc) -> None:
    result = microsvc(
        "manifest", "shop.wsgi:app", "--image", IMAGE, "-k", "gevent", "--drain-period", "10s"
    )
    assert result.returncode == 0, result.describe()
    assert result.stderr == "", result.describe()
    assert result.stdout.startswith("---\napiVersion: apps/v1\nkind: Deployment\n")
    documents = list(yaml.safe_load_all(result.stdout))
    kinds = [document["kind"] for document in documents]
    assert kinds == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    (container,) = documents[0]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["args"][0] == "shop.wsgi:app"
    assert "--drain-period" in container["args"]
    assert documents[0]["metadata"]["name"] == "microsvc"
    assert documents[0]["spec"]["replicas"] == 2
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "512Mi"}
    assert container["ports"][0]["containerPort"] == 8000


def test_manifest_takes_its_own_options(microsvc: Microsvc) -> None:
    result = microsvc(
        "manifest",
        "--image", IMAGE, "--name", "shop", "--replicas", "3", "--cpu", "500m",
        "--memory", "1Gi", "--port", "9000",
    )  # fmt: skip
    assert result.returncode == 0, result.describe()
    deployment = next(yaml.safe_load_all(result.stdout))
    assert deployment["metadata"]["name"] == "shop"
    assert deployment["spec"]["replicas"] == 3
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    assert container["args"][:2] == ["--bind", "0.0.0.0:9000"]


BAD_INPUT = [
    # (arguments after `manifest`, fragments of the error line)
    pytest.param([], ["--image"], id="missing-image"),
    pytest.param(["--image", IMAGE, "--cpu", "abc"], ["--cpu", "'abc'"], id="cpu-abc"),
    pytest.param(["--image", IMAGE, "--cpu", "0"], ["--cpu", "'0'"], id="cpu-zero"),
    pytest.param(["--image", IMAGE, "--memory", "lots"], ["--memory", "'lots'"], id="memory"),
    pytest.param(["--image", IMAGE, "--memory", "512MiB"], ["--memory", "'512MiB'"], id="mib"),
    pytest.param(["--image", IMAGE, "--name", "My_App"], ["--name", "'My_App'"], id="name"),
    pytest.param(["--image", IMAGE, "--name", "-x"], ["--name"], id="name-dash"),
    pytest.param(["--image", "a b"], ["--image", "'a b'"], id="image-space"),
    pytest.param(["--image", IMAGE, "--replicas", "0"], ["--replicas"], id="replicas-0"),
    pytest.param(["--image", IMAGE, "--port", "0"], ["--port"], id="port-0"),
    pytest.param(["--image", IMAGE, "--timeout", "x"], ["--timeout", "'x'"], id="timeout-x"),
    pytest.param(["--image", IMAGE, "-k", "nosuch"], ["--worker-class", "'nosuch'"], id="k"),
    pytest.param(
        ["--image", IMAGE, "--drain-period", "soon"], ["--drain-period", "'soon'"], id="drain"
    ),
    pytest.param(
        ["--image", IMAGE, "--health-path", "healthz"], ["--health-path", "'healthz'"], id="path"
    ),
    pytest.param(["not an app", "--image", IMAGE], ["'not an app'"], id="app"),
    pytest.param(
        ["--image", IMAGE, "--set", "worker_connections=10"], ["--set", "config file"], id="set"
    ),
]


@pytest.mark.parametrize(("args", "fragments"), BAD_INPUT)
def test_bad_input(microsvc: Microsvc, args: list[str], fragments: list[str]) -> None:
    microsvc("manifest", *args).assert_error(2, *fragments)


def test_manifest_hpa_on_queue_time(microsvc: Microsvc) -> None:
    result = microsvc("manifest", "--image", IMAGE, "--metrics", "--hpa", "queue-time")
    assert result.returncode == 0, result.describe()
    hpa = list(yaml.safe_load_all(result.stdout))[2]
    [metric] = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == "microsvc_http_request_queue_seconds_average"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(["--hpa", "busy-ratio"], ["--hpa busy-ratio", "--metrics"], id="no-metrics"),
        pytest.param(["--hpa", "memory"], ["--hpa", "'memory'"], id="unknown"),
    ],
)
def test_manifest_hpa_bad_input(microsvc: Microsvc, args: list[str], fragments: list[str]) -> None:
    microsvc("manifest", "--image", IMAGE, *args).assert_error(2, *fragments)
