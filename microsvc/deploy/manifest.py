"""Kubernetes manifests for `microsvc manifest`: a Deployment, a Service, a
HorizontalPodAutoscaler and a PodDisruptionBudget that run one app with given settings.
The autoscaler follows CPU, or (`hpa`) microsvc's busy ratio or queue time through the
Prometheus adapter.

The container runs `microsvc run APP --bind 0.0.0.0:PORT --workers auto` plus every
option whose value differs from its default, derived from the option registry, so the
pod serves with exactly the settings `microsvc plan` shows for the same command line.
CPU and memory requests equal their limits: the CPU quota and the memory limit are
what `--workers auto` plans from.

The YAML is written by PyYAML's safe dumper in the style kubectl prints.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from microsvc.config.options import DEFAULTS, OPTIONS, OPTIONS_BY_NAME, OptionSpec, Settings
from microsvc.config.values import split_bind
from microsvc.errors import UsageError

#: Options the manifest sets itself rather than copying from the settings.
OWN_OPTIONS = ("bind", "workers")

#: The numeric user and group the container runs as (the project's image uses 10001).
RUN_AS = 10001

#: Seconds Kubernetes waits past drain period + graceful timeout before SIGKILL.
GRACE_MARGIN = 5

#: A DNS-1035 label: valid as the name of every object made here, Services included.
_NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
#: CPU: whole or fractional cores (2, 1.5, 0.5) or millicores (500m).
_CPU_RE = re.compile(r"(\d+(\.\d*)?|\.\d+)m?")
#: Memory: bytes, or a binary (Ki..Ei) or decimal (k..E) suffix.
_MEMORY_RE = re.compile(r"(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")


def render(
    *,
    name: str,
    image: str,
    replicas: int,
    cpu: str,
    memory: str,
    port: int,
    settings: Settings,
    app: str | None,
    hpa: str = "cpu",
) -> str:
    """The manifests as one multi-document YAML text; UsageError for bad input. `hpa`:
    what the HorizontalPodAutoscaler follows, one of `HPA_SIGNALS`."""
    check_name(name)
    check_image(image)
    check_cpu(cpu)
    check_memory(memory)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise UsageError(f"--replicas: {replicas!r} is not an integer >= 1")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise UsageError(f"--port: {port!r} is not a port from 1 to 65535")
    if hpa not in HPA_SIGNALS:
        raise UsageError(f"--hpa: {hpa!r} is not one of {', '.join(HPA_SIGNALS)}")
    if hpa != "cpu" and not settings.metrics:
        raise UsageError(f"--hpa {hpa} reads microsvc's metrics: add --metrics")
    settings = pod_settings(settings)
    documents = [
        deployment(name, image, replicas, cpu, memory, port, settings, app),
        service(name),
        autoscaler(name, replicas) if hpa == "cpu" else signal_autoscaler(name, replicas, hpa),
        disruption_budget(name),
    ]
    return to_yaml(documents)


# Checks


def check_name(name: str) -> None:
    if len(name) > 63 or not _NAME_RE.fullmatch(name):
        raise UsageError(
            f"--name: {name!r} is not a DNS label (lowercase letters, digits and '-', "
            "starting with a letter, at most 63 characters)"
        )


def check_image(image: str) -> None:
    if not image or any(c.isspace() for c in image):
        raise UsageError(f"--image: {image!r} is not a container image reference")


def check_cpu(cpu: str) -> None:
    if not _CPU_RE.fullmatch(cpu) or _number(cpu.rstrip("m")) <= 0:
        raise UsageError(f"--cpu: {cpu!r} is not a CPU quantity above zero such as 500m, 1 or 1.5")


def check_memory(memory: str) -> None:
    match = _MEMORY_RE.fullmatch(memory)
    if not match or _number(match.group(1)) <= 0:
        raise UsageError(
            f"--memory: {memory!r} is not a memory quantity above zero such as 512Mi or 1Gi"
        )


def pod_settings(settings: Settings) -> Settings:
    """The settings as the pod runs them: a loopback --metrics-bind (the default) cannot
    be scraped from outside the pod, so the pod serves metrics on all its addresses, on
    the same port."""
    if not settings.metrics:
        return settings
    address = split_bind(settings.metrics_bind)
    assert address is not None
    host, port = address
    if host == "localhost" or _is_loopback(host):
        return dataclasses.replace(settings, metrics_bind=f"0.0.0.0:{port}")
    return settings


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_port(settings: Settings) -> int | None:
    address = split_bind(settings.metrics_bind) if settings.metrics else None
    return None if address is None else address[1]


def _number(text: str) -> float:
    return float(text) if text not in ("", ".") else 0.0


# The container's command line


def run_args(settings: Settings, port: int, app: str | None) -> list[str]:
    """Arguments of `microsvc run` for these settings (APP first when given)."""
    args = [app] if app else []
    workers = _show(OPTIONS_BY_NAME["workers"], settings.workers)
    args += ["--bind", f"0.0.0.0:{port}", "--workers", workers]
    for spec in OPTIONS:
        if spec.name in OWN_OPTIONS:
            continue
        value = getattr(settings, spec.name)
        if value == DEFAULTS[spec.name]:
            continue
        args += option_args(spec, value)
    return args


def option_args(spec: OptionSpec, value: Any) -> list[str]:
    """The command-line words that give option `spec` the value `value`."""
    if spec.is_flag:
        return [spec.flag if value else "--no-" + spec.flag[2:]]
    if spec.multiple:
        return [word for item in value for word in (spec.flag, _show(spec, item))]
    return [spec.flag, _show(spec, value)]


def _show(spec: OptionSpec, value: Any) -> str:
    """The option's own formatting when it reads back to the same value, else str()."""
    if value is None:
        return "off"
    text = spec.show(value)
    try:
        same = spec.parse(text) == value
    except ValueError:
        same = False
    return text if same else str(value)


# The objects


def labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "server",
        "app.kubernetes.io/managed-by": "microsvc",
    }


def selector(name: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": name}


def metadata(name: str) -> dict[str, Any]:
    return {"name": name, "labels": labels(name)}


def grace_period(settings: Settings) -> int:
    """Seconds from TERM to KILL: longer than microsvc's drain plus graceful shutdown."""
    return math.ceil(settings.drain_period + settings.graceful_timeout) + GRACE_MARGIN


def probes(settings: Settings, port: int) -> dict[str, Any]:
    """The probes, on the container's port by number: Kubernetes also takes the port's
    name, but `podman kube play` turns a named port into a health check on port 0."""
    result: dict[str, Any] = {}
    if settings.health_path:
        check = {"httpGet": {"path": settings.health_path, "port": port}}
        # Generous while the app imports; then a few missed checks restart the container.
        result["startupProbe"] = {**check, "periodSeconds": 2, "failureThreshold": 30}
        result["livenessProbe"] = {
            **check,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        }
    if settings.ready_path:
        result["readinessProbe"] = {
            "httpGet": {"path": settings.ready_path, "port": port},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        }
    return result


def container(
    name: str, image: str, cpu: str, memory: str, port: int, settings: Settings, app: str | None
) -> dict[str, Any]:
    ports = [{"name": "http", "containerPort": port, "protocol": "TCP"}]
    scrape_port = metrics_port(settings)
    if scrape_port is not None:
        ports.append({"name": "metrics", "containerPort": scrape_port, "protocol": "TCP"})
    return {
        "name": name,
        "image": image,
        "command": ["microsvc", "run"],
        "args": run_args(settings, port, app),
        "ports": ports,
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            # The root filesystem is read-only: the control socket goes to /tmp.
            {"name": "XDG_RUNTIME_DIR", "value": "/tmp"},
        ],
        "resources": {
            "requests": {"cpu": cpu, "memory": memory},
            "limits": {"cpu": cpu, "memory": memory},
        },
        **probes(settings, port),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }


def template_metadata(name: str, settings: Settings) -> dict[str, Any]:
    """The pod's labels, and with --metrics the annotations common Prometheus
    configurations discover scrape targets by."""
    result: dict[str, Any] = {"labels": labels(name)}
    scrape_port = metrics_port(settings)
    if scrape_port is not None:
        result["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(scrape_port),
            "prometheus.io/path": "/metrics",
        }
    return result


def deployment(
    name: str,
    image: str,
    replicas: int,
    cpu: str,
    memory: str,
    port: int,
    settings: Settings,
    app: str | None,
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(name)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": template_metadata(name, settings),
                "spec": {
                    # No SERVICE_* variables: a Service called microsvc would otherwise
                    # put MICROSVC_* variables into the environment microsvc reads.
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    # microsvc drains itself on TERM (no preStop hook needed).
                    "terminationGracePeriodSeconds": grace_period(settings),
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": RUN_AS,
                        "runAsGroup": RUN_AS,
                        "fsGroup": RUN_AS,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container(name, image, cpu, memory, port, settings, app)],
                    # gunicorn needs a writable temporary directory; the heartbeat files
                    # live in /dev/shm, which Kubernetes provides.
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(name),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def autoscaler(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas,
            "maxReplicas": max(replicas * 4, replicas + 1),
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 70},
                    },
                }
            ],
        },
    }


#: What the HorizontalPodAutoscaler can follow: CPU, or a signal of microsvc's metrics
#: served to Kubernetes' custom metrics API by the Prometheus adapter (docs/overload.md
#: has its rules).
HPA_SIGNALS = ("cpu", "busy-ratio", "queue-time")
#: The pod metric each signal reads, and the average per pod the autoscaler keeps.
HPA_TARGETS = {
    "busy-ratio": ("microsvc_workers_busy_ratio", "700m"),  # 0.7 of the workers busy
    "queue-time": ("microsvc_http_request_queue_seconds_average", "100m"),  # 100 ms
}


def signal_autoscaler(name: str, replicas: int, signal: str) -> dict[str, Any]:
    """A HorizontalPodAutoscaler that follows a pod metric of microsvc's (`HPA_TARGETS`)
    rather than CPU: CPU is the wrong signal for gevent workers and I/O-bound sync
    workers, which are full long before their CPU is."""
    metric, average = HPA_TARGETS[signal]
    document = autoscaler(name, replicas)
    document["spec"]["metrics"] = [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": metric},
                "target": {"type": "AverageValue", "averageValue": average},
            },
        }
    ]
    return document


def disruption_budget(name: str) -> dict[str, Any]:
    # maxUnavailable rather than minAvailable: it follows the autoscaler, and one
    # replica alone never blocks a node drain.
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(name)}},
    }


# YAML

#: Long strings stay on one line.
_NO_WRAP = 1 << 30


class _Dumper(yaml.SafeDumper):
    """safe_dump's dumper, closer to what kubectl prints: no anchors and aliases (a dict
    used twice is written twice), double quotes where quotes are needed, and strings that
    YAML 1.2 or Go's YAML reader (kubectl's) would read as a number or a boolean quoted
    as well as those YAML 1.1 would (`on`, `1.0` and also `y`, `1e3`, `0o17`)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def choose_scalar_style(self) -> str:
        style = super().choose_scalar_style()
        return '"' if style == "'" else style


#: Read as a boolean by Go's YAML reader, as a string by YAML 1.1's safe_load.
_Dumper.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
#: Numbers in YAML 1.2's core schema that YAML 1.1 reads as strings (1e3, 0o17).
_Dumper.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|0o[0-7]+)$"),
    list("-+.0123456789"),
)


def to_yaml(documents: Iterable[Mapping[str, Any]]) -> str:
    """Documents as kubectl prints them: block style, keys in the order given, `---`
    before each document, strings quoted only where a YAML reader would misread them."""
    text: str = yaml.dump_all(
        documents,
        Dumper=_Dumper,
        explicit_start=True,
        sort_keys=False,
        allow_unicode=True,
        width=_NO_WRAP,
    )
    return text
