"""microsvc.deploy.manifest.render: the Kubernetes objects, the container's command line (read
back by microsvc's own parser), bad input, and validation against the Kubernetes schemas
with `kubernetes-validate --strict`."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from microsvc.cli import main
from microsvc.config.options import DEFAULTS, OPTIONS, Settings
from microsvc.config.pipeline import build
from microsvc.config.resolve import Caller
from microsvc.deploy.manifest import render, to_yaml
from microsvc.errors import UsageError

#: The newest Kubernetes version the pinned kubernetes-validate (>=1.37) has schemas for.
KUBERNETES_VERSION = "1.37.0"

#: Option combinations: (id, options as the command line gives them, replicas).
COMBINATIONS = [
    pytest.param({}, 2, id="default"),
    pytest.param(
        {"worker_class": "gevent", "drain_period": "10s", "graceful_timeout": "20"},
        2,
        id="gevent-drain10-graceful20",
    ),
    pytest.param({"health_path": "off", "ready_path": "off"}, 2, id="health-paths-off"),
    pytest.param({}, 1, id="replicas-1"),
    pytest.param(
        {"metrics": True, "metrics_bind": "10.1.2.3:9300", "log_format": "json"},
        2,
        id="metrics-json-logs",
    ),
    pytest.param(
        {
            "worker_class": "gthread",
            "threads": "8",
            "workers": "3",
            "max_workers": "6",
            "memory_per_worker": "256MiB",
            "max_requests": "1000",
            "max_requests_jitter": "100",
            "timeout": "60",
            "keep_alive": "5",
            "preload": True,
            "log_level": "warning",
            "access_log": "-",
            "max_worker_memory": "300MiB",
            "max_worker_lifetime": "6h",
            "max_worker_lifetime_jitter": "30m",
            "drain_period": "2.5",
            "health_path": "/live",
            "ready_path": "/ready",
            "forwarded_allow_ips": "10.0.0.0/8,127.0.0.1",
            "limit_request_line": "8190",
            "limit_request_fields": "50",
            "limit_request_field_size": "4096",
        },
        3,
        id="many-options",
    ),
]


def settings_of(**options: Any) -> Settings:
    return build(options, {}, caller=Caller("command line", command_line=True)).settings


def make(options: dict[str, Any] | None = None, **kw: Any) -> tuple[Settings, list[dict[str, Any]]]:
    settings = settings_of(**(options or {}))
    arguments: dict[str, Any] = {
        "name": "shop",
        "image": "registry.example.com/shop:1.2.3",
        "replicas": 2,
        "cpu": "1",
        "memory": "512Mi",
        "port": 8000,
        "settings": settings,
        "app": "shop.wsgi:app",
        **kw,
    }
    text = render(**arguments)
    return settings, list(yaml.safe_load_all(text))


def by_kind(documents: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {document["kind"]: document for document in documents}


def pod_container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    spec = by_kind(documents)["Deployment"]["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = spec["containers"]
    (container,) = containers
    return container


def plan_settings(args: list[str]) -> dict[str, Any]:
    """`microsvc plan --json ARGS`, in process: the settings' values as JSON gives them."""
    result = CliRunner().invoke(main, ["plan", "--json", *args])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    return {name: entry["value"] for name, entry in report["settings"].items()}


def as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def test_the_four_objects_in_order() -> None:
    _, documents = make()
    assert [(d["apiVersion"], d["kind"]) for d in documents] == [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
        ("policy/v1", "PodDisruptionBudget"),
    ]
    for document in documents:
        assert document["metadata"]["name"] == "shop"
        assert document["metadata"]["labels"]["app.kubernetes.io/name"] == "shop"


def test_the_output_is_yaml_documents_separated_by_dashes() -> None:
    settings = settings_of()
    text = render(
        name="shop",
        image="img",
        replicas=2,
        cpu="1",
        memory="1Gi",
        port=8000,
        settings=settings,
        app=None,
    )
    assert text.startswith("---\n")
    assert text.count("\n---\n") == 3
    assert text.endswith("\n")


@pytest.mark.parametrize(("options", "replicas"), COMBINATIONS)
def test_probes_follow_the_settings(options: dict[str, Any], replicas: int) -> None:
    settings, documents = make(options, replicas=replicas, port=9000)
    container = pod_container(documents)
    assert container["ports"][0] == {"name": "http", "containerPort": 9000, "protocol": "TCP"}
    if settings.health_path is None:
        assert "livenessProbe" not in container
        assert "startupProbe" not in container
    else:
        for probe in ("livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"] == {"path": settings.health_path, "port": 9000}
    if settings.ready_path is None:
        assert "readinessProbe" not in container
    else:
        assert container["readinessProbe"]["httpGet"] == {
            "path": settings.ready_path,
            "port": 9000,
        }


@pytest.mark.parametrize(
    ("drain", "graceful"),
    [("0", "30"), ("10s", "20"), ("2.5", "0"), ("0", "0"), ("1m", "90"), ("0.1", "7")],
)
def test_grace_period_outlasts_drain_and_graceful_shutdown(drain: str, graceful: str) -> None:
    settings, documents = make({"drain_period": drain, "graceful_timeout": graceful})
    period = by_kind(documents)["Deployment"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    assert isinstance(period, int)
    assert period > settings.drain_period + settings.graceful_timeout
    assert period == math.ceil(settings.drain_period + settings.graceful_timeout) + 5


def test_resources_requests_equal_limits() -> None:
    _, documents = make(cpu="500m", memory="1Gi")
    resources = pod_container(documents)["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "500m", "memory": "1Gi"}


def test_security_context_and_writable_tmp() -> None:
    _, documents = make()
    pod = by_kind(documents)["Deployment"]["spec"]["template"]["spec"]
    container = pod_container(documents)
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert isinstance(context["runAsUser"], int) and context["runAsUser"] > 0
    assert isinstance(context["runAsGroup"], int) and context["runAsGroup"] > 0
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["enableServiceLinks"] is False
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    (volume,) = pod["volumes"]
    assert volume["name"] == "tmp" and "emptyDir" in volume
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["PYTHONUNBUFFERED"] == "1"
    assert "lifecycle" not in container  # microsvc drains itself on TERM


def test_service_autoscaler_and_disruption_budget() -> None:
    _, documents = make(replicas=3)
    kinds = by_kind(documents)
    deployment = kinds["Deployment"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    template_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= template_labels.items()
    assert deployment["spec"]["replicas"] == 3
    service = kinds["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"] == selector
    assert service["ports"] == [
        {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}
    ]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "shop"}
    assert hpa["minReplicas"] == 3
    assert hpa["maxReplicas"] > 3
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    pdb = kinds["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"] == selector
    assert pdb["maxUnavailable"] == 1


def test_one_replica_can_still_be_evicted() -> None:
    _, documents = make(replicas=1)
    kinds = by_kind(documents)
    assert kinds["HorizontalPodAutoscaler"]["spec"]["maxReplicas"] >= 2
    assert kinds["PodDisruptionBudget"]["spec"] == {
        "maxUnavailable": 1,
        "selector": kinds["Deployment"]["spec"]["selector"],
    }


def test_default_command_line() -> None:
    _, documents = make()
    container = pod_container(documents)
    assert container["command"] == ["microsvc", "run"]
    assert container["args"] == ["shop.wsgi:app", "--bind", "0.0.0.0:8000", "--workers", "auto"]
    _, documents = make(app=None, port=8080)
    assert pod_container(documents)["args"] == ["--bind", "0.0.0.0:8080", "--workers", "auto"]


def test_non_default_options_are_on_the_command_line() -> None:
    _, documents = make(
        {
            "worker_class": "gevent",
            "drain_period": "10s",
            "graceful_timeout": "20",
            "max_requests": "500",
            "health_path": "off",
            "preload": True,
            "memory_per_worker": "256MiB",
        }
    )
    args = pod_container(documents)["args"]
    flags = [arg for arg in args if arg.startswith("--")]
    pairs = {flag: args[args.index(flag) + 1] for flag in flags}
    assert pairs["--worker-class"] == "gevent"
    assert pairs["--drain-period"] == "10s"
    assert pairs["--graceful-timeout"] == "20"
    assert pairs["--max-requests"] == "500"
    assert pairs["--health-path"] == "off"
    assert pairs["--memory-per-worker"] == "256MiB"
    assert "--preload" in args
    assert "--ready-path" not in args  # still the default
    assert "--timeout" not in args


def test_the_bind_given_is_replaced_by_the_pod_port() -> None:
    _, documents = make({"bind": "127.0.0.1:5000"}, port=8000)
    args = pod_container(documents)["args"]
    assert args.count("--bind") == 1
    assert args[args.index("--bind") + 1] == "0.0.0.0:8000"


def test_metrics_on_loopback_are_served_to_the_pod_network_and_announced() -> None:
    _, documents = make({"metrics": True})
    container = pod_container(documents)
    args = container["args"]
    assert args[args.index("--metrics-bind") + 1] == "0.0.0.0:9191"
    assert "--metrics" in args
    assert {"name": "metrics", "containerPort": 9191, "protocol": "TCP"} in container["ports"]
    template = by_kind(documents)["Deployment"]["spec"]["template"]["metadata"]
    assert template["annotations"] == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9191",
        "prometheus.io/path": "/metrics",
    }
    # The Service exposes the app only: metrics are scraped from the pods.
    assert [port["name"] for port in by_kind(documents)["Service"]["spec"]["ports"]] == ["http"]


def test_a_chosen_metrics_address_is_kept_and_no_metrics_means_no_port() -> None:
    _, documents = make({"metrics": True, "metrics_bind": "10.1.2.3:9300"})
    container = pod_container(documents)
    assert container["args"][container["args"].index("--metrics-bind") + 1] == "10.1.2.3:9300"
    assert container["ports"][-1]["containerPort"] == 9300
    _, documents = make({})
    assert [port["name"] for port in pod_container(documents)["ports"]] == ["http"]
    template = by_kind(documents)["Deployment"]["spec"]["template"]["metadata"]
    assert "annotations" not in template


@pytest.mark.parametrize(("options", "replicas"), COMBINATIONS)
def test_the_command_line_reads_back_to_the_same_settings(
    options: dict[str, Any], replicas: int
) -> None:
    settings, documents = make(options, replicas=replicas)
    args = pod_container(documents)["args"]
    read_back = plan_settings(args)
    for spec in OPTIONS:
        if spec.name == "bind":
            assert read_back["bind"] == ["0.0.0.0:8000"]
            continue
        assert read_back[spec.name] == as_json(getattr(settings, spec.name)), spec.name
    changed = {name for name in DEFAULTS if getattr(settings, name) != DEFAULTS[name]}
    assert changed >= set(options) - {"bind"}


def test_odd_values_read_back_exactly() -> None:
    """Values the options' own display would round are written out in full."""
    settings, documents = make(
        {"memory_per_worker": "100000001", "max_worker_lifetime": "1234567.25"}
    )
    read_back = plan_settings(pod_container(documents)["args"])
    assert read_back["memory_per_worker"] == settings.memory_per_worker == 100000001
    assert read_back["max_worker_lifetime"] == settings.max_worker_lifetime == 1234567.25


@pytest.mark.parametrize("name", ["a", "shop", "my-shop-2", "x" * 63])
def test_good_names(name: str) -> None:
    _, documents = make(name=name)
    assert all(document["metadata"]["name"] == name for document in documents)


@pytest.mark.parametrize("cpu", ["500m", "2", "1.5", "0.25", "100m", "1000m"])
def test_good_cpu(cpu: str) -> None:
    make(cpu=cpu)


@pytest.mark.parametrize("memory", ["512Mi", "1Gi", "256M", "1G", "1073741824", "1.5Gi", "64Ki"])
def test_good_memory(memory: str) -> None:
    make(memory=memory)


@pytest.mark.parametrize(
    ("argument", "value", "fragment"),
    [
        ("name", "Shop", "--name"),
        ("name", "1shop", "--name"),
        ("name", "shop-", "--name"),
        ("name", "my_shop", "--name"),
        ("name", "", "--name"),
        ("name", "x" * 64, "--name"),
        ("cpu", "abc", "--cpu"),
        ("cpu", "", "--cpu"),
        ("cpu", "0", "--cpu"),
        ("cpu", "-1", "--cpu"),
        ("cpu", "1 ", "--cpu"),
        ("cpu", "1Gi", "--cpu"),
        ("memory", "lots", "--memory"),
        ("memory", "512MiB", "--memory"),
        ("memory", "512mi", "--memory"),
        ("memory", "0", "--memory"),
        ("memory", "", "--memory"),
        ("image", "", "--image"),
        ("image", "my image", "--image"),
        ("replicas", 0, "--replicas"),
        ("port", 0, "--port"),
        ("port", 70000, "--port"),
    ],
)
def test_bad_input_is_a_usage_error(argument: str, value: Any, fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment) as caught:
        make(**{argument: value})
    assert "\n" not in str(caught.value)


def test_yaml_strings_are_quoted_safely() -> None:
    tricky = ["yes", "no", "on", "null", "~", "1", "0x10", "1e3", "", "a: b", "- x", "#c", "'\""]
    tricky += [
        "Yes",
        "NULL",
        "Off",
        "y",
        "a.b/c-d_e",
        "line\nbreak",
        "tab\there",
        "ünïcode",
        "{}",
        "[a]",
        "&anchor",
        "*alias",
        "!tag",
    ]
    document: dict[str, Any] = {
        "list": tricky,
        "map": {value: value for value in tricky},
        "empty": {},
    }
    document |= {"none": [], "flags": [True, False], "numbers": [0, -1, 65535]}
    assert yaml.safe_load(to_yaml([document])) == document
    nested = {"items": [{"a": {"b": [{"c": "d", "e": [1]}]}, "f": "g"}]}
    assert yaml.safe_load(to_yaml([nested])) == nested


#: Strings that some YAML reader takes for something else when unquoted: YAML 1.1
#: booleans and numbers, YAML 1.2 numbers, Go's (kubectl's) y/n booleans, indicators.
MISREAD = ["on", "Off", "yes", "y", "N", "true", "null", "~", "1", "1.0", "1e3", "-2E-1"]
MISREAD += [".5", "0o17", "0x1F", "1_000", "2026-11-28", "*", "&a", "!t", "", " x", "a: b"]


@pytest.mark.parametrize("value", MISREAD)
def test_strings_a_yaml_reader_would_misread_are_quoted(value: str) -> None:
    line = to_yaml([{"k": value}]).splitlines()[1]
    assert line[len("k: ")] in "'\"", line
    assert yaml.safe_load(to_yaml([{"k": value}])) == {"k": value}


@pytest.mark.parametrize(
    "value", ["Deployment", "apps/v1", "500m", "1Gi", "0.0.0.0:8000", "--bind"]
)
def test_plain_strings_are_not_quoted(value: str) -> None:
    assert to_yaml([{"k": value}]) == f"---\nk: {value}\n"


def test_the_style_is_kubectls() -> None:
    """Block style, keys in the order written, lists at their key's indentation, one
    line per string, no anchors for values used twice."""
    text = render(
        name="shop",
        image="registry.example.com/shop:1.2.3",
        replicas=2,
        cpu="1",
        memory="512Mi",
        port=8000,
        settings=settings_of(),
        app="shop.wsgi:app",
    )
    assert text.startswith("---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: shop\n")
    assert "\n      containers:\n      - name: shop\n        image: registry.example.com/" in text
    assert (
        "        args:\n        - shop.wsgi:app\n        - --bind\n        - 0.0.0.0:8000\n" in text
    )
    assert '        - name: PYTHONUNBUFFERED\n          value: "1"\n' in text
    assert '            cpu: "1"\n            memory: 512Mi\n' in text
    assert "&id" not in text and "*id" not in text and "{" not in text
    shared = {"a": 1}
    assert to_yaml([{"first": shared, "second": shared}]) == (
        "---\nfirst:\n  a: 1\nsecond:\n  a: 1\n"
    )
    long = "x" * 300
    assert to_yaml([{"k": f"{long} {long}"}]) == f"---\nk: {long} {long}\n"


RECORDED = Path(__file__).resolve().parents[1] / "data" / "manifests"


@pytest.mark.parametrize(("options", "replicas"), COMBINATIONS)
def test_the_content_is_the_recorded_one(
    request: pytest.FixtureRequest, options: dict[str, Any], replicas: int
) -> None:
    """tests/data/manifests/ID.yaml: the output for these options when every string was
    written JSON-quoted; the same data now, except that the probes give the container
    port by number instead of by its name `http`."""
    case = request.node.callspec.id
    recorded = list(yaml.safe_load_all((RECORDED / f"{case}.yaml").read_text()))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        container = pod_container(recorded)
        if probe in container:
            assert container[probe]["httpGet"]["port"] == "http"
            container[probe]["httpGet"]["port"] = container["ports"][0]["containerPort"]
    text = render(
        name="shop",
        image="registry.example.com/shop:1.2.3",
        replicas=replicas,
        cpu="500m",
        memory="1Gi",
        port=8000,
        settings=settings_of(**options),
        app="shop.wsgi:create_app()",
    )
    assert list(yaml.safe_load_all(text)) == recorded


# kubernetes-validate


def validator() -> list[str]:
    executable = Path(sys.executable).with_name("kubernetes-validate")
    if executable.exists():
        return [str(executable)]
    found = shutil.which("kubernetes-validate")
    if found is None:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    return [found]


def kubernetes_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*validator(), "--strict", "-k", KUBERNETES_VERSION, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(("options", "replicas"), COMBINATIONS)
def test_kubernetes_validate_strict(tmp_path: Path, options: dict[str, Any], replicas: int) -> None:
    settings = settings_of(**options)
    path = tmp_path / "manifest.yaml"
    path.write_text(
        render(
            name="shop",
            image="registry.example.com/shop:1.2.3",
            replicas=replicas,
            cpu="500m",
            memory="1Gi",
            port=8000,
            settings=settings,
            app="shop.wsgi:create_app()",
        )
    )
    done = kubernetes_validate(path)
    detail = f"{done.stdout}{done.stderr}"
    assert done.returncode == 0, detail
    assert detail.count("passed") == 4, detail


def test_kubernetes_validate_strict_catches_a_stray_field(tmp_path: Path) -> None:
    """The check above means something: an unknown field fails."""
    _, documents = make()
    documents[0]["spec"]["template"]["spec"]["containers"][0]["bogusField"] = "x"
    path = tmp_path / "manifest.yaml"
    path.write_text(to_yaml(documents))
    done = kubernetes_validate(path)
    assert done.returncode != 0, f"{done.stdout}{done.stderr}"


# --hpa: an autoscaler on microsvc's own signals


@pytest.mark.parametrize(
    ("hpa", "metric", "average"),
    [
        ("busy-ratio", "microsvc_workers_busy_ratio", "700m"),
        ("queue-time", "microsvc_http_request_queue_seconds_average", "100m"),
    ],
)
def test_autoscaler_on_a_pod_metric(tmp_path: Path, hpa: str, metric: str, average: str) -> None:
    _, documents = make({"metrics": True}, hpa=hpa)
    spec = by_kind(documents)["HorizontalPodAutoscaler"]["spec"]
    assert spec["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": metric},
                "target": {"type": "AverageValue", "averageValue": average},
            },
        }
    ]
    assert spec["minReplicas"] == 2 and spec["maxReplicas"] == 8
    path = tmp_path / "manifest.yaml"
    path.write_text(to_yaml(documents))
    done = kubernetes_validate(path)
    detail = f"{done.stdout}{done.stderr}"
    assert done.returncode == 0, detail
    assert detail.count("passed") == 4, detail


def test_autoscaler_on_cpu_is_the_default() -> None:
    _, documents = make()
    [metric] = by_kind(documents)["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_a_metrics_signal_needs_metrics_and_a_known_name() -> None:
    with pytest.raises(
        UsageError, match="--hpa busy-ratio reads microsvc's metrics: add --metrics"
    ):
        make(hpa="busy-ratio")
    with pytest.raises(UsageError, match="--hpa: 'memory' is not one of"):
        make({"metrics": True}, hpa="memory")
