"""Turning what the user gave (arguments, environment, config file) into `Settings`:
the first step of `microsvc.config.pipeline.build`.

Precedence, highest first: explicit values (command line, or `Launcher` arguments),
the environment (`MICROSVC_*`, then conventions such as WEB_CONCURRENCY, PORT),
the config file, the defaults. Every effective value remembers where it came from, and
every value is parsed once, by its option's parser (the command line's click types parse
theirs; see `Caller.parsed`).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from microsvc.config.file import ConfigFile, load_config_file
from microsvc.config.options import DEFAULTS, GUNICORN_NAMES, OPTIONS, OPTIONS_BY_NAME, Settings
from microsvc.errors import UsageError

#: gunicorn settings that microsvc owns or sets itself and that cannot be passed through.
RESERVED_GUNICORN = frozenset(GUNICORN_NAMES) | {"config", "wsgi_app", "daemon"}

_NO_VALUE: Any = object()


@dataclass(frozen=True)
class Caller:
    """Who gave the explicit options: the source their values are credited to, how an
    option is spelled in messages to them (`--threads 8` or `threads=8`), and whether
    their values arrive parsed (the command line's click types parse with the option's
    own parser, so the value is not parsed again)."""

    source: str
    command_line: bool
    parsed: bool = False

    def spell(self, name: str, value: object = _NO_VALUE) -> str:
        """The option `name` (with `value`, when given) as this caller writes it."""
        spec = OPTIONS_BY_NAME[name]
        if self.command_line:
            if value is _NO_VALUE or spec.is_flag:
                return spec.flag
            return f"{spec.flag} {spec.show(value)}"
        if value is _NO_VALUE:
            return f"{name}="
        if isinstance(value, enum.Enum):
            value = value.value
        return f"{name}={list(value) if isinstance(value, tuple) else value!r}"


#: `Launcher(workers=3)`: text or typed values, parsed here.
LAUNCHER = Caller("Launcher argument", command_line=False)
#: `microsvc run --workers 3`: values parsed by the click types (`microsvc.cli`).
COMMAND_LINE = Caller("command line", command_line=True, parsed=True)


@dataclass(frozen=True)
class Resolved:
    """Effective settings, pass-through gunicorn settings, and where each came from."""

    settings: Settings
    sources: dict[str, str]
    gunicorn: dict[str, Any] = field(default_factory=dict)
    gunicorn_sources: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def gunicorn_setting_names() -> set[str]:
    from microsvc._gunicorn import KNOWN_SETTINGS

    return {setting.name for setting in KNOWN_SETTINGS}


def unknown_option_error(name: str) -> UsageError:
    valid = ", ".join(sorted(OPTIONS_BY_NAME))
    hint = ""
    if name in gunicorn_setting_names():
        hint = f" ({name!r} is a gunicorn setting: pass it in gunicorn_settings)"
    return UsageError(f"unknown option {name!r}{hint}; valid options: {valid}")


def _parse(name: str, value: object, where: str) -> Any:
    spec = OPTIONS_BY_NAME[name]
    try:
        return spec.parse(value)
    except ValueError as exc:
        raise UsageError(f"invalid value for {where}: {exc}") from None


def check_gunicorn_settings(
    settings: Mapping[str, object],
    where: str,
    cwd: str | None = None,
    caller: Caller = LAUNCHER,
) -> dict[str, Any]:
    """Check names and values of pass-through settings with gunicorn's own validators.

    A relative `chdir` is read from `cwd` (default: the current directory) and kept as an
    absolute path, so that it means the same directory after the server has moved there.
    """
    from microsvc._gunicorn import Config, ConfigError

    known = gunicorn_setting_names()
    probe = Config()
    checked: dict[str, Any] = {}
    for name, value in settings.items():
        if name in GUNICORN_NAMES:
            option = caller.spell(GUNICORN_NAMES[name])
            raise UsageError(f"{where}: {name!r} is a microsvc option, use {option}")
        if name in RESERVED_GUNICORN:
            raise UsageError(f"{where}: the gunicorn setting {name!r} is managed by microsvc")
        if name not in known:
            raise UsageError(f"{where}: {name!r} is not a gunicorn setting")
        if name == "chdir" and isinstance(value, str) and value.strip():
            value = os.path.normpath(os.path.join(cwd or os.getcwd(), value.strip()))
        try:
            probe.set(name, value)
        except (ValueError, TypeError, ConfigError) as exc:
            raise UsageError(
                f"{where}: invalid value for gunicorn setting {name!r}: {exc}"
            ) from None
        checked[name] = value
    return checked


def parse_assignments(items: tuple[str, ...] | list[str], where: str) -> dict[str, str]:
    """`NAME=VALUE` strings (from --set or MICROSVC_SET) to a dict."""
    result: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"invalid value for {where}: {item!r} is not NAME=VALUE")
        result[name.strip().replace("-", "_")] = value
    return result


def load_config(path: str) -> ConfigFile:
    option_names = {**GUNICORN_NAMES, **{spec.name: spec.name for spec in OPTIONS}}
    return load_config_file(path, option_names, gunicorn_setting_names() - RESERVED_GUNICORN)


def resolve_settings(
    explicit: Mapping[str, object],
    environ: Mapping[str, str],
    config: ConfigFile | None = None,
    caller: Caller = LAUNCHER,
    gunicorn: Mapping[str, object] | None = None,
    cwd: str | None = None,
) -> Resolved:
    """Merge the layers into `Settings`; raise UsageError naming the bad value's origin.
    An explicit None means "not given" unless the caller's values arrive parsed (then
    `--health-path off` is a given None). `cwd`: where relative paths among the gunicorn
    settings are read from."""
    for name in explicit:
        if name not in OPTIONS_BY_NAME:
            raise unknown_option_error(name)
    chosen: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for spec in OPTIONS:
        name = spec.name
        if name in explicit and (caller.parsed or explicit[name] is not None):
            value = explicit[name]
            chosen[name] = value if caller.parsed else _parse(name, value, caller.spell(name))
            sources[name] = caller.source
        elif environ.get(spec.envvar, "") != "":
            chosen[name] = _parse(name, environ[spec.envvar], spec.envvar)
            sources[name] = f"environment ({spec.envvar})"
        elif spec.env_fallback and (fallback := spec.env_fallback(environ)):
            raw, variables = fallback
            chosen[name] = _parse(name, raw, variables)
            sources[name] = f"environment ({variables})"
        elif config is not None and name in config.options:
            chosen[name] = _parse(name, config.options[name], f"{name} in {config.path}")
            sources[name] = f"config file ({config.path})"
        else:
            chosen[name] = DEFAULTS[name]
            sources[name] = "default"
    settings = Settings(**chosen)
    _check_combinations(settings, sources, caller)

    passthrough: dict[str, Any] = {}
    passthrough_sources: dict[str, str] = {}
    warnings: list[str] = []
    layers: list[tuple[Mapping[str, object], str, str]] = []
    if config is not None:
        layers.append((config.gunicorn, config.path, f"config file ({config.path})"))
        warnings.extend(
            f"config file {config.path}: ignoring {name!r}, "
            + ("which microsvc manages" if name in RESERVED_GUNICORN else "an unknown name")
            for name in config.unknown
        )
    if environ.get("MICROSVC_SET"):
        from_env = parse_assignments(environ["MICROSVC_SET"].split(), "MICROSVC_SET")
        layers.append((from_env, "MICROSVC_SET", "environment (MICROSVC_SET)"))
    if gunicorn:
        where = "--set" if caller.command_line else "gunicorn_settings"
        layers.append((gunicorn, where, caller.source))
    for layer, where, source in layers:
        passthrough.update(check_gunicorn_settings(layer, where, cwd, caller))
        passthrough_sources.update(dict.fromkeys(layer, source))
    if settings.log_format != "text" and "logger_class" in passthrough:
        raise UsageError(
            f"{caller.spell('log_format', settings.log_format)} replaces gunicorn's "
            f"logger_class ({passthrough_sources['logger_class']}); use one of them"
        )
    return Resolved(settings, sources, passthrough, passthrough_sources, tuple(warnings))


def _check_combinations(settings: Settings, sources: Mapping[str, str], caller: Caller) -> None:
    """Options that contradict each other, named the way `caller` spells them."""
    spell = caller.spell
    threads = settings.threads
    if isinstance(threads, int) and threads > 1 and settings.worker_class != "gthread":
        raise UsageError(
            f"{spell('threads', threads)} ({sources['threads']}) needs "
            f"{spell('worker_class', 'gthread')}; "
            f"{settings.worker_class} workers run no thread pool"
        )
    if settings.health_path is not None and settings.health_path == settings.ready_path:
        raise UsageError(
            f"{spell('health_path')} and {spell('ready_path')} are both {settings.health_path}"
        )
    if settings.max_worker_lifetime_jitter and not settings.max_worker_lifetime:
        raise UsageError(
            f"{spell('max_worker_lifetime_jitter')} needs {spell('max_worker_lifetime')}"
        )
    if settings.max_requests_jitter and not settings.max_requests:
        raise UsageError(f"{spell('max_requests_jitter')} needs {spell('max_requests')}")
    if sources["metrics_bind"] != "default" and not settings.metrics:
        raise UsageError(
            f"{spell('metrics_bind')} ({sources['metrics_bind']}) needs "
            f"{spell('metrics', True)}; metrics are off without it"
        )
    if settings.metrics and settings.metrics_bind in settings.bind:
        raise UsageError(
            f"{spell('metrics_bind', settings.metrics_bind)} is also an app address "
            f"({spell('bind')}); give the metrics endpoint an address of its own"
        )
    if settings.preload and settings.reload:
        raise UsageError(
            f"{spell('reload', True)} cannot pick up code imported in the master by "
            f"{spell('preload', True)}; use one of them"
        )
