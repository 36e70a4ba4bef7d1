"""A configuration gunicorn would refuse is refused at start, with one `Error: ` line and
exit 2, by microsvc's own checks (which agree with gunicorn's) or gunicorn's final
validation of the whole configuration; `--set chdir` must name a directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.cli.conftest import Microsvc


def h2_installed() -> bool:
    from gunicorn.http2 import is_http2_available

    return bool(is_http2_available())


@pytest.mark.parametrize("command", ["run", "plan"])
def test_h2_without_the_h2_package_is_refused(microsvc: Microsvc, bind: str, command: str) -> None:
    if h2_installed():
        pytest.skip("the h2 package is installed")
    args = ["--set", "http_protocols=h2,h1"] + (["-b", bind] if command == "run" else [])
    microsvc(command, *args).assert_error(2, "http_protocols", "h2 package is not installed")


@pytest.mark.parametrize(
    ("args", "env", "where"),
    [
        (["--forwarded-allow-ips", "127.0.0.1,10.0.0.1/8"], {}, "--forwarded-allow-ips"),
        ([], {"MICROSVC_FORWARDED_ALLOW_IPS": "fd00::1/8"}, "MICROSVC_FORWARDED_ALLOW_IPS"),
    ],
    ids=["flag", "environment"],
)
def test_a_network_with_host_bits_names_the_option(
    microsvc: Microsvc, bind: str, args: list[str], env: dict[str, str], where: str
) -> None:
    result = microsvc("run", *args, "-b", bind, env=env)
    result.assert_error(2, where, "has host bits set; the network is")


def test_a_network_with_host_bits_in_the_config_file_names_the_file(
    microsvc: Microsvc, bind: str, tmp_path: Path
) -> None:
    (tmp_path / "conf.py").write_text("forwarded_allow_ips = ['10.0.0.1/8']\n")
    result = microsvc("run", "-c", "conf.py", "-b", bind)
    result.assert_error(2, "forwarded_allow_ips in conf.py", "the network is 10.0.0.0/8")


def test_chdir_that_does_not_exist_is_refused(microsvc: Microsvc, bind: str) -> None:
    microsvc("run", "--set", "chdir=no/such/dir", "-b", bind).assert_error(
        2, "chdir", "no/such/dir"
    )


def test_plan_shows_chdir_as_an_absolute_directory(microsvc: Microsvc, tmp_path: Path) -> None:
    (tmp_path / "service").mkdir()
    result = microsvc("plan", "--json", "--set", "chdir=service", "--set", "pythonpath=lib")
    assert result.returncode == 0, result.describe()

    passed = json.loads(result.stdout)["gunicorn_settings"]
    assert passed["chdir"]["value"] == str(tmp_path / "service"), result.describe()
    assert passed["pythonpath"]["value"] == "lib", result.describe()
