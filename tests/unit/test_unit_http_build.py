"""The request path's build: compiled where every module is compiled and none is older
than its source, plain Python otherwise or on request (`MICROSVC_PURE_PYTHON=1`)."""

from __future__ import annotations

import ast
import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from microsvc.http import BUILD
from microsvc.http.build import (
    COMPILED_MODULES,
    PURE_PYTHON_ENV,
    SHARED_LIBRARY,
    decide,
    describe_engine,
)

ROOT = Path(__file__).resolve().parents[2]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _tree(
    tmp_path: Path, compiled: tuple[str, ...], newer_source: str = "", shared: bool = True
) -> Path:
    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text("")
        os.utime(tmp_path / f"{name}.py", (1000, 1000))
    for name in (*compiled, SHARED_LIBRARY) if shared else compiled:
        (tmp_path / f"{name}{SUFFIX}").write_bytes(b"")
        os.utime(tmp_path / f"{name}{SUFFIX}", (2000, 2000))
    if newer_source:
        os.utime(tmp_path / f"{newer_source}.py", (3000, 3000))
    return tmp_path


def test_compiled_when_every_module_is_compiled_after_its_source(tmp_path: Path) -> None:
    build = decide({}, _tree(tmp_path, ("a", "b")), ("a", "b"), checkout=True)
    assert (build.compiled, build.describe()) == (True, "compiled")


def test_an_installed_wheel_is_compiled_whatever_its_files_times(tmp_path: Path) -> None:
    # pip writes b.py after b.cpython-*.so: outside a checkout the times say nothing.
    build = decide({}, _tree(tmp_path, ("a", "b"), newer_source="b"), ("a", "b"), checkout=False)
    assert build.compiled


def test_not_compiled_without_the_shared_library(tmp_path: Path) -> None:
    # The modules' own files are small; the library they all import may fail alone.
    build = decide({}, _tree(tmp_path, ("a", "b"), shared=False), ("a", "b"))
    assert build.describe() == "Python: not compiled (see setup.py)"


@pytest.mark.parametrize(
    ("compiled", "newer", "environ", "reason"),
    [
        (("a",), "", {}, "not compiled"),
        (("a", "b"), "b", {}, "b.py changed after the build"),
        (("a", "b"), "", {PURE_PYTHON_ENV: "1"}, f"{PURE_PYTHON_ENV} is set"),
    ],
)
def test_plain_python_otherwise(
    tmp_path: Path,
    compiled: tuple[str, ...],
    newer: str,
    environ: dict[str, str],
    reason: str,
) -> None:
    build = decide(environ, _tree(tmp_path, compiled, newer), ("a", "b"), checkout=True)
    assert not build.compiled
    assert build.describe().startswith(f"Python: {reason}")


def test_the_setting_0_keeps_the_compiled_build(tmp_path: Path) -> None:
    assert decide({PURE_PYTHON_ENV: "0"}, _tree(tmp_path, ("a", "b")), ("a", "b")).compiled


def test_setup_compiles_the_modules_the_build_names(monkeypatch: pytest.MonkeyPatch) -> None:
    tree = ast.parse((ROOT / "setup.py").read_text())
    last = tree.body[-1]  # setup(ext_modules=compiled_extensions())
    assert isinstance(last, ast.Expr) and getattr(last.value, "func", None) is not None
    assert "mypycify" in ast.unparse(tree)
    namespace: dict[str, object] = {}
    monkeypatch.chdir(ROOT)
    exec(compile(ast.Module(body=tree.body[:-1], type_ignores=[]), "setup.py", "exec"), namespace)
    names = namespace["compiled_modules"]()  # type: ignore[operator]
    assert names == [f"microsvc/http/{name}.py" for name in COMPILED_MODULES]


def _imported_files(environ: dict[str, str]) -> dict[str, str]:
    code = (
        "import json, microsvc.http as h, microsvc.http.parser as p, microsvc.http.connection as c;"
        "print(json.dumps({'build': h.BUILD.describe(), 'parser': p.__file__,"
        " 'connection': c.__file__}))"
    )
    env = {k: v for k, v in os.environ.items() if k != PURE_PYTHON_ENV} | environ
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    result: dict[str, str] = json.loads(out.stdout)
    return result


def test_the_plain_python_build_on_request_imports_the_sources() -> None:
    files = _imported_files({PURE_PYTHON_ENV: "1"})
    assert files["build"] == f"Python: {PURE_PYTHON_ENV} is set"
    assert files["parser"].endswith("parser.py")
    assert files["connection"].endswith("connection.py")


def test_the_default_build_imports_what_it_says() -> None:
    files = _imported_files({})
    compiled = files["build"] == "compiled"
    assert compiled == (not files["parser"].endswith(".py"))
    assert compiled == (not files["connection"].endswith(".py"))


def test_the_engine_is_named_with_its_build() -> None:
    assert describe_engine("gunicorn") == "gunicorn"
    assert describe_engine("microsvc") == f"microsvc ({BUILD.describe()})"
