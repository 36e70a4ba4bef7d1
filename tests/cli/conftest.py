"""Helpers of the CLI tier: run the real `microsvc` command in a subprocess with a clean
environment, and check the error contract (one `Error: ` line, no traceback, exit code).

Every subprocess starts in its own process group, and the group is killed as soon as
the command ends or overruns its timeout, so a server started by mistake (and its
workers) never outlives the call that started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import clean_env, free_port, signal_group
from microsvc.http.build import PURE_PYTHON_ENV

#: Variables microsvc reads besides MICROSVC_*; none may leak in from the test runner
#: (`harness.clean_env` drops them, and more, from the children's environment).
CONVENTION_VARIABLES = ("WEB_CONCURRENCY", "HOST", "PORT")

TRACEBACK = "Traceback (most recent call last)"

#: How long a command that should fail may take to exit on its own.
TIMEOUT = 30


@pytest.fixture(autouse=True)
def _clean_test_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same clean environment for the in-process (CliRunner) tests. The build of the
    request path under test (`MICROSVC_PURE_PYTHON`) stays, as `clean_env` keeps it."""
    for name in list(os.environ):
        if name == PURE_PYTHON_ENV:
            continue
        if name.startswith("MICROSVC_") or name in CONVENTION_VARIABLES:
            monkeypatch.delenv(name)


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"argv: {self.argv}\nexit status: {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )

    def assert_error(self, exit_code: int, *fragments: str) -> str:
        """Check the error contract and return the `Error: ` line.

        stderr is exactly one line starting with `Error: `, or click's usage block
        (`Usage: ...`, `Try '... --help' for help.`, a blank line) followed by that one
        line; stdout is empty; no traceback anywhere; the exit status is `exit_code`.
        Each fragment must occur in the error line.
        """
        detail = self.describe()
        assert TRACEBACK not in self.stdout + self.stderr, detail
        assert self.returncode == exit_code, detail
        assert self.stdout == "", detail
        lines = self.stderr.splitlines()
        assert lines, detail
        if lines[0].startswith("Usage: "):
            assert len(lines) == 4, detail
            assert lines[1].startswith("Try '") and lines[1].endswith("for help."), detail
            assert lines[2] == "", detail
        else:
            assert len(lines) == 1, detail
        line = lines[-1]
        assert line.startswith("Error: "), detail
        for fragment in fragments:
            assert fragment in line, f"{fragment!r} not in the error line\n{detail}"
        return line


class Microsvc:
    """Runs `python -m microsvc ...` (or a `python -c` script) and cleans up after it."""

    def __init__(self, cwd: Path, runtime_dir: Path) -> None:
        self.cwd = cwd
        #: Where a server started by mistake puts its control socket (not in ~).
        self.runtime_dir = runtime_dir

    def __call__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = TIMEOUT,
    ) -> Result:
        return self.execute([sys.executable, "-m", "microsvc", *args], env, cwd, timeout)

    def python(
        self,
        code: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = TIMEOUT,
    ) -> Result:
        return self.execute([sys.executable, "-c", code], env, cwd, timeout)

    def execute(
        self, argv: list[str], env: dict[str, str] | None, cwd: Path | None, timeout: float
    ) -> Result:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=clean_env({"XDG_RUNTIME_DIR": str(self.runtime_dir), **(env or {})}),
            cwd=cwd or self.cwd,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill(process.pid)
            stdout, stderr = process.communicate()
            pytest.fail(
                f"{argv[3:] or argv} did not exit within {timeout} s (did it start the "
                f"server?)\n--- stdout ---\n{stdout}--- stderr ---\n{stderr}"
            )
        finally:
            self.kill(process.pid)  # workers or helper processes it may have left
        return Result(argv, process.returncode, stdout, stderr)

    @staticmethod
    def kill(group: int) -> None:
        signal_group(group, signal.SIGKILL)


@pytest.fixture(scope="session")
def runtime_dir() -> Iterator[Path]:
    """A short XDG_RUNTIME_DIR (a Unix socket path must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="msvc-cli-", dir="/tmp"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def microsvc(tmp_path: Path, runtime_dir: Path) -> Microsvc:
    """`microsvc(*args, env=, cwd=, timeout=)` runs the command in tmp_path (by default)
    and returns a `Result`; `microsvc.python(code)` runs `python -c code` the same way."""
    return Microsvc(tmp_path, runtime_dir)


@pytest.fixture
def bind() -> str:
    """A -b value on a free local port, for `run` cases that must fail before serving."""
    return f"127.0.0.1:{free_port()}"
