"""microsvc.config.resolve: precedence of the layers, where each value came from, and checks."""

from __future__ import annotations

import pytest

from microsvc.config.file import ConfigFile
from microsvc.config.options import DEFAULTS, OPTIONS_BY_NAME, LogLevel, Settings, WorkerClass
from microsvc.config.resolve import (
    COMMAND_LINE,
    LAUNCHER,
    Caller,
    Resolved,
    check_gunicorn_settings,
    parse_assignments,
    resolve_settings,
)
from microsvc.errors import UsageError

CONFIG_PATH = "conf/microsvc_conf.py"

#: Command-line spelling with values as text, as a user types them (the click types of
#: `microsvc.cli` parse theirs before resolving: `COMMAND_LINE`).
CLI_TEXT = Caller("command line", command_line=True)


def resolve(
    explicit: dict[str, object],
    environ: dict[str, str],
    cfg: ConfigFile | None = None,
    caller: Caller = CLI_TEXT,
    **kwargs: object,
) -> Resolved:
    return resolve_settings(explicit, environ, cfg, caller, **kwargs)  # type: ignore[arg-type]


def config(**options: object) -> ConfigFile:
    return ConfigFile(path=CONFIG_PATH, options=dict(options))


# --- defaults --------------------------------------------------------------------------


def test_defaults() -> None:
    resolved = resolve({}, {})
    assert resolved.settings == Settings()
    assert resolved.settings.workers == "auto"
    assert resolved.settings.bind == ("127.0.0.1:5000",)
    assert resolved.settings.worker_class is WorkerClass.SYNC
    assert resolved.sources == dict.fromkeys(OPTIONS_BY_NAME, "default")
    assert resolved.gunicorn == {}
    assert resolved.gunicorn_sources == {}
    assert resolved.warnings == ()


def test_unrelated_environment_is_ignored() -> None:
    resolved = resolve({}, {"PATH": "/bin", "WORKERS": "3", "MICROSVC_NOPE": "1"})
    assert resolved.settings == Settings()


# --- workers: explicit > MICROSVC_WORKERS > WEB_CONCURRENCY > config > default ---------


def test_microsvc_workers_beats_web_concurrency() -> None:
    resolved = resolve({}, {"MICROSVC_WORKERS": "3", "WEB_CONCURRENCY": "5"})
    assert resolved.settings.workers == 3
    assert resolved.sources["workers"] == "environment (MICROSVC_WORKERS)"


def test_web_concurrency() -> None:
    resolved = resolve({}, {"WEB_CONCURRENCY": "5"})
    assert resolved.settings.workers == 5
    assert resolved.sources["workers"] == "environment (WEB_CONCURRENCY)"


def test_web_concurrency_beats_config_file() -> None:
    resolved = resolve({}, {"WEB_CONCURRENCY": "5"}, config(workers=2))
    assert resolved.settings.workers == 5
    assert resolved.sources["workers"] == "environment (WEB_CONCURRENCY)"


def test_config_file_beats_default() -> None:
    resolved = resolve({}, {}, config(workers=2))
    assert resolved.settings.workers == 2
    assert resolved.sources["workers"] == f"config file ({CONFIG_PATH})"
    assert resolved.sources["threads"] == "default"


def test_explicit_beats_environment() -> None:
    environ = {"MICROSVC_WORKERS": "3", "WEB_CONCURRENCY": "5"}
    resolved = resolve({"workers": 7}, environ, config(workers=2))
    assert resolved.settings.workers == 7
    assert resolved.sources["workers"] == "command line"


def test_explicit_source_label() -> None:
    resolved = resolve({"workers": "4"}, {}, caller=LAUNCHER)
    assert resolved.settings.workers == 4
    assert resolved.sources["workers"] == "Launcher argument"


def test_parsed_values_are_taken_as_they_are() -> None:
    # The command line's click types parse with the option's parser; a given None
    # (`--health-path off`) is kept apart from "not given".
    resolved = resolve(
        {"workers": 4, "health_path": None}, {"MICROSVC_HEALTH_PATH": "/h"}, caller=COMMAND_LINE
    )
    assert (resolved.settings.workers, resolved.settings.health_path) == (4, None)
    assert resolved.sources["health_path"] == "command line"


def test_explicit_none_means_not_given() -> None:
    resolved = resolve({"workers": None}, {"MICROSVC_WORKERS": "3"})
    assert resolved.settings.workers == 3
    assert resolved.sources["workers"] == "environment (MICROSVC_WORKERS)"


def test_empty_environment_variable_means_unset() -> None:
    resolved = resolve({}, {"MICROSVC_WORKERS": "", "WEB_CONCURRENCY": "6"})
    assert resolved.settings.workers == 6
    assert resolved.sources["workers"] == "environment (WEB_CONCURRENCY)"


def test_microsvc_environment_for_every_kind_of_option() -> None:
    environ = {
        "MICROSVC_WORKER_CLASS": "gthread",
        "MICROSVC_THREADS": "8",
        "MICROSVC_MEMORY_PER_WORKER": "256MiB",
        "MICROSVC_PRELOAD": "yes",
        "MICROSVC_LOG_LEVEL": "DEBUG",
        "MICROSVC_BIND": "0.0.0.0:80 unix:/tmp/s.sock",
        "MICROSVC_MAX_WORKERS": "6",
    }
    resolved = resolve({}, environ)
    settings = resolved.settings
    assert settings.worker_class is WorkerClass.GTHREAD
    assert settings.threads == 8
    assert settings.memory_per_worker == 256 * 1024**2
    assert settings.preload is True
    assert settings.log_level is LogLevel.DEBUG
    assert settings.bind == ("0.0.0.0:80", "unix:/tmp/s.sock")
    assert settings.max_workers == 6
    for name in ("worker_class", "threads", "memory_per_worker", "preload", "log_level"):
        assert resolved.sources[name] == f"environment (MICROSVC_{name.upper()})"


# --- bind from HOST and PORT -----------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "bind", "source"),
    [
        ({"PORT": "8080"}, "127.0.0.1:8080", "environment (PORT)"),
        ({"HOST": "0.0.0.0", "PORT": "9000"}, "0.0.0.0:9000", "environment (HOST and PORT)"),
        ({"HOST": "0.0.0.0"}, "0.0.0.0:5000", "environment (HOST)"),
        ({"HOST": "::", "PORT": "80"}, "[::]:80", "environment (HOST and PORT)"),
        ({"HOST": "[::1]", "PORT": "80"}, "[::1]:80", "environment (HOST and PORT)"),
    ],
)
def test_host_and_port_make_the_bind(environ: dict[str, str], bind: str, source: str) -> None:
    resolved = resolve({}, environ)
    assert resolved.settings.bind == (bind,)
    assert resolved.sources["bind"] == source


def test_port_beats_config_bind() -> None:
    resolved = resolve({}, {"PORT": "8080"}, config(bind="0.0.0.0:80"))
    assert resolved.settings.bind == ("127.0.0.1:8080",)


def test_microsvc_bind_beats_port() -> None:
    resolved = resolve({}, {"MICROSVC_BIND": "0.0.0.0:1", "PORT": "8080"})
    assert resolved.settings.bind == ("0.0.0.0:1",)
    assert resolved.sources["bind"] == "environment (MICROSVC_BIND)"


def test_explicit_bind_beats_port() -> None:
    resolved = resolve({"bind": [("unix:/tmp/a.sock",)]}, {"PORT": "8080"})
    assert resolved.settings.bind == ("unix:/tmp/a.sock",)
    assert resolved.sources["bind"] == "command line"


# --- bad values name their origin ------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"MICROSVC_WORKERS": "zero"}, "MICROSVC_WORKERS"),
        ({"WEB_CONCURRENCY": "many"}, "WEB_CONCURRENCY"),
        ({"PORT": "http"}, "PORT"),
        ({"MICROSVC_MEMORY_PER_WORKER": "lots"}, "MICROSVC_MEMORY_PER_WORKER"),
        ({"MICROSVC_WORKER_CLASS": "tornado"}, "MICROSVC_WORKER_CLASS"),
        ({"MICROSVC_PRELOAD": "maybe"}, "MICROSVC_PRELOAD"),
    ],
)
def test_bad_environment_value_names_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(UsageError, match=f"^invalid value for {variable}: "):
        resolve({}, environ)


def test_bad_explicit_value_names_the_flag() -> None:
    with pytest.raises(UsageError, match=r"^invalid value for --workers: "):
        resolve({"workers": 0}, {})


def test_bad_explicit_value_from_api_names_the_argument() -> None:
    with pytest.raises(UsageError, match=r"^invalid value for workers=: "):
        resolve({"workers": 0}, {}, caller=LAUNCHER)


def test_bad_config_value_names_the_file() -> None:
    with pytest.raises(UsageError, match=f"invalid value for workers in {CONFIG_PATH}: "):
        resolve({}, {}, config(workers=0))


def test_unknown_explicit_option_lists_valid_names() -> None:
    with pytest.raises(UsageError, match="unknown option 'nope'") as info:
        resolve({"nope": 1}, {})
    message = str(info.value)
    assert "valid options: " in message
    for name in OPTIONS_BY_NAME:
        assert name in message
    assert "gunicorn setting" not in message


def test_unknown_explicit_option_that_is_a_gunicorn_setting_gets_a_hint() -> None:
    with pytest.raises(UsageError, match="'worker_connections' is a gunicorn setting"):
        resolve({"worker_connections": 500}, {})


# --- combinations ------------------------------------------------------------------------


def test_threads_with_sync_is_an_error() -> None:
    with pytest.raises(UsageError, match=r"--threads 4 .*needs --worker-class gthread"):
        resolve({"threads": 4}, {})


@pytest.mark.parametrize(
    ("explicit", "message"),
    [
        (
            {"threads": 8, "worker_class": "sync"},
            "threads=8 (Launcher argument) needs worker_class='gthread'; sync workers run no "
            "thread pool",
        ),
        ({"max_requests_jitter": 5}, "max_requests_jitter= needs max_requests="),
        (
            {"reload": True, "preload": True},
            "reload=True cannot pick up code imported in the master by preload=True",
        ),
        ({"metrics_bind": "127.0.0.1:9"}, "metrics_bind= (Launcher argument) needs metrics=True"),
        (
            {"metrics": True, "metrics_bind": "127.0.0.1:9", "bind": "127.0.0.1:9"},
            "metrics_bind='127.0.0.1:9' is also an app address (bind=)",
        ),
    ],
)
def test_combination_errors_spell_options_as_the_api_does(
    explicit: dict[str, object], message: str
) -> None:
    with pytest.raises(UsageError) as info:
        resolve(explicit, {}, caller=LAUNCHER)
    assert message in str(info.value)
    assert "--" not in str(info.value)


def test_threads_from_environment_with_gevent_names_the_source() -> None:
    environ = {"MICROSVC_THREADS": "2", "MICROSVC_WORKER_CLASS": "gevent"}
    with pytest.raises(UsageError, match=r"\(environment \(MICROSVC_THREADS\)\)"):
        resolve({}, environ)


@pytest.mark.parametrize(
    "explicit",
    [{"threads": 4, "worker_class": "gthread"}, {"threads": 1}, {"threads": "auto"}],
)
def test_threads_allowed(explicit: dict[str, object]) -> None:
    resolved = resolve(explicit, {})
    assert resolved.settings.threads == explicit["threads"]


def test_jitter_without_max_requests_is_an_error() -> None:
    with pytest.raises(UsageError, match="--max-requests-jitter needs --max-requests"):
        resolve({"max_requests_jitter": 50}, {})


def test_jitter_with_max_requests() -> None:
    resolved = resolve({"max_requests_jitter": 50, "max_requests": 1000}, {})
    assert (resolved.settings.max_requests, resolved.settings.max_requests_jitter) == (1000, 50)


def test_preload_with_reload_is_an_error() -> None:
    with pytest.raises(UsageError, match=r"--reload cannot .* --preload"):
        resolve({"reload": True}, {"MICROSVC_PRELOAD": "1"})


@pytest.mark.parametrize("name", ["preload", "reload"])
def test_preload_or_reload_alone(name: str) -> None:
    assert getattr(resolve({name: True}, {}).settings, name) is True


# --- gunicorn pass-through ----------------------------------------------------------------


def test_valid_gunicorn_setting_passes() -> None:
    resolved = resolve({}, {}, gunicorn={"worker_connections": 500})
    assert resolved.gunicorn == {"worker_connections": 500}
    assert resolved.gunicorn_sources == {"worker_connections": "command line"}


def test_unknown_gunicorn_setting_is_an_error() -> None:
    with pytest.raises(UsageError, match="'no_such_setting' is not a gunicorn setting"):
        resolve({}, {}, gunicorn={"no_such_setting": 1})


@pytest.mark.parametrize(
    ("name", "flag"), [("workers", "--workers"), ("keepalive", "--keep-alive"), ("bind", "--bind")]
)
def test_microsvc_owned_gunicorn_name_tells_the_flag(name: str, flag: str) -> None:
    with pytest.raises(UsageError, match=f"'{name}' is a microsvc option, use {flag}"):
        resolve({}, {}, gunicorn={name: 3})


def test_microsvc_owned_gunicorn_name_tells_the_keyword_to_the_api() -> None:
    with pytest.raises(UsageError, match="'keepalive' is a microsvc option, use keep_alive="):
        resolve({}, {}, caller=LAUNCHER, gunicorn={"keepalive": 3})


@pytest.mark.parametrize("name", ["daemon", "wsgi_app", "config"])
def test_reserved_gunicorn_setting_is_an_error(name: str) -> None:
    with pytest.raises(UsageError, match=f"'{name}' is managed by microsvc"):
        resolve({}, {}, gunicorn={name: "x"})


def test_bad_gunicorn_value_is_an_error() -> None:
    with pytest.raises(UsageError, match="invalid value for gunicorn setting 'worker_connections'"):
        resolve({}, {}, gunicorn={"worker_connections": "abc"})


def test_check_gunicorn_settings_names_where() -> None:
    assert check_gunicorn_settings({"backlog": 64}, "--set") == {"backlog": 64}
    with pytest.raises(UsageError, match=r"^--set: 'nope' is not a gunicorn setting"):
        check_gunicorn_settings({"nope": 1}, "--set")


def test_microsvc_set_environment() -> None:
    resolved = resolve({}, {"MICROSVC_SET": "worker_connections=500 backlog=64"})
    assert resolved.gunicorn == {"worker_connections": "500", "backlog": "64"}
    assert resolved.gunicorn_sources == {
        "worker_connections": "environment (MICROSVC_SET)",
        "backlog": "environment (MICROSVC_SET)",
    }


def test_passthrough_precedence_explicit_over_environment_over_config() -> None:
    cfg = ConfigFile(path=CONFIG_PATH, gunicorn={"backlog": 10, "worker_connections": 10})
    resolved = resolve(
        {},
        {"MICROSVC_SET": "backlog=20 worker_connections=20"},
        cfg,
        gunicorn={"worker_connections": 30},
    )
    assert resolved.gunicorn == {"backlog": "20", "worker_connections": 30}
    assert resolved.gunicorn_sources == {
        "backlog": "environment (MICROSVC_SET)",
        "worker_connections": "command line",
    }


def test_microsvc_set_bad_entry() -> None:
    with pytest.raises(UsageError, match="MICROSVC_SET: 'backlog' is not NAME=VALUE"):
        resolve({}, {"MICROSVC_SET": "backlog"})


def test_parse_assignments() -> None:
    assert parse_assignments(["worker-connections=5", " backlog =a=b", "x="], "--set") == {
        "worker_connections": "5",
        "backlog": "a=b",
        "x": "",
    }
    with pytest.raises(UsageError, match="--set: '=5' is not NAME=VALUE"):
        parse_assignments(["=5"], "--set")


def test_defaults_table_matches_settings() -> None:
    assert Settings(**DEFAULTS) == Settings()
