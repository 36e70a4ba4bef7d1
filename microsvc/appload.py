"""Finding the user's WSGI app from an import string: `pkg.mod:app`, `pkg.mod:create_app()`."""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from microsvc.errors import AppImportError, AppLoadError, MicrosvcError

WSGIApp = Callable[..., Any]

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


def _describe(exc: BaseException) -> str:
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


def check_in_subprocess(ref: AppRef) -> None:
    """Load the app in a short-lived Python process and raise its error here, if any.

    The master then fails with one clear line before any worker starts, and keeps none
    of the app's import-time state (connections, threads) that forked workers would share.
    A separate interpreter, not a fork, so that it works the same in a monkey-patched master.
    """
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join([os.getcwd(), *filter(None, sys.path)])
    child = subprocess.run(
        [sys.executable, "-c", "import microsvc.appload as m; m._report_load()", ref.text],
        env=environ,
        stdout=subprocess.PIPE,
        check=False,
    )
    answer = child.stdout.decode(errors="replace").strip().splitlines()
    status = answer[-1] if answer else ""
    if status == "ok":
        return
    name, _, message = status.partition("\t")
    if not message:
        raise AppLoadError(
            f"loading {ref.text!r} ended its process with status "
            f"{child.returncode} before it finished"
        )
    raise (AppImportError if name == "AppImportError" else AppLoadError)(message)


def _report_load() -> None:
    """Entry point of `check_in_subprocess`'s child: load, then print one status line."""
    ref = parse_app_string(sys.argv[1])
    status = "ok"
    try:
        load_app(ref)
    except MicrosvcError as exc:
        status = f"{type(exc).__name__}\t{exc}"
    except BaseException as exc:  # whatever the app does is reported, never a traceback
        status = f"AppLoadError\timporting {ref.module!r} raised {_describe(exc)}"
    sys.stdout.flush()
    print("\n" + status.replace("\n", " "), flush=True)
