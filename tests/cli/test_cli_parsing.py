"""Good input: --version, --help, `plan --json` and plain `plan`, and the precedence of
command line, environment and config file as `plan` shows it. Most cases run in process
with click's CliRunner; a few go through the real command to show the same thing."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from click.testing import CliRunner

import microsvc
from microsvc.cli import main
from microsvc.config.options import OPTIONS, OPTIONS_BY_NAME

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc


def plan_json(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["plan", "--json", *args], env=env, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def write_config(tmp_path: Path, text: str, name: str = "microsvc_conf.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --version and --help


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(microsvc: Microsvc, flag: str) -> None:
    result = microsvc(flag)
    assert result.returncode == 0, result.describe()
    assert result.stdout.strip() == f"microsvc, version {microsvc_version()}", result.describe()


def microsvc_version() -> str:
    return microsvc.__version__


@pytest.mark.parametrize("command", ["run", "plan"])
def test_help_lists_every_option_and_its_variable(microsvc: Microsvc, command: str) -> None:
    result = microsvc(command, "--help")
    assert result.returncode == 0, result.describe()
    text = result.stdout
    for spec in OPTIONS:
        for flag in spec.flags:
            assert re.search(rf"(^|[\s,/]){re.escape(flag)}\b", text), (flag, text)
        if spec.is_flag:
            assert f"--no-{spec.flag[2:]}" in text, (spec.name, text)
        assert spec.envvar in text, (spec.envvar, text)
    for extra in ("--set", "-c, --config", "MICROSVC_SET", "MICROSVC_CONFIG", "[APP]"):
        assert extra in text, (extra, text)


def test_plan_help_has_json(microsvc: Microsvc) -> None:
    result = microsvc("plan", "--help")
    assert result.returncode == 0 and "--json" in result.stdout, result.describe()


# plan --json


def test_plan_json_shape(microsvc: Microsvc) -> None:
    result = microsvc("plan", "--json")
    assert result.returncode == 0, result.describe()
    assert result.stderr == "", result.describe()
    report = json.loads(result.stdout)
    for key in ("usable_cpus", "worker_class", "workers", "threads", "settings"):
        assert key in report, key
    assert isinstance(report["usable_cpus"], int) and report["usable_cpus"] >= 1
    assert report["worker_class"] == "sync"
    assert isinstance(report["workers"], int) and report["workers"] >= 1
    assert report["threads"] == 1
    assert set(report["settings"]) == {spec.name for spec in OPTIONS}
    for name, entry in report["settings"].items():
        assert set(entry) == {"value", "source"}, name
        assert entry["source"] == "default", name
    assert report["gunicorn_settings"] == {}
    assert report["app"] == "microsvc.demo:app"


def test_plan_json_planned_workers_follow_the_formula() -> None:
    report = plan_json()
    assert report["workers"] == min(2 * report["usable_cpus"] + 1, report["plan"]["memory_cap"])
    gevent = plan_json("-k", "gevent")
    assert gevent["workers"] == min(gevent["usable_cpus"], gevent["plan"]["memory_cap"])


# precedence: command line > environment (MICROSVC_*, then WEB_CONCURRENCY) > config file


def workers_of(report: dict[str, Any]) -> tuple[object, str]:
    entry = report["settings"]["workers"]
    assert report["workers"] == entry["value"]
    return entry["value"], entry["source"]


def test_workers_from_command_line() -> None:
    assert workers_of(plan_json("--workers", "3")) == (3, "command line")
    assert workers_of(plan_json("-w", "3")) == (3, "command line")


def test_workers_from_microsvc_workers() -> None:
    report = plan_json(env={"MICROSVC_WORKERS": "4"})
    assert workers_of(report) == (4, "environment (MICROSVC_WORKERS)")


def test_workers_from_web_concurrency() -> None:
    report = plan_json(env={"WEB_CONCURRENCY": "6"})
    assert workers_of(report) == (6, "environment (WEB_CONCURRENCY)")


def test_workers_from_config_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "workers = 7\n")
    assert workers_of(plan_json("-c", path)) == (7, f"config file ({path})")


def test_workers_from_config_file_through_microsvc_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "workers = 7\n")
    report = plan_json(env={"MICROSVC_CONFIG": path})
    assert workers_of(report) == (7, f"config file ({path})")


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        pytest.param(
            ["--workers", "3"],
            {"MICROSVC_WORKERS": "4", "WEB_CONCURRENCY": "6"},
            (3, "command line"),
            id="command-line-beats-env",
        ),
        pytest.param(
            [],
            {"MICROSVC_WORKERS": "4", "WEB_CONCURRENCY": "6"},
            (4, "environment (MICROSVC_WORKERS)"),
            id="microsvc-workers-beats-web-concurrency",
        ),
        pytest.param(
            [], {"WEB_CONCURRENCY": "6"}, (6, "environment (WEB_CONCURRENCY)"), id="env-beats-file"
        ),
        pytest.param([], {}, (7, "config file"), id="file-beats-default"),
    ],
)
def test_precedence_with_config_file(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: tuple[int, str]
) -> None:
    path = write_config(tmp_path, "workers = 7\n")
    value, source = workers_of(plan_json("-c", path, *args, env=env))
    assert value == expected[0]
    assert source.startswith(expected[1])


def test_precedence_through_the_real_command(microsvc: Microsvc, tmp_path: Path) -> None:
    path = write_config(tmp_path, "workers = 7\ntimeout = 11\nkeepalive = 9\n")
    env = {"MICROSVC_WORKERS": "4", "MICROSVC_TIMEOUT": "12"}
    result = microsvc("plan", "--json", "-c", path, "--workers", "3", env=env)
    assert result.returncode == 0, result.describe()
    settings = json.loads(result.stdout)["settings"]
    assert settings["workers"] == {"value": 3, "source": "command line"}
    assert settings["timeout"] == {"value": 12, "source": "environment (MICROSVC_TIMEOUT)"}
    assert settings["keep_alive"] == {"value": 9, "source": f"config file ({path})"}
    assert settings["graceful_timeout"] == {"value": 30, "source": "default"}


def test_empty_environment_variable_is_unset(tmp_path: Path) -> None:
    path = write_config(tmp_path, "workers = 7\n")
    report = plan_json("-c", path, env={"MICROSVC_WORKERS": "", "WEB_CONCURRENCY": ""})
    assert workers_of(report) == (7, f"config file ({path})")


# bind from PORT and HOST


@pytest.mark.parametrize(
    ("args", "env", "bind", "source"),
    [
        pytest.param([], {}, ["127.0.0.1:5000"], "default", id="default"),
        pytest.param([], {"PORT": "8123"}, ["127.0.0.1:8123"], "environment (PORT)", id="port"),
        pytest.param([], {"HOST": "0.0.0.0"}, ["0.0.0.0:5000"], "environment (HOST)", id="host"),
        pytest.param(
            [],
            {"HOST": "::1", "PORT": "8123"},
            ["[::1]:8123"],
            "environment (HOST and PORT)",
            id="ipv6-host-and-port",
        ),
        pytest.param(
            [],
            {"MICROSVC_BIND": "127.0.0.1:9000", "PORT": "8123"},
            ["127.0.0.1:9000"],
            "environment (MICROSVC_BIND)",
            id="microsvc-bind-beats-port",
        ),
        pytest.param(
            ["-b", "127.0.0.1:9001", "-b", "unix:/tmp/x.sock"],
            {"PORT": "8123"},
            ["127.0.0.1:9001", "unix:/tmp/x.sock"],
            "command line",
            id="command-line-beats-port",
        ),
    ],
)
def test_bind(args: list[str], env: dict[str, str], bind: list[str], source: str) -> None:
    entry = plan_json(*args, env=env)["settings"]["bind"]
    assert entry == {"value": bind, "source": source}


def test_port_through_the_real_command(microsvc: Microsvc) -> None:
    result = microsvc("plan", "--json", env={"PORT": "8123"})
    assert result.returncode == 0, result.describe()
    entry = json.loads(result.stdout)["settings"]["bind"]
    assert entry == {"value": ["127.0.0.1:8123"], "source": "environment (PORT)"}


# choices in any case


@pytest.mark.parametrize("spelling", ["gevent", "GEVENT", "Gevent", "gEvEnT"])
def test_worker_class_any_case(spelling: str) -> None:
    report = plan_json("-k", spelling)
    assert report["worker_class"] == "gevent"
    assert report["settings"]["worker_class"] == {"value": "gevent", "source": "command line"}


def test_worker_class_any_case_from_environment() -> None:
    report = plan_json(env={"MICROSVC_WORKER_CLASS": "GThread"})
    assert report["worker_class"] == "gthread"
    assert report["threads"] == 4


def test_worker_class_any_case_through_the_real_command(microsvc: Microsvc) -> None:
    result = microsvc("plan", "--json", "-k", "GEVENT")
    assert result.returncode == 0, result.describe()
    assert json.loads(result.stdout)["worker_class"] == "gevent"


def test_log_level_any_case() -> None:
    assert plan_json("--log-level", "DEBUG")["settings"]["log_level"]["value"] == "debug"


def test_gthread_threads() -> None:
    report = plan_json("-k", "gthread", "--threads", "8")
    assert (report["worker_class"], report["threads"]) == ("gthread", 8)


# each value parsed once, at the edge


@contextlib.contextmanager
def counting_parser(name: str) -> Iterator[list[object]]:
    """Record every value the option's registry parser is given."""
    spec = OPTIONS_BY_NAME[name]
    original = spec.parse
    calls = []

    def parse(value: object) -> Any:
        calls.append(value)
        return original(value)

    object.__setattr__(spec, "parse", parse)  # the spec is frozen; put back below
    try:
        yield calls
    finally:
        object.__setattr__(spec, "parse", original)


def test_each_value_is_parsed_once() -> None:
    with (
        counting_parser("workers") as workers,
        counting_parser("worker_class") as worker_class,
        counting_parser("bind") as bind,
        counting_parser("memory_per_worker") as memory,
    ):
        report = plan_json(
            *("--workers", "3", "-k", "GEVENT", "-b", "127.0.0.1:1", "-b", "127.0.0.1:2"),
            env={"MICROSVC_MEMORY_PER_WORKER": "256MiB"},
        )
    assert (workers, worker_class, memory) == (["3"], ["gevent"], ["256MiB"])
    assert bind == ["127.0.0.1:1", "127.0.0.1:2"]
    assert report["settings"]["bind"]["value"] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert report["workers"] == 3


def test_a_value_given_as_none_is_kept_apart_from_not_given() -> None:
    report = plan_json("--health-path", "off", env={"MICROSVC_HEALTH_PATH": "/h"})
    assert report["settings"]["health_path"] == {"value": None, "source": "command line"}


# pass-through gunicorn settings


def test_set_shows_in_gunicorn_settings() -> None:
    entry = plan_json("--set", "worker_connections=500")["gunicorn_settings"]["worker_connections"]
    assert str(entry["value"]) == "500"
    assert entry["source"] == "command line"


def test_set_from_microsvc_set() -> None:
    report = plan_json(env={"MICROSVC_SET": "worker_connections=500 backlog=64"})
    settings = report["gunicorn_settings"]
    assert {name: str(entry["value"]) for name, entry in settings.items()} == {
        "worker_connections": "500",
        "backlog": "64",
    }
    assert {entry["source"] for entry in settings.values()} == {"environment (MICROSVC_SET)"}


def test_set_from_config_file_and_command_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "worker_connections = 100\nbacklog = 32\n")
    settings = plan_json("-c", path, "--set", "worker-connections=500")["gunicorn_settings"]
    assert str(settings["worker_connections"]["value"]) == "500"
    assert settings["worker_connections"]["source"] == "command line"
    assert settings["backlog"] == {"value": 32, "source": f"config file ({path})"}


def test_set_through_the_real_command(microsvc: Microsvc) -> None:
    result = microsvc("plan", "--json", "--set", "worker_connections=500")
    assert result.returncode == 0, result.describe()
    entry = json.loads(result.stdout)["gunicorn_settings"]["worker_connections"]
    assert (str(entry["value"]), entry["source"]) == ("500", "command line")


# plain-text plan


def test_plain_plan_explains_cpus_formula_and_sources(microsvc: Microsvc, tmp_path: Path) -> None:
    path = write_config(tmp_path, "timeout = 11\n")
    args = ("-c", path, "--max-requests", "100", "--set", "worker_connections=500")
    env = {"MICROSVC_LOG_LEVEL": "debug", "PORT": "8123"}
    text_result = microsvc("plan", *args, env=env)
    json_result = microsvc("plan", "--json", *args, env=env)
    assert text_result.returncode == 0, text_result.describe()
    assert json_result.returncode == 0, json_result.describe()
    report = json.loads(json_result.stdout)
    text = text_result.stdout

    assert f"usable CPUs: {report['usable_cpus']}" in text
    assert "worker class: sync" in text
    assert "2*cpus+1" in text
    assert f"cpus={report['usable_cpus']}" in text
    assert f"workers: {report['workers']}" in text

    lines = text.splitlines()
    settings_at = lines.index("settings:")
    for spec in OPTIONS:
        source = report["settings"][spec.name]["source"]
        line = next((line for line in lines[settings_at:] if line.split()[:1] == [spec.name]), None)
        assert line is not None, (spec.name, text)
        assert line.rstrip().endswith(source), (spec.name, source, line)
    assert "config file (" in text and "environment (MICROSVC_LOG_LEVEL)" in text
    assert "environment (PORT)" in text
    assert "gunicorn settings passed through:" in text
    assert any(
        line.split()[:2] == ["worker_connections", "500"] and line.endswith("command line")
        for line in lines
    ), text


def test_plain_plan_gevent_formula() -> None:
    result = CliRunner().invoke(main, ["plan", "-k", "gevent"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "formula for gevent: cpus" in result.stdout


def test_plain_plan_explicit_workers_names_the_source() -> None:
    result = CliRunner().invoke(main, ["plan", "--workers", "3"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "workers: 3  (set explicitly (command line))" in result.stdout


def test_plain_plan_warns_about_unknown_config_names(tmp_path: Path) -> None:
    path = write_config(tmp_path, "workers = 2\nnot_a_setting = 1\n")
    result = CliRunner().invoke(main, ["plan", "-c", path], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, result.stdout
    assert path in warnings[0] and "'not_a_setting'" in warnings[0], warnings
