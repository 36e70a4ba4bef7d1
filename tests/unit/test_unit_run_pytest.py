"""scripts/run-pytest: the options it puts before the user's pytest arguments.

Each run gets a stand-in for Python that prints the arguments pytest would get, one a
line, and answers the script's own question (`-c ...`: the CPUs it may use, or fails as
when pytest-xdist is not installed); so no test run starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "run-pytest"

FAKE_PYTHON = """#!/bin/sh
if [ "$1" = -c ]; then
  [ -n "$FAKE_NO_XDIST" ] && exit 1
  echo "$FAKE_CPUS"
  exit 0
fi
printf '%s\\n' "$@"
exit "${FAKE_EXIT:-0}"
"""


def run(
    tmp_path: Path, *args: str, cpus: int = 2, xdist: bool = True, exit_status: int = 0
) -> subprocess.CompletedProcess[str]:
    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {
        "PATH": os.environ["PATH"],
        "FAKE_CPUS": str(cpus),
        "FAKE_NO_XDIST": "" if xdist else "1",
        "FAKE_EXIT": str(exit_status),
    }
    return subprocess.run(
        [str(SCRIPT), str(python), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def pytest_argv(done: subprocess.CompletedProcess[str]) -> list[str]:
    lines = done.stdout.splitlines()
    assert lines[:2] == ["-m", "pytest"], done.stdout + done.stderr
    return lines[2:]


@pytest.mark.parametrize(("cpus", "workers"), [(1, 2), (2, 4), (3, 6), (16, 8)])
def test_two_workers_per_cpu_at_most_eight_before_the_users_arguments(
    tmp_path: Path, cpus: int, workers: int
) -> None:
    done = run(tmp_path, "tests/unit", "-x", cpus=cpus)
    assert done.returncode == 0, done.stderr
    assert pytest_argv(done) == [
        "-n",
        str(workers),
        "--dist",
        "loadfile",
        "--no-loadscope-reorder",
        "tests/unit",
        "-x",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("-n", "0"),
        ("-n0",),
        ("--numprocesses=2",),
        ("-p", "no:xdist"),
        ("--pdb",),
        ("--trace",),
        ("--collect-only",),
        ("--fixtures",),
    ],
)
def test_arguments_that_choose_the_processes_or_debug_get_no_options_added(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    done = run(tmp_path, "tests/cli", *args)
    assert done.returncode == 0, done.stderr
    assert pytest_argv(done) == ["tests/cli", *args]


def test_without_pytest_xdist_the_tests_run_in_one_process(tmp_path: Path) -> None:
    done = run(tmp_path, "-m", "unit", xdist=False)
    assert pytest_argv(done) == ["-m", "unit"]
    assert "pytest-xdist is not installed" in done.stderr


def test_the_exit_status_is_pytests(tmp_path: Path) -> None:
    assert run(tmp_path, exit_status=1).returncode == 1


def test_without_a_python_it_is_a_usage_error() -> None:
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("Error: "), done.stderr


def test_the_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)


def test_in_parallel_the_longer_tiers_run_first() -> None:
    """Two tests named unit first: one pytest-xdist worker runs the CLI one first
    (tests/conftest.py's PARALLEL_ORDER), where one process alone keeps their order."""
    unit = "tests/unit/test_unit_values.py::test_parse_size[512MB-512000000]"
    cli = "tests/cli/test_cli_parsing.py::test_version[--version]"

    def order(*options: str) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", *options, unit, cli],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        # In the order they first appear (pytest-xdist names a test when it starts too).
        lines = done.stdout.splitlines()
        return list(dict.fromkeys(test for line in lines for test in (unit, cli) if test in line))

    assert order("-n", "0") == [unit, cli]
    assert order("-n", "1", "--dist", "loadfile", "--no-loadscope-reorder") == [cli, unit]
