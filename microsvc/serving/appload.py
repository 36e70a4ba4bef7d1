"""Finding the user's WSGI app from an import string: `pkg.mod:app`, `pkg.mod:create_app()`."""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import os
import select
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from microsvc.config.values import format_size
from microsvc.errors import AppImportError, AppLoadError, MicrosvcError
from microsvc.observe.scoreboard import MemorySample, read_memory
from microsvc.wsgi import WSGIApp

if TYPE_CHECKING:
    from microsvc.planning.plan import SystemFacts

#: Attribute names tried, in order, when the string names only a module.
DEFAULT_NAMES = ("app", "application")


@dataclass(frozen=True)
class AppRef:
    """A parsed import string."""

    text: str
    module: str
    expression: ast.expr | None

    def __str__(self) -> str:
        return self.text


def parse_app_string(text: str) -> AppRef:
    """Check the shape of `module[:expression]` without importing anything."""
    module, _, expression = text.strip().partition(":")
    if not module or not all(part.isidentifier() for part in module.split(".")):
        raise AppImportError(f"{text!r} is not an app import string such as 'pkg.mod:app'")
    if not expression:
        return AppRef(text, module, None)
    try:
        node = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError:
        raise AppImportError(f"{text!r}: {expression!r} is not a name or a call") from None
    _check_expression(text, node)
    return AppRef(text, module, node)


def _check_expression(text: str, node: ast.expr) -> None:
    target = node.func if isinstance(node, ast.Call) else node
    while isinstance(target, ast.Attribute):
        target = target.value
    if not isinstance(target, ast.Name):
        raise AppImportError(f"{text!r}: after ':' put a name or a call such as create_app()")
    if isinstance(node, ast.Call):
        names = [kw.arg for kw in node.keywords]
        if None in names:
            raise AppImportError(f"{text!r}: write factory keyword arguments as name=value")
        if len(set(names)) != len(names):
            raise AppImportError(f"{text!r}: a factory keyword argument is repeated")
        for arg in [*node.args, *(kw.value for kw in node.keywords)]:
            try:
                ast.literal_eval(arg)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                raise AppImportError(f"{text!r}: factory arguments must be literals") from None


def _evaluate(ref: AppRef, module: Any) -> Any:
    node = ref.expression
    call = node if isinstance(node, ast.Call) else None
    target = call.func if call else node
    names: list[str] = []
    while isinstance(target, ast.Attribute):
        names.insert(0, target.attr)
        target = target.value
    assert isinstance(target, ast.Name)
    names.insert(0, target.id)
    obj = module
    for depth, name in enumerate(names):
        try:
            obj = getattr(obj, name)
        except AttributeError:
            where = ref.module + "".join("." + n for n in names[:depth])
            raise AppImportError(f"{ref.text!r}: {where!r} has no attribute {name!r}") from None
    if call is None:
        return obj
    args = [ast.literal_eval(arg) for arg in call.args]
    kwargs = {str(kw.arg): ast.literal_eval(kw.value) for kw in call.keywords}
    if not callable(obj):
        raise AppImportError(f"{ref.text!r}: {names[-1]!r} is not callable")
    try:
        return obj(*args, **kwargs)
    except Exception as exc:
        raise AppLoadError(f"{ref.text!r}: the factory raised {_describe(exc)}") from exc


class AppSyntaxError(AppLoadError, SyntaxError):
    """The app's code does not compile. A SyntaxError too, so that gunicorn's workers
    under --reload serve the error and watch the broken file instead of failing to boot."""

    def __init__(self, message: str, cause: SyntaxError) -> None:
        super().__init__(message)
        self.filename = cause.filename
        self.lineno = cause.lineno
        self.offset = cause.offset
        self.text = cause.text

    def __str__(self) -> str:
        return str(self.args[0])


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):  # its message names the file and line already
        return f"{type(exc).__name__}: {exc}"
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({os.path.relpath(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def import_module(ref: AppRef) -> Any:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(ref.module)
    except ModuleNotFoundError as exc:
        if exc.name and (ref.module == exc.name or ref.module.startswith(exc.name + ".")):
            raise AppImportError(
                f"cannot import {ref.module!r}: no module named {exc.name!r} "
                f"(looked in {cwd} and the Python path)"
            ) from None
        raise AppLoadError(f"importing {ref.module!r} raised {_describe(exc)}") from exc
    except SyntaxError as exc:
        raise AppSyntaxError(f"importing {ref.module!r} raised {_describe(exc)}", exc) from exc
    except Exception as exc:
        raise AppLoadError(f"importing {ref.module!r} raised {_describe(exc)}") from exc


def load_app(ref: AppRef) -> WSGIApp:
    """Import the module, evaluate the expression, and check the result is callable."""
    module = import_module(ref)
    if ref.expression is None:
        for name in DEFAULT_NAMES:
            if callable(candidate := getattr(module, name, None)):
                return candidate  # type: ignore[no-any-return]
        raise AppImportError(
            f"{ref.module!r} has no 'app' or 'application'; name it: '{ref.module}:NAME'"
        )
    app = _evaluate(ref, module)
    if not callable(app):
        raise AppImportError(f"{ref.text!r} is a {type(app).__name__}, not a WSGI callable")
    return app  # type: ignore[no-any-return]


#: How long the start-up check waits for the app to load when no timeout is given.
CHECK_TIMEOUT = 30.0


@dataclass(frozen=True)
class AppMemory:
    """The memory of a fresh Python process before and after it imported the app (see
    `measure_in_subprocess`). `own`: its own memory after the import (USS, or RSS where
    the platform gives no USS), the least a worker that imports the app holds."""

    before: MemorySample
    after: MemorySample

    @property
    def own(self) -> int:
        return self.after.own

    @property
    def measure(self) -> str:
        return self.after.measure

    @property
    def imported(self) -> int:
        """What the import added to the process's own memory."""
        return max(0, self.after.own - self.before.own)

    def describe(self) -> str:
        """One line: `app memory after import: own (USS) 211.2MiB, PSS ..., RSS ...`."""
        pss = f", PSS {format_size(self.after.pss)}" if self.after.pss else ""
        return (
            f"app memory after import: own ({self.measure}) {format_size(self.own)}{pss}, "
            f"RSS {format_size(self.after.rss)}; the import added "
            f"{format_size(self.imported)}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "own": self.after.own,
            "pss": self.after.pss,
            "rss": self.after.rss,
            "imported": self.imported,
            "own_before_import": self.before.own,
        }


def measure_in_subprocess(
    ref: AppRef,
    *,
    timeout: float | None = CHECK_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pythonpath: Sequence[str] = (),
) -> AppMemory:
    """Load the app as `check_in_subprocess` does, and return that process's memory
    before and after the import. Raises AppLoadError (or AppImportError)."""
    memory = check_in_subprocess(
        ref, timeout=timeout, env=env, cwd=cwd, pythonpath=pythonpath, measure=True
    )
    if memory is None:
        raise AppLoadError(f"loading {ref.text!r}: its process could not read its memory")
    return memory


def measured_facts(
    ref: AppRef,
    facts: SystemFacts | None = None,
    *,
    timeout: float | None = CHECK_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> tuple[SystemFacts, AppMemory]:
    """`facts` (default: read from this machine) with the own memory of a process that
    imported the app (`--memory-per-worker auto` plans with it), and that measurement.
    Raises AppLoadError when the app cannot be loaded."""
    from microsvc.planning.system import read_system_facts, with_app_memory

    memory = measure_in_subprocess(ref, timeout=timeout, env=env, cwd=cwd)
    return with_app_memory(facts or read_system_facts(), memory.own, memory.measure), memory


def check_in_subprocess(
    ref: AppRef,
    *,
    timeout: float | None = CHECK_TIMEOUT,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    pythonpath: Sequence[str] = (),
    measure: bool = False,
) -> AppMemory | None:
    """Load the app in a short-lived Python process and raise its error here, if any.
    With `measure`, return the process's memory before and after the import (None when
    it could not be read).

    The master then fails with one clear line before any worker starts, and keeps none
    of the app's import-time state (connections, threads) that forked workers would share.
    A separate interpreter, not a fork, so that it works the same in a monkey-patched master.

    The child gets what the workers get: the variables in `env` (gunicorn's raw_env) on
    top of this process's environment, `cwd` as its working directory and the
    directories in `pythonpath` first on its path. It reports on a pipe of its own, not
    on stdout (which the app may write to), as soon as the app is loaded, and then ends
    at once: threads the app started at import cannot hold it. A load that takes longer
    than `timeout` seconds (None: no limit) is killed and reported.
    """
    directory = os.path.abspath(cwd or os.getcwd())
    environ = dict(os.environ)
    environ.update(env or {})
    search = [*(os.path.abspath(path) for path in pythonpath), directory]
    environ["PYTHONPATH"] = os.pathsep.join([*search, *filter(None, sys.path)])
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [
                *(sys.executable, "-c", _CHILD_CODE, ref.text, str(write_end)),
                *(("measure",) if measure else ()),
            ],
            env=environ,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(write_end,),
        )
    except OSError as exc:
        os.close(read_end)
        raise AppLoadError(f"cannot start a process to load {ref.text!r}: {exc}") from None
    finally:
        os.close(write_end)
    status: str | None = None
    try:
        status = _read_status(read_end, child, timeout)
    finally:
        os.close(read_end)
        _end(child, _EXIT_GRACE if status is not None else 0.0)
    if status is None:
        raise AppLoadError(
            f"loading {ref.text!r} did not finish within {timeout:g} s (the worker boot "
            "timeout, --timeout)"
        )
    name, _, message = status.partition("\t")
    if name == "ok":
        return _memory_report(message) if measure else None
    if not message:
        raise AppLoadError(
            f"loading {ref.text!r} ended its process with status "
            f"{child.returncode} before it finished"
        )
    raise (AppImportError if name == "AppImportError" else AppLoadError)(message)


_CHILD_CODE = "import microsvc.serving.appload as m; m._report_load()"


def _memory_report(text: str) -> AppMemory | None:
    try:
        before, after = (MemorySample(**sample) for sample in json.loads(text))
    except (ValueError, TypeError):
        return None
    return AppMemory(before, after)


def _read_status(fd: int, child: subprocess.Popen[bytes], timeout: float | None) -> str | None:
    """The child's status line; "" when it ended without one; None when time ran out."""
    deadline = None if timeout is None else time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
        if wait <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], wait)
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
        elif child.poll() is not None:
            # Ended, yet the pipe is still open: a process the app forked holds it.
            data += _read_available(fd)
            break
    return data.partition(b"\n")[0].decode(errors="replace")


def _read_available(fd: int) -> bytes:
    readable, _, _ = select.select([fd], [], [], 0)
    return os.read(fd, 4096) if readable else b""


def _end(child: subprocess.Popen[bytes], grace: float) -> None:
    """The child ends by itself once it has reported; kill it if it does not."""
    try:
        child.wait(grace)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


#: How long the child may take to end after its report before it is killed.
_EXIT_GRACE = 2.0


def _report_load() -> None:
    """Entry point of `check_in_subprocess`'s child: load, write one status line on the
    status pipe, and end without waiting for the app's threads or exit handlers."""
    ref_text, fd = sys.argv[1], int(sys.argv[2])
    measure = sys.argv[3:] == ["measure"]
    os.set_inheritable(fd, False)  # processes the app starts do not get the pipe
    status = "ok"
    try:
        ref = parse_app_string(ref_text)
        try:
            before = read_memory(os.getpid()) if measure else None
            load_app(ref)
            after = read_memory(os.getpid()) if measure else None
            if before is not None and after is not None:
                status = "ok\t" + json.dumps([asdict(before), asdict(after)])
        except MicrosvcError as exc:
            status = f"{type(exc).__name__}\t{exc}"
        except BaseException as exc:  # whatever the app does is reported, never a traceback
            status = f"AppLoadError\timporting {ref.module!r} raised {_describe(exc)}"
    except MicrosvcError as exc:
        status = f"{type(exc).__name__}\t{exc}"
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    line = (status.replace("\n", " ") + "\n").encode()
    with contextlib.suppress(OSError):
        while line:
            line = line[os.write(fd, line) :]
    os._exit(0)
