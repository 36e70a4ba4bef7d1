"""Builds microsvc. Everything but the compiled request path is in setup.cfg.

The HTTP engine's request path (`COMPILED_MODULES` in microsvc/http/build.py) is
compiled to C with mypyc from the same type-annotated modules, which stay importable as
plain Python. The compiled modules are optional extensions: a machine without a C
compiler or Python's headers gets the plain-Python engine. `MICROSVC_PURE_PYTHON=1` asks
for it: at install time, nothing is compiled; at run time, the compiled modules are not
imported. `microsvc.http.BUILD` says at run time which one runs.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

from setuptools import Extension, setup


def compiled_modules() -> list[str]:
    """The modules every request goes through, as `microsvc.http.build` names them."""
    tree = ast.parse(Path("microsvc/http/build.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and getattr(node.targets[0], "id", "") == "COMPILED_MODULES"
        ):
            return [f"microsvc/http/{name}.py" for name in ast.literal_eval(node.value)]
    raise RuntimeError("COMPILED_MODULES not found in microsvc/http/build.py")


def compiled_extensions() -> list[Extension]:
    if os.environ.get("MICROSVC_PURE_PYTHON", "") not in ("", "0"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("microsvc: mypyc is not installed: the plain-Python engine", file=sys.stderr)
        return []
    try:
        # The build's own environment may lack the runtime dependencies: their types are
        # not needed to compile these modules (mypy checks them in the test suite).
        extensions = mypycify(
            ["--ignore-missing-imports", *compiled_modules()],
            opt_level="3",
            group_name="microsvc.http._native",
        )
    except (Exception, SystemExit) as exc:
        print(f"microsvc: the request path is not compiled ({exc})", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no compiler: the plain-Python modules serve
    return extensions


setup(ext_modules=compiled_extensions())
