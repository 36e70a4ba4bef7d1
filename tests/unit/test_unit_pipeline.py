"""microsvc.config.pipeline.build: one call from what the user gave to the settings, the
plan and the gunicorn settings, each value parsed once, nothing written and then
overwritten, gunicorn's validation run on the result, and the result immutable."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from microsvc.config.options import OPTIONS, OPTIONS_BY_NAME, WorkerClass
from microsvc.config.pipeline import (
    Configuration,
    build,
    gunicorn_values,
    managed_values,
    option_values,
    planned_values,
    replan,
)
from microsvc.config.resolve import COMMAND_LINE, LAUNCHER
from microsvc.errors import UsageError
from microsvc.planning.plan import SystemFacts

FACTS = SystemFacts(host_cpus=4, affinity_cpus=4)


@contextlib.contextmanager
def counting_parser(name: str) -> Iterator[list[object]]:
    """Record every value the option's registry parser is given."""
    spec = OPTIONS_BY_NAME[name]
    original = spec.parse
    calls: list[object] = []

    def parse(value: object) -> object:
        calls.append(value)
        return original(value)

    object.__setattr__(spec, "parse", parse)  # the spec is frozen; put back below
    try:
        yield calls
    finally:
        object.__setattr__(spec, "parse", original)


def h2_installed() -> bool:
    from gunicorn.http2 import is_http2_available

    return bool(is_http2_available())


def test_one_call_gives_settings_sources_plan_and_gunicorn_settings() -> None:
    configuration = build(
        {"worker_class": "gthread", "threads": "3"},
        {"MICROSVC_TIMEOUT": "40"},
        facts=FACTS,
        gunicorn_settings={"backlog": 64},
    )
    assert configuration.settings.worker_class is WorkerClass.GTHREAD
    assert configuration.sources["threads"] == "Launcher argument"
    assert configuration.sources["timeout"] == "environment (MICROSVC_TIMEOUT)"
    assert (configuration.plan.workers, configuration.plan.threads) == (9, 3)
    gunicorn = configuration.gunicorn
    assert (gunicorn["workers"], gunicorn["threads"], gunicorn["timeout"]) == (9, 3, 40)
    assert gunicorn["worker_class"] == "microsvc.workers.gthread.EngineThreadWorker"
    assert gunicorn["backlog"] == configuration.passthrough["backlog"] == 64
    assert configuration.passthrough_sources == {"backlog": "Launcher argument"}
    assert configuration.warnings == ()


def test_the_result_is_immutable() -> None:
    configuration = build({}, {}, facts=FACTS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        configuration.settings = configuration.settings  # type: ignore[misc]
    for mapping in (configuration.sources, configuration.gunicorn, configuration.passthrough):
        with pytest.raises(TypeError):
            mapping["workers"] = 1  # type: ignore[index]
    # gunicorn's Config is mutable (hooks are set on it): each caller gets a new one.
    assert configuration.gunicorn_config() is not configuration.gunicorn_config()


def test_a_value_from_the_api_is_parsed_once() -> None:
    with counting_parser("workers") as workers, counting_parser("drain_period") as drain:
        build({"workers": "3"}, {"MICROSVC_DRAIN_PERIOD": "5s"}, facts=FACTS)
    assert (workers, drain) == (["3"], ["5s"])


def test_a_value_parsed_by_the_command_line_is_not_parsed_again() -> None:
    with counting_parser("workers") as calls:
        configuration = build({"workers": 3}, {}, facts=FACTS, caller=COMMAND_LINE)
    assert calls == []
    assert configuration.settings.workers == 3
    assert configuration.sources["workers"] == "command line"


def test_replanning_for_other_facts_parses_nothing_again() -> None:
    configuration = build({"workers": "auto", "timeout": "40"}, {}, facts=FACTS)
    with counting_parser("workers") as workers, counting_parser("timeout") as timeout:
        smaller = replan(configuration, SystemFacts(host_cpus=2, affinity_cpus=2))
    assert (workers, timeout) == ([], [])
    assert smaller.settings is configuration.settings
    assert (configuration.plan.workers, smaller.plan.workers) == (9, 5)
    assert (smaller.gunicorn["workers"], smaller.gunicorn["timeout"]) == (5, 40)


def test_the_registry_says_which_gunicorn_settings_the_plan_gives() -> None:
    configuration = build({"worker_class": "gthread"}, {}, facts=FACTS)
    settings, plan = configuration.settings, configuration.plan
    planned = {spec.gunicorn for spec in OPTIONS if spec.planned}
    assert planned == {"workers", "threads", "worker_class"}
    assert set(planned_values(settings, plan)) == planned
    assert not planned & set(option_values(settings))
    # `auto` is never handed to gunicorn, not even on the way to the plan's count.
    assert settings.workers == "auto"
    assert configuration.gunicorn["workers"] == plan.workers


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"worker_class": "gthread", "http_engine": "gunicorn"},
        {"log_format": "json", "worker_class": "gevent"},
    ],
)
def test_no_gunicorn_setting_is_written_twice(options: dict[str, object]) -> None:
    configuration = build(options, {}, facts=FACTS, gunicorn_settings={"backlog": 64})
    settings, plan = configuration.settings, configuration.plan
    parts = [
        set(option_values(settings)),
        set(planned_values(settings, plan)),
        set(managed_values(settings, plan, 1)),
        set(configuration.passthrough),
    ]
    for index, part in enumerate(parts):
        for other in parts[index + 1 :]:
            assert not part & other, (part, other)
    assert set(configuration.gunicorn) == set().union(*parts)


def test_a_pass_through_setting_replaces_microsvcs_own_choice() -> None:
    configuration = build(
        {"http_engine": "gunicorn"}, {}, facts=FACTS, gunicorn_settings={"http_parser": "fast"}
    )
    assert configuration.gunicorn["http_parser"] == "fast"
    values = gunicorn_values(
        configuration.settings, configuration.plan, {"worker_tmp_dir": "/tmp"}, 1
    )
    assert values["worker_tmp_dir"] == "/tmp"


def test_gunicorns_validation_of_the_whole_runs_on_the_result() -> None:
    if h2_installed():
        pytest.skip("the h2 package is installed")
    with pytest.raises(UsageError, match="h2 package is not installed"):
        build({}, {}, facts=FACTS, gunicorn_settings={"http_protocols": "h2,h1"})


def test_the_http_engine_checks_the_result() -> None:
    with pytest.raises(UsageError, match=r"http_parser=.*--http-engine gunicorn"):
        build({}, {}, facts=FACTS, gunicorn_settings={"http_parser": "fast"})
    build({"http_engine": "gunicorn"}, {}, facts=FACTS, gunicorn_settings={"http_parser": "fast"})


def test_errors_name_options_as_the_caller_spells_them() -> None:
    options = {"threads": 8, "worker_class": "sync"}
    with pytest.raises(UsageError, match=r"^threads=8 \(Launcher argument\) needs worker_class="):
        build(options, {}, facts=FACTS, caller=LAUNCHER)
    parsed = {"threads": 8, "worker_class": WorkerClass.SYNC}
    with pytest.raises(UsageError, match=r"^--threads 8 \(command line\) needs --worker-class "):
        build(parsed, {}, facts=FACTS, caller=COMMAND_LINE)


def test_relative_config_file_is_read_from_cwd(tmp_path: Path) -> None:
    directory = tmp_path
    (directory / "conf.py").write_text("workers = 2\n")
    configuration = build({}, {}, "conf.py", FACTS, cwd=str(directory))
    assert isinstance(configuration, Configuration)
    assert configuration.plan.workers == 2
    assert configuration.sources["workers"] == f"config file ({directory / 'conf.py'})"
