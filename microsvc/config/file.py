"""Reading a gunicorn-style Python config file (`bind = ...`, `workers = ...`, hooks)."""

from __future__ import annotations

import os
import runpy
import types
from dataclasses import dataclass, field
from typing import Any

from microsvc.errors import UsageError


@dataclass(frozen=True)
class ConfigFile:
    """The names a config file defines, split into microsvc options and other gunicorn
    settings. Names that are neither are kept in `unknown` so the caller can warn."""

    path: str
    options: dict[str, Any] = field(default_factory=dict)
    gunicorn: dict[str, Any] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()


def load_config_file(
    path: str, option_names: dict[str, str], gunicorn_names: set[str]
) -> ConfigFile:
    """Run the file and sort its module-level names.

    `option_names` maps every name that feeds a microsvc option (its own name and its
    gunicorn name) to the option; `gunicorn_names` are all other gunicorn settings.
    """
    if not os.path.isfile(path):
        raise UsageError(f"config file {path!r} does not exist")
    if not path.endswith(".py"):
        raise UsageError(f"config file {path!r} is not a Python file (*.py)")
    try:
        namespace = runpy.run_path(path, run_name="__microsvc_config__")
    except SyntaxError as exc:
        raise UsageError(
            f"config file {path!r}: syntax error on line {exc.lineno}: {exc.msg}"
        ) from None
    except (Exception, SystemExit) as exc:
        raise UsageError(f"config file {path!r} raised {type(exc).__name__}: {exc}") from None
    options: dict[str, Any] = {}
    settings: dict[str, Any] = {}
    unknown: list[str] = []
    for name, value in namespace.items():
        if name.startswith("_") or isinstance(value, types.ModuleType):
            continue
        if name in option_names:
            options[option_names[name]] = value
        elif name in gunicorn_names:
            settings[name] = value
        elif not callable(value):
            unknown.append(name)
    return ConfigFile(path=path, options=options, gunicorn=settings, unknown=tuple(sorted(unknown)))
