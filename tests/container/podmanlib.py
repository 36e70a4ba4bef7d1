"""podman for the container tier: the runner, a running container, and the figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CONTAINERS_CONF = HERE / "containers.conf"
#: Small WSGI apps the tests mount into containers (the image stays the Dockerfile's).
APPS = HERE / "apps"
#: Where APPS is mounted: under the image's WORKDIR, so `apps.NAME:app` imports.
APPS_MOUNT = "/app/apps"
#: The label every container this session starts carries (kube play's pods have none:
#: their names start with the session's).
LABEL = "microsvc.test-session"
#: Sessions are named PREFIX-PID-RANDOM, so a later session can tell a dead one's leftovers.
SESSION_PREFIX = "msvc-ct"
#: The repository of the images the sessions build (tagged with the session's name).
TEST_IMAGE = "localhost/microsvc-test"

#: How long one podman command may take (a build downloads the dependencies).
PODMAN_TIMEOUT = 300.0
#: How long a container may take to answer HTTP after it starts.
START_DEADLINE = 60.0


def podman_env() -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONTAINERS_CONF)
    return env


def podman_problem() -> str | None:
    """Why podman cannot run containers here, or None when it can."""
    podman = shutil.which("podman")
    if podman is None:
        return "podman is not installed (scripts/system-deps installs podman, runc, debootstrap)"
    if os.geteuid() != 0:
        return "the container tier runs podman as root (cgroup limits, debootstrap)"
    for tool in ("runc", "debootstrap"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).is_file():
            return f"{tool} is not installed (scripts/system-deps installs it)"
    try:
        done = subprocess.run(
            [podman, "info", "--format", "{{.Host.OCIRuntime.Name}}"],
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"podman info failed: {error}"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        return f"podman info failed: {lines[-1]}"
    return None


@dataclass
class Done:
    """What one podman command did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\nexit {self.returncode} after {self.seconds:.1f} s\n"
            f"stdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"
        )


class Podman:
    """podman with this tier's settings, run from a scratch directory (conmon leaves an
    `oom` file in the current directory when the kernel kills a container's process)."""

    def __init__(self, workdir: Path, session: str) -> None:
        self.workdir = workdir
        self.session = session
        self.label = f"{LABEL}={session}"

    def __call__(self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT) -> Done:
        argv = ["podman", *args]
        started = time.monotonic()
        proc = subprocess.run(
            argv,
            cwd=self.workdir,
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        done = Done(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
        if check and done.returncode != 0:
            pytest.fail(f"podman failed:\n{done.describe()}")
        return done

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["podman", *args],
            cwd=self.workdir,
            env=podman_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def name(self, what: str) -> str:
        """A container or pod name unique to this session."""
        return f"{self.session}-{what}-{uuid.uuid4().hex[:6]}"

    def inspect(self, container: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self("inspect", container).stdout)
        return data[0]

    def logs(self, container: str) -> str:
        done = self("logs", container, check=False)
        return done.stdout + done.stderr

    def exec_json(self, container: str, *command: str) -> Any:
        return json.loads(self("exec", container, *command).stdout)

    def remove_dead_sessions(self) -> None:
        """Remove pods, containers and images that sessions no longer running left behind
        (a run killed before its teardown)."""

        def dead(name: str) -> bool:
            match = re.match(rf"{SESSION_PREFIX}-(\d+)-", name)
            return match is not None and not psutil.pid_exists(int(match.group(1)))

        pods = self("pod", "ps", "--format", "{{.Name}}", check=False).stdout.split()
        for pod in filter(dead, pods):
            self("pod", "rm", "-f", "-t", "0", pod, check=False)
        containers = self(
            "ps", "-a", "--filter", f"label={LABEL}",
            "--format", f'{{{{.ID}}}} {{{{index .Labels "{LABEL}"}}}}', check=False,
        ).stdout.splitlines()  # fmt: skip
        for line in containers:
            container, _, session = line.partition(" ")
            if dead(session + "-"):
                self("rm", "-f", "-t", "0", container, check=False)
        images = self("images", "--format", "{{.Tag}}", TEST_IMAGE, check=False).stdout.split()
        for tag in filter(dead, (tag + "-" for tag in images)):
            self("rmi", "-f", f"{TEST_IMAGE}:{tag[:-1]}", check=False)

    def remove_session_objects(self) -> None:
        """Remove every pod and container of this session."""
        pods = self("pod", "ps", "-q", "--filter", f"label={self.label}", check=False)
        for pod in pods.stdout.split():
            self("pod", "rm", "-f", "-t", "0", pod, check=False)
        found = self("ps", "-aq", "--filter", f"label={self.label}", check=False)
        for container in found.stdout.split():
            self("rm", "-f", "-t", "0", container, check=False)


# --- figures -------------------------------------------------------------------------

FIGURES: list[str] = []


def figure(line: str) -> None:
    """A figure of this tier: printed now and again at the end of the run."""
    FIGURES.append(line)
    print(f"FIGURES container: {line}", flush=True)


@dataclass
class Container:
    """A running container: its name and the loopback URL its port is published on."""

    name: str
    url: str
    podman: Podman

    def logs(self) -> str:
        return self.podman.logs(self.name)

    def wait_ready(self, path: str = "/healthz", deadline: float = START_DEADLINE) -> None:
        end = time.monotonic() + deadline
        while True:
            try:
                with requests.get(self.url + path, timeout=3) as answer:
                    if answer.status_code == 200:
                        return
            except requests.RequestException:
                pass
            state = self.podman.inspect(self.name)["State"]
            if not state.get("Running"):
                pytest.fail(f"container {self.name} ended: {state}\n{self.logs()}")
            if time.monotonic() > end:
                pytest.fail(f"no answer on {self.url}{path} in {deadline:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    def wait_log(self, pattern: str, deadline: float = 20.0) -> re.Match[str]:
        """Wait until the container's log matches the regular expression `pattern`."""
        end = time.monotonic() + deadline
        while True:
            match = re.search(pattern, self.logs())
            if match:
                return match
            if time.monotonic() > end:
                pytest.fail(f"no log line matches {pattern!r}:\n{self.logs()}")
            time.sleep(0.2)

    def plan(self, *args: str) -> dict[str, Any]:
        """`microsvc plan --json ARGS` run inside the container."""
        data: dict[str, Any] = self.podman.exec_json(self.name, "microsvc", "plan", "--json", *args)
        return data

    def exit_code(self) -> int:
        return int(self.podman.inspect(self.name)["State"]["ExitCode"])
