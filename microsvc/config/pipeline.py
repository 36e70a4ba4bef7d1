"""From what the user gave to what gunicorn runs, in one call:

    build(options, environ, config_file, facts) -> Configuration

1. `resolve.resolve_settings`: each option from the highest layer that gives it (explicit
   values, environment, config file, default), parsed once by its registry parser, and
   the user's own gunicorn settings checked by gunicorn's validators.
2. `planning.plan.plan_workers`: workers and threads for this machine and worker class.
3. `gunicorn_values`: the gunicorn settings, each name written once: by its registry
   option, by the plan (options marked `planned` in the registry), by microsvc, or by
   the user's pass-through settings (which win over microsvc's own choices).
4. gunicorn's validation of the whole (`Config.set`, then `Config.validate`) and the
   HTTP engine's check of what it can honour.

`Launcher`, its reload on HUP, `microsvc plan`, `microsvc manifest` and the benchmark all
call `build`; nothing else turns options into settings or gunicorn settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from microsvc.config.options import OPTIONS, HttpEngine, LogFormat, Settings, WorkerClass
from microsvc.config.resolve import LAUNCHER, Caller, load_config, resolve_settings
from microsvc.errors import UsageError
from microsvc.planning.plan import SystemFacts, WorkerPlan, plan_workers
from microsvc.planning.system import read_system_facts
from microsvc.workers import worker_class_path

if TYPE_CHECKING:
    from microsvc._gunicorn import Config

#: gunicorn's HTTP parser. Its default, `auto`, switches to the C parser (gunicorn_h1c)
#: whenever that package is importable; the only release installable today accepts
#: request lines with repeated spaces that the Python parser refuses, so microsvc uses
#: the Python parser unless `--set http_parser=...` asks otherwise.
HTTP_PARSER = "python"

#: gunicorn's logger_class for --log-format json.
JSON_LOGGER = "microsvc.observe.jsonlog.JsonLogger"

#: Workers touch a heartbeat file every second; on RAM, a slow disk cannot make them look
#: hung to the master.
HEARTBEAT_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


@dataclass(frozen=True)
class Configuration:
    """Everything one server runs with, built by `build` and never changed: a reload
    builds a new one."""

    #: The effective options, and where each came from ("default", "command line",
    #: "environment (MICROSVC_WORKERS)", "config file (PATH)", ...).
    settings: Settings
    sources: Mapping[str, str]
    #: Workers and threads, and why (`plan.explain()`).
    plan: WorkerPlan
    #: Every gunicorn setting microsvc sets, checked by gunicorn as a whole.
    gunicorn: Mapping[str, Any]
    #: The user's own gunicorn settings (`--set`, config file, `gunicorn_settings`;
    #: part of `gunicorn`) and where each came from.
    passthrough: Mapping[str, Any]
    passthrough_sources: Mapping[str, str]
    warnings: tuple[str, ...] = ()

    def gunicorn_config(self) -> Config:
        """A new gunicorn `Config` holding `gunicorn` (gunicorn's Config is mutable:
        hooks are set on it, so each user gets its own)."""
        return _new_config(self.gunicorn)


def build(
    options: Mapping[str, object],
    environ: Mapping[str, str],
    config_file: str | None = None,
    facts: SystemFacts | None = None,
    *,
    gunicorn_settings: Mapping[str, object] | None = None,
    caller: Caller = LAUNCHER,
    cwd: str | None = None,
    pid: int | None = None,
) -> Configuration:
    """The whole configuration for these inputs, or UsageError naming what is wrong.

    `options`: explicit values by option name, given by `caller`; `environ`: the
    environment to read (`MICROSVC_*`, WEB_CONCURRENCY, HOST, PORT, MICROSVC_SET);
    `config_file`: a gunicorn-style Python config file; `facts`: the machine
    (default: read from /proc and /sys); `gunicorn_settings`: other gunicorn settings
    by gunicorn name; `cwd`: where relative paths (the config file, gunicorn's chdir)
    are read from (default: the current directory); `pid`: the master's pid, which
    names its control socket (default: this process)."""
    if config_file and cwd:
        config_file = os.path.join(cwd, config_file)
    resolved = resolve_settings(
        options,
        environ,
        load_config(config_file) if config_file else None,
        caller=caller,
        gunicorn=gunicorn_settings,
        cwd=cwd,
    )
    return _complete(
        resolved.settings,
        MappingProxyType(dict(resolved.sources)),
        MappingProxyType(dict(resolved.gunicorn)),
        MappingProxyType(dict(resolved.gunicorn_sources)),
        resolved.warnings,
        facts or read_system_facts(),
        pid,
    )


def replan(
    configuration: Configuration, facts: SystemFacts, *, pid: int | None = None
) -> Configuration:
    """The same settings planned again for other facts (e.g. with the app's memory
    measured, for `--memory-per-worker auto`), with their gunicorn settings checked
    again; nothing is resolved or parsed again."""
    return _complete(
        configuration.settings,
        configuration.sources,
        configuration.passthrough,
        configuration.passthrough_sources,
        configuration.warnings,
        facts,
        pid,
    )


def _complete(
    settings: Settings,
    sources: Mapping[str, str],
    passthrough: Mapping[str, Any],
    passthrough_sources: Mapping[str, str],
    warnings: tuple[str, ...],
    facts: SystemFacts,
    pid: int | None,
) -> Configuration:
    """Steps 2 to 4 for resolved settings: the plan, the gunicorn settings, the checks."""
    plan = plan_workers(
        facts,
        settings.worker_class,
        workers=settings.workers,
        threads=settings.threads,
        max_workers=settings.max_workers,
        memory_per_worker=settings.memory_per_worker,
        workers_from=sources["workers"],
    )
    values = gunicorn_values(settings, plan, passthrough, os.getpid() if pid is None else pid)
    _check(values, settings.http_engine)
    return Configuration(
        settings=settings,
        sources=sources,
        plan=plan,
        gunicorn=MappingProxyType(values),
        passthrough=passthrough,
        passthrough_sources=passthrough_sources,
        warnings=warnings,
    )


def gunicorn_values(
    settings: Settings, plan: WorkerPlan, passthrough: Mapping[str, Any], pid: int
) -> dict[str, Any]:
    """The gunicorn settings for these settings and plan; the four parts name disjoint
    settings, so no value is written and then replaced."""
    values = option_values(settings)
    values.update(planned_values(settings, plan))
    values.update(
        (name, value)
        for name, value in managed_values(settings, plan, pid).items()
        if name not in passthrough
    )
    values.update(passthrough)
    return values


def option_values(settings: Settings) -> dict[str, Any]:
    """Registry options that feed a gunicorn setting, except the planned ones."""
    return {
        spec.gunicorn: spec.to_gunicorn(getattr(settings, spec.name))
        for spec in OPTIONS
        if spec.gunicorn and not spec.planned
    }


def planned_values(settings: Settings, plan: WorkerPlan) -> dict[str, Any]:
    """The gunicorn settings of the options marked `planned`, from the plan."""
    return {
        "workers": plan.workers,
        "threads": plan.threads,
        "worker_class": worker_class_path(plan.worker_class, settings.http_engine),
    }


def managed_values(settings: Settings, plan: WorkerPlan, pid: int) -> dict[str, Any]:
    """gunicorn settings no option names, which microsvc chooses (a pass-through
    setting of the same name replaces the choice)."""
    values: dict[str, Any] = {
        "control_socket": control_socket_path(pid),
        "proc_name": "microsvc",
        "http_parser": HTTP_PARSER,
    }
    if settings.worker_class == WorkerClass.GTHREAD and settings.http_engine == HttpEngine.GUNICORN:
        # gunicorn's gthread accepts while it holds fewer connections than this; microsvc's
        # engine accepts only while a thread is free, and parks idle connections.
        values["worker_connections"] = plan.threads
    if settings.log_format == LogFormat.JSON:
        values["logger_class"] = JSON_LOGGER
    if HEARTBEAT_DIR and os.access(HEARTBEAT_DIR, os.W_OK):
        values["worker_tmp_dir"] = HEARTBEAT_DIR
    return values


def control_socket_path(pid: int) -> str:
    """A control socket of this instance's own, so instances never unlink each other's."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else Path.home() / ".microsvc"
    return str(base / f"microsvc-{pid}.ctl")


def build_gunicorn_config(values: Mapping[str, Any]) -> Config:
    """A new gunicorn Config holding `values`, checked as gunicorn checks a configuration
    before it serves: each value by its setting's validator, then the settings together
    (`Config.validate()`, e.g. `http_protocols` with h2 needs the h2 package). Raises
    UsageError naming what is wrong."""
    from microsvc._gunicorn import ConfigError

    cfg = _new_config(values)
    try:
        cfg.validate()
    except (ValueError, TypeError, ConfigError) as exc:
        raise UsageError(f"gunicorn: {exc}") from None
    return cfg


def _new_config(values: Mapping[str, Any]) -> Config:
    from microsvc._gunicorn import Config, ConfigError

    cfg = Config(prog="microsvc")
    for name, value in values.items():
        try:
            cfg.set(name, value)
        except (AttributeError, ValueError, TypeError, ConfigError) as exc:
            raise UsageError(f"gunicorn setting {name!r}: {exc}") from None
    return cfg


def _check(values: Mapping[str, Any], engine: HttpEngine) -> None:
    cfg = build_gunicorn_config(values)
    if engine == HttpEngine.MICROSVC:
        from microsvc.workers.engine import http_config

        http_config(cfg)  # raises UsageError for what the engine cannot honour
