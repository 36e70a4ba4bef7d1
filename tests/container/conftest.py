"""The container tier: the repository's Dockerfile built and run by podman, under limits
the kernel enforces (CPU quota, cpuset, memory limit), and `microsvc manifest` output run
as a pod by `podman kube play`.

No image registry is needed: `scripts/container-base` makes the Dockerfile's FROM image
locally (debootstrap) and podman keeps it between runs, keyed by a hash of its recipe.
The Dockerfile is built unchanged, once per session, under a tag of the session's own;
the tests run containers from it with `--pull=never`. podman reads the settings in
`containers.conf` next to this file (runc, cgroupfs, no systemd).

Every container and pod a test starts carries the session's label and is removed at
the end of the session, and the built image with them; only the base image stays.

Without podman (or root, or a working runtime) the whole tier is skipped with one
reason. Figures (build time, the plan inside a container, the OOM case) are printed
as they are measured and again at the end of the run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from podmanlib import (
    APPS,
    APPS_MOUNT,
    FIGURES,
    ROOT,
    SESSION_PREFIX,
    TEST_IMAGE,
    Container,
    Podman,
    figure,
    podman_env,
    podman_problem,
)

HERE = Path(__file__).resolve().parent


#: Per test, with the session's fixtures: the first test also makes the base image
#: (about a minute when it is not cached) and builds the Dockerfile.
TEST_TIMEOUT = 900


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.container)
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT))


#: The name of a figure line among a test's `user_properties` (tests/conftest.py prints
#: them at the end of the run).
FIGURE = "container figures"


@pytest.fixture(autouse=True)
def _figures_in_reports(request: pytest.FixtureRequest) -> Iterator[None]:
    """Hand the figures measured since the last test (this test's and the session
    fixtures' it set up) to this test's report, which reaches the process that prints the
    summary, pytest-xdist's controller too."""
    yield
    while FIGURES:
        request.node.user_properties.append((FIGURE, FIGURES.pop(0)))


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """podman, or the whole tier skipped with the reason it cannot run here."""
    problem = podman_problem()
    if problem is not None:
        pytest.skip(f"container tier: {problem}")
    session = f"{SESSION_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    runner = Podman(tmp_path_factory.mktemp("podman"), session)
    runner.remove_dead_sessions()
    yield runner
    runner.remove_session_objects()


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    """The Dockerfile's FROM image, made locally once and kept between runs."""
    started = time.monotonic()
    done = subprocess.run(
        [str(ROOT / "scripts" / "container-base")],
        cwd=ROOT,
        env=podman_env(),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"scripts/container-base failed ({done.returncode}):\n{done.stderr[-4000:]}")
    name = done.stdout.strip().splitlines()[-1]
    made = "made" if "Making" in done.stderr else "cached"
    figure(f"base image {name}: {made} in {time.monotonic() - started:.1f} s")
    return name


@pytest.fixture(scope="session")
def image(podman: Podman, base_image: str) -> Iterator[str]:
    """The repository's Dockerfile, unchanged, built on the local base image.

    pip inside the build reaches the package index through the host's network and trusts
    the host's CA bundle (mounted for the build only, not part of the image); the image
    is built in Docker's format, which keeps the HEALTHCHECK (OCI has none)."""
    tag = f"{TEST_IMAGE}:{podman.session}"
    ca_bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    mounts = ["-v", f"{ca_bundle}:{ca_bundle}:ro"] if ca_bundle.is_file() else []
    done = podman(
        "build",
        "--pull=never",
        "--format",
        "docker",
        "--layers=false",
        "--network",
        "host",
        *mounts,
        "-f",
        str(ROOT / "Dockerfile"),
        "-t",
        tag,
        str(ROOT),
    )
    figure(f"podman build of the Dockerfile: {done.seconds:.1f} s")
    yield tag
    podman.remove_session_objects()
    podman("rmi", "-f", tag, check=False)


@pytest.fixture
def run_container(
    podman: Podman, image: str, free_port: Callable[[], int]
) -> Iterator[Callable[..., Container]]:
    """`run_container(podman_run_args, command=())` starts a container from the image with
    its port 8000 published on a free loopback port, the test apps mounted at /app/apps,
    and waits until /healthz answers (wait=False to skip); removed at teardown."""
    started: list[str] = []

    def start(
        args: Sequence[str] = (), command: Sequence[str] = (), *, wait: bool = True
    ) -> Container:
        name = podman.name("run")
        port = free_port()
        podman(
            "run",
            "-d",
            "--pull=never",
            "--name",
            name,
            "--label",
            podman.label,
            "--network",
            "slirp4netns",
            "-p",
            f"127.0.0.1:{port}:8000",
            "-v",
            f"{APPS}:{APPS_MOUNT}:ro",
            *args,
            image,
            *command,
        )
        started.append(name)
        container = Container(name, f"http://127.0.0.1:{port}", podman)
        if wait:
            container.wait_ready()
        return container

    yield start
    for name in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            podman("rm", "-f", "-t", "0", name, check=False, timeout=60)
