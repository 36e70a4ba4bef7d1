"""The option registry in microsvc.config.options, and the public names of the package."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
import typing
from dataclasses import fields
from pathlib import Path

import pytest

import microsvc
from microsvc.config.keywords import LauncherOptions
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


# --- the typed keyword options of Launcher ------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def _members(hint: object) -> set[object]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set(typing.get_args(hint))
    return {hint}


def _accepted(settings_hint: object) -> set[object]:
    """What a keyword option accepts: the option's own type, or text (as its MICROSVC_*
    variable gives it); a list or tuple where the option holds a tuple."""
    accepted: set[object] = {str}
    for member in _members(settings_hint):
        if typing.get_origin(member) is typing.Literal:
            continue  # "auto": text
        if member == tuple[str, ...]:
            accepted |= {list[str], tuple[str, ...]}
        else:
            accepted.add(member)
    return accepted


def test_launcher_options_are_the_registry() -> None:
    keywords = typing.get_type_hints(LauncherOptions)
    settings = typing.get_type_hints(Settings)
    assert list(keywords) == FIELD_NAMES
    assert LauncherOptions.__total__ is False
    for name in FIELD_NAMES:
        assert _members(keywords[name]) == _accepted(settings[name]), name


def test_launcher_options_are_public() -> None:
    assert microsvc.LauncherOptions is LauncherOptions
    assert "LauncherOptions" in microsvc.__all__


@pytest.mark.timeout(300)  # a cold mypy cache, on a busy machine
def test_a_type_checker_refuses_a_misspelt_or_mistyped_option(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    snippet = tmp_path / "uses_launcher.py"
    snippet.write_text(
        textwrap.dedent(
            """\
            from microsvc import Launcher, WorkerClass
            Launcher("pkg.mod:app", workers=3, worker_class=WorkerClass.GEVENT, bind=["a:1"])
            Launcher("pkg.mod:app", workers="auto", memory_per_worker="256MiB", preload=True)
            Launcher("pkg.mod:app", wokers=3)
            Launcher("pkg.mod:app", workers=[3])
            """
        )
    )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--no-error-summary", "--follow-imports=silent"),
            *("--cache-dir", str(tmp_path / "mypy-cache"), str(snippet)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    errors = [line for line in result.stdout.splitlines() if ": error: " in line]
    assert [line.split(":")[1] for line in errors] == ["4", "5"], result.stdout + result.stderr
    assert 'Unexpected keyword argument "wokers"' in errors[0]
    assert 'Argument "workers" to "Launcher" has incompatible type' in errors[1]
