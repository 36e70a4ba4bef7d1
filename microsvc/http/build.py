"""Which build of the request path is imported: compiled or plain Python.

The modules in `COMPILED_MODULES` are compiled to C with mypyc when microsvc is installed
(see setup.py): each has a compiled module (`parser.cpython-311-x86_64-linux-gnu.so`) next
to its source, and Python's import system prefers the compiled one. `select()` runs
before any of them is imported (`microsvc.http` calls it first) and decides:

- compiled, when every one of them (and the library they share) is compiled for this
  interpreter and, in a source checkout, none is older than its source;
- plain Python otherwise: with `MICROSVC_PURE_PYTHON=1` in the environment, when a
  module is not compiled (no C compiler at install time), or when a source file changed
  after the build (an edited checkout: the compiled module would not run the edit).

For plain Python, a finder placed first on `sys.meta_path` imports each of these modules
from its source file. The compiled modules call each other directly, so the choice is
for all of them together, and it is made once per process.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: The request path's modules that setup.py compiles (keep the two lists equal).
COMPILED_MODULES = (
    "body",
    "connection",
    "environ",
    "green",
    "meter",
    "parser",
    "response",
    "slot",
)
#: The library the compiled modules share (mypyc's group, `group_name` in setup.py).
SHARED_LIBRARY = "_native__mypyc"
#: Set to 1 to run the plain-Python request path even where it is compiled.
PURE_PYTHON_ENV = "MICROSVC_PURE_PYTHON"

_PACKAGE = __name__.rpartition(".")[0]
_HERE = Path(__file__).resolve().parent
#: A source checkout (an editable install) has setup.py beside the package. An installed
#: wheel has not, and there the files' times say nothing about the build: pip writes
#: `body.py` after `body.cpython-311-x86_64-linux-gnu.so`, and copies reorder them.
_CHECKOUT = (_HERE.parents[1] / "setup.py").is_file()


class Build:
    """The outcome of `select()`: `compiled`, and `reason` when it is not."""

    __slots__ = ("compiled", "reason")

    def __init__(self, compiled: bool, reason: str = "") -> None:
        self.compiled = compiled
        self.reason = reason

    def describe(self) -> str:
        """'compiled', or 'Python' with the reason, for the start-up line and `plan`."""
        return "compiled" if self.compiled else f"Python: {self.reason}"


def compiled_path(name: str, directory: Path = _HERE) -> Path | None:
    """The compiled module `name` for this interpreter, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = directory / f"{name}{suffix}"
        if candidate.exists():
            return candidate
    return None


def decide(
    environ: os._Environ[str] | dict[str, str],
    directory: Path = _HERE,
    modules: Sequence[str] = COMPILED_MODULES,
    checkout: bool = _CHECKOUT,
) -> Build:
    """Whether the compiled modules may be imported (see the module docstring); the
    sources' times are compared with the build's only in a `checkout`."""
    if environ.get(PURE_PYTHON_ENV, "") not in ("", "0"):
        return Build(False, f"{PURE_PYTHON_ENV} is set")
    if compiled_path(SHARED_LIBRARY, directory) is None:
        return Build(False, "not compiled (see setup.py)")
    for name in modules:
        compiled = compiled_path(name, directory)
        if compiled is None:
            return Build(False, "not compiled (see setup.py)")
        source = directory / f"{name}.py"
        if checkout and source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            return Build(False, f"{source.name} changed after the build; reinstall to compile")
    return Build(True)


class _SourceFinder:
    """Finds the request path's modules as source files (see the module docstring)."""

    def __init__(self, directory: Path, modules: Sequence[str]) -> None:
        self._paths = {f"{_PACKAGE}.{name}": directory / f"{name}.py" for name in modules}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        source = self._paths.get(fullname)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(fullname, source)


_selected: Build | None = None


def select() -> Build:
    """Decides once per process, before the modules are imported; later calls return
    the same decision."""
    global _selected
    if _selected is None:
        _selected = decide(os.environ)
        if not _selected.compiled and any(
            compiled_path(name) is not None for name in COMPILED_MODULES
        ):
            sys.meta_path.insert(0, _SourceFinder(_HERE, COMPILED_MODULES))
    return _selected


def describe_engine(engine: str) -> str:
    """The engine's name for the start-up line and `microsvc plan`, with the build of
    microsvc's own: 'microsvc (compiled)', 'microsvc (Python: ...)' or 'gunicorn'."""
    if engine != "microsvc":
        return engine
    return f"microsvc ({select().describe()})"
