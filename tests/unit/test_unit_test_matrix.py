"""scripts/test-matrix: which Pythons it looks for, and what it says when they are missing.

Each run here gets a PATH with only the tools the script uses and an empty pyenv root,
so it finds no interpreter and starts no test run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "test-matrix"
TOOLS = ("bash", "dirname", "sed", "grep", "sort", "ls")


def classifier_versions() -> list[str]:
    text = (ROOT / "setup.cfg").read_text()
    return re.findall(r"^\s*Programming Language :: Python :: (3\.\d+)\s*$", text, re.M)


@pytest.fixture
def bare_path(tmp_path: Path) -> Path:
    """A bin directory with the script's tools and no python3.N."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found is None:
            pytest.skip(f"{tool} is not installed")
        (bin_dir / tool).symlink_to(found)
    return bin_dir


def run_matrix(bin_dir: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    pyenv = tmp_path / "pyenv"
    (pyenv / "versions").mkdir(parents=True, exist_ok=True)
    env = {"PATH": str(bin_dir), "PYENV_ROOT": str(pyenv), "HOME": str(tmp_path)}
    return subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_each_classifier_version_is_looked_for_and_reported_missing(
    bare_path: Path, tmp_path: Path
) -> None:
    done = run_matrix(bare_path, tmp_path)
    versions = classifier_versions()
    assert versions, "setup.cfg names no Python version"
    assert f"Skipped, no interpreter found: {' '.join(versions)}" in done.stderr, done.stderr
    for version in versions:
        assert re.search(rf"^{re.escape(version)}\s+not found\s", done.stderr, re.M), done.stderr
    assert "Error: no Python that setup.cfg names was found, so nothing ran" in done.stderr
    assert done.returncode == 1


def test_a_wrong_version_behind_the_name_is_not_taken(bare_path: Path, tmp_path: Path) -> None:
    # A pyenv shim or a stray link can answer to python3.N and be another version.
    versions = classifier_versions()
    impostor = bare_path / f"python{versions[0]}"
    impostor.write_text("#!/bin/sh\necho 'Python 2.7'\nexit 1\n")
    impostor.chmod(0o755)
    (tmp_path / "pyenv" / "versions" / f"{versions[0]}.0" / "bin").mkdir(parents=True)
    done = run_matrix(bare_path, tmp_path, "--skip", ",".join(versions[1:]))
    assert re.search(rf"^{re.escape(versions[0])}\s+not found\s", done.stderr, re.M), done.stderr
    assert done.returncode == 1


def test_require_all_makes_a_missing_interpreter_a_failure(bare_path: Path, tmp_path: Path) -> None:
    versions = classifier_versions()
    done = run_matrix(bare_path, tmp_path, "--skip", ",".join(versions[1:]), "--require-all")
    assert f"Error: --require-all, and Python {versions[0]} is missing" in done.stderr
    assert done.returncode == 1


def test_skipping_every_version_runs_nothing_and_succeeds(bare_path: Path, tmp_path: Path) -> None:
    done = run_matrix(bare_path, tmp_path, "--skip", ",".join(classifier_versions()))
    assert "skipped (--skip)" in done.stderr
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "args",
    [("--full", "3.9"), ("--skip", "newest,2.7"), ("--full",)],
    ids=["unclaimed-version", "unknown-in-list", "missing-value"],
)
def test_a_bad_option_is_a_usage_error(
    bare_path: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    done = run_matrix(bare_path, tmp_path, *args)
    assert done.returncode == 2, done.stderr
    assert re.fullmatch(r"Error: [^\n]+\n", done.stderr), done.stderr


def test_the_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)
