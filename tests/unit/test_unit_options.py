"""The option registry in microsvc.config.options, and the public names of the package."""

from __future__ import annotations

from dataclasses import fields

import pytest

import microsvc
from microsvc.config.options import (
    DEFAULTS,
    GUNICORN_NAMES,
    OPTIONS,
    OPTIONS_BY_NAME,
    LogLevel,
    OptionSpec,
    Settings,
    WorkerClass,
)
from microsvc.config.resolve import gunicorn_setting_names

FIELD_NAMES = [f.name for f in fields(Settings)]


def test_every_field_has_an_option_spec() -> None:
    for f in fields(Settings):
        assert isinstance(f.metadata.get("option"), OptionSpec), f.name
    assert [spec.name for spec in OPTIONS] == FIELD_NAMES
    assert list(OPTIONS_BY_NAME) == FIELD_NAMES


@pytest.mark.parametrize("spec", OPTIONS, ids=lambda spec: spec.name)
def test_spec_has_flag_help_and_envvar(spec: OptionSpec) -> None:
    assert spec.flag.startswith("--")
    assert spec.flag == "--" + spec.name.replace("_", "-")
    assert spec.flag in spec.flags
    assert all(flag.startswith("-") for flag in spec.flags)
    assert spec.help.strip()
    assert spec.envvar == "MICROSVC_" + spec.name.upper()


def test_flags_are_unique() -> None:
    flags = [flag for spec in OPTIONS for flag in spec.flags]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("name", FIELD_NAMES)
def test_default_round_trips_through_its_parser(name: str) -> None:
    default = DEFAULTS[name]
    assert OPTIONS_BY_NAME[name].parse(default) == default
    assert getattr(Settings(), name) == default


def test_choices_are_the_enum_values() -> None:
    assert OPTIONS_BY_NAME["worker_class"].choices == ("sync", "gthread", "gevent", "eventlet")
    assert OPTIONS_BY_NAME["log_level"].choices == tuple(level.value for level in LogLevel)
    for choice in OPTIONS_BY_NAME["worker_class"].choices:
        assert OPTIONS_BY_NAME["worker_class"].parse(choice) is WorkerClass(choice)
    with pytest.raises(ValueError, match="is not one of sync, gthread, gevent, eventlet"):
        OPTIONS_BY_NAME["worker_class"].parse("tornado")


def test_flag_options_parse_booleans() -> None:
    flag_options = [spec for spec in OPTIONS if spec.is_flag]
    assert {spec.name for spec in flag_options} == {"preload", "reload", "metrics", "autoscale"}
    for spec in flag_options:
        assert spec.parse("true") is True
        assert isinstance(DEFAULTS[spec.name], bool)


def test_gunicorn_names_are_real_gunicorn_settings() -> None:
    known = gunicorn_setting_names()
    for gunicorn_name, option in GUNICORN_NAMES.items():
        assert gunicorn_name in known, gunicorn_name
        assert OPTIONS_BY_NAME[option].gunicorn == gunicorn_name
    assert GUNICORN_NAMES["keepalive"] == "keep_alive"
    assert GUNICORN_NAMES["preload_app"] == "preload"


@pytest.mark.parametrize("name", microsvc.__all__)
def test_public_names_resolve(name: str) -> None:
    assert getattr(microsvc, name) is not None


def test_lazy_names_are_the_launcher_objects() -> None:
    from microsvc.serving import launcher

    assert microsvc.Launcher is launcher.Launcher
    assert issubclass(microsvc.UnpatchedAppWarning, RuntimeWarning)


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        microsvc.Nope  # noqa: B018
