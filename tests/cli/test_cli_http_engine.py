"""`--http-engine`: microsvc's engine by default, gunicorn's on request (flag, environment,
config file), said by `plan`; a gunicorn setting the engine cannot honour is one error
line with exit 2."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import pytest

from microsvc.http import BUILD

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc


def test_plan_says_the_engine_and_microsvc_is_the_default(microsvc: Microsvc) -> None:
    result = microsvc("plan")
    assert result.returncode == 0, result.describe()
    report = json.loads(microsvc("plan", "--json").stdout)
    assert report["http_engine"] == "microsvc"
    build = report["http_engine_build"]
    assert build == f"microsvc ({BUILD.describe()})"
    assert f"http engine: {build}" in result.stdout.splitlines(), result.describe()
    assert report["settings"]["http_engine"] == {"value": "microsvc", "source": "default"}


@pytest.mark.parametrize(
    ("args", "env", "source"),
    [
        (["--http-engine", "gunicorn"], {}, "command line"),
        (["--http-engine", "GUNICORN"], {}, "command line"),
        ([], {"MICROSVC_HTTP_ENGINE": "gunicorn"}, "MICROSVC_HTTP_ENGINE"),
    ],
)
def test_gunicorns_engine_on_request(
    microsvc: Microsvc, args: list[str], env: dict[str, str], source: str
) -> None:
    result = microsvc("plan", "--json", *args, env=env)
    assert result.returncode == 0, result.describe()
    report = json.loads(result.stdout)
    assert report["http_engine"] == "gunicorn"
    assert report["http_engine_build"] == "gunicorn"
    assert source in report["settings"]["http_engine"]["source"]


def test_an_unknown_engine_is_a_usage_error(microsvc: Microsvc) -> None:
    microsvc("run", "--http-engine", "bjoern").assert_error(2, "--http-engine", "bjoern")


@pytest.mark.parametrize(
    "setting", ["proxy_protocol=v1", "permit_obsolete_folding=true", "header_map=dangerous"]
)
def test_a_setting_the_engine_cannot_honour_is_refused(microsvc: Microsvc, setting: str) -> None:
    name = setting.partition("=")[0]
    microsvc("run", "--set", setting).assert_error(2, name, "--http-engine gunicorn")
    result = microsvc("plan", "--set", setting, "--http-engine", "gunicorn")
    assert result.returncode == 0, result.describe()
