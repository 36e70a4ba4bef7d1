"""The built distributions: what the sdist and the wheel carry, and that the wheel installs.

The sdist is built from a copy of the source tree with setuptools' PEP 517 hooks (what
`python -m build` calls, here in this environment rather than an isolated one, so no
package index is needed), and the wheel from the unpacked sdist, as `python -m build`
does: a file the sdist forgets is missing from the wheel too.

The wheel is installed into a fresh virtualenv whose only other path entry is this
environment's site-packages, with `pip install --no-index`: pip must find every
dependency the wheel declares already installed there (the versions the suite runs
with), and `microsvc --version` must run from the new virtualenv. That takes about two
seconds and works offline; a virtualenv that gets the dependencies from an index needs
the index (and took 13 s from one on local disk).
"""

from __future__ import annotations

import configparser
import email.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import pytest

from microsvc.http.build import COMPILED_MODULES

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
#: What a checkout holds besides its files: left out of the copy that is built.
GENERATED = (
    ".git",
    ".venv",
    ".venvs",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*_cache",
    "*.so",
)

#: What the build hooks are called with: print the file name the hook returns.
BUILD_HOOK = (
    "import sys\n"
    "from setuptools import build_meta\n"
    "print(getattr(build_meta, sys.argv[1])(sys.argv[2]))\n"
)


@dataclass
class Built:
    sdist: Path
    wheel: Path
    build_output: str


def _run_hook(hook: str, source: Path, out: Path) -> tuple[Path, str]:
    done = subprocess.run(
        [sys.executable, "-c", BUILD_HOOK, hook, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"{hook} failed:\n{done.stdout}\n{done.stderr}"
    name = done.stdout.strip().splitlines()[-1]
    return out / name, done.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (scripts/env-setup installs it)")
    out = tmp_path_factory.mktemp("dist")
    # A copy of the checkout: building writes into its source directory.
    checkout = tmp_path_factory.mktemp("checkout") / "microsvc"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(*GENERATED), symlinks=True)
    sdist, sdist_log = _run_hook("build_sdist", checkout, out)
    unpacked = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as archive:
        archive.extractall(unpacked, filter="data")
    (source,) = unpacked.iterdir()
    wheel, wheel_log = _run_hook("build_wheel", source, out)
    return Built(sdist, wheel, sdist_log + wheel_log)


def wheel_metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def classifier_versions() -> list[str]:
    """The `Programming Language :: Python :: 3.N` classifiers of setup.cfg."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    classifiers = config["metadata"]["classifiers"].split("\n")
    return [
        match.group(1)
        for line in classifiers
        if (match := re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", line.strip()))
    ]


def test_the_build_gives_no_deprecation_warning(built: Built) -> None:
    # setuptools announces what will stop building as deprecations, months ahead.
    assert "Deprecat" not in built.build_output, built.build_output


def test_wheel_carries_the_package_its_types_and_the_license_and_no_tests(built: Built) -> None:
    with zipfile.ZipFile(built.wheel) as archive:
        names = archive.namelist()
        (license_name,) = [
            n for n in names if re.fullmatch(r"[^/]+\.dist-info/licenses/LICENSE", n)
        ]
        license_text = archive.read(license_name).decode()
    assert "microsvc/__init__.py" in names
    assert "microsvc/py.typed" in names
    assert "microsvc/workers/gevent.py" in names
    assert "microsvc/metrics/exporter.py" in names
    assert license_text == (ROOT / "LICENSE").read_text()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"microsvc", "-".join(built.wheel.name.split("-")[:2]) + ".dist-info"}, tops
    # The request path: its sources always, compiled modules for all of it or none of it.
    http = {name.split("/")[-1].split(".")[0] for name in names if name.startswith("microsvc/")}
    compiled = {
        name.split("/")[-1].split(".")[0]
        for name in names
        if name.startswith("microsvc/http/") and name.endswith(".so")
    }
    assert set(COMPILED_MODULES) <= http
    assert compiled in (set(), {*COMPILED_MODULES, "_native__mypyc"}), compiled


def test_sdist_carries_the_sources_and_the_license_and_no_tests(built: Built) -> None:
    with tarfile.open(built.sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for expected in ("LICENSE", "README.md", "setup.cfg", "pyproject.toml", "microsvc/py.typed"):
        assert expected in names, sorted(names)
    packaged = {p.relative_to(ROOT).as_posix() for p in (ROOT / "microsvc").rglob("*.py")}
    assert packaged <= names, sorted(packaged - names)
    assert not [name for name in names if name.startswith(("tests/", "scripts/", "docs/"))]


def test_wheel_metadata_states_the_license_and_the_tested_pythons(built: Built) -> None:
    metadata = wheel_metadata(built.wheel)
    assert metadata["License"] == "MIT"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert metadata["Requires-Python"] == ">=3.10"
    classifiers = metadata.get_all("Classifier") or []
    versions = classifier_versions()
    assert versions == ["3.10", "3.11", "3.12", "3.13"]
    for version in versions:
        assert f"Programming Language :: Python :: {version}" in classifiers


def test_classifiers_start_at_python_requires_and_include_the_docker_python() -> None:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    versions = classifier_versions()
    assert config["options"]["python_requires"] == f">={versions[0]}"
    minors = [int(version.split(".")[1]) for version in versions]
    assert minors == list(range(minors[0], minors[0] + len(minors))), versions
    base = re.search(r"^FROM python:(3\.\d+)-", (ROOT / "Dockerfile").read_text(), re.M)
    assert base is not None and base.group(1) in versions


def test_the_wheel_installs_into_a_fresh_virtualenv_and_runs(built: Built, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # This environment's packages, after the virtualenv's own: the dependencies.
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site) / "under_test_dependencies.pth").write_text("\n".join(ours) + "\n")
    install = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install"),
            *("--no-index", "--no-cache-dir", "--disable-pip-version-check", str(built.wheel)),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert install.returncode == 0, f"{install.stdout}\n{install.stderr}"

    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}

    def installed(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    def python_says(code: str) -> str:
        done = installed(str(python), "-c", code)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    version = installed(str(venv / "bin" / "microsvc"), "--version")
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"microsvc, version \d+\.\d+\.\d+\S*\n", version.stdout), version.stdout

    where = python_says("import microsvc, gunicorn; print(microsvc.__file__)")
    assert Path(where).is_relative_to(venv), where
    # The installed wheel runs the build it carries (pip writes each .py after its .so).
    build = python_says("import microsvc.http as h; print(h.BUILD.describe())")
    with zipfile.ZipFile(built.wheel) as archive:
        compiled = any(name.endswith(".so") for name in archive.namelist())
    assert build == ("compiled" if compiled else "Python: not compiled (see setup.py)"), build
