"""Config files: resolve.load_config on gunicorn-style Python files."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from microsvc.config.options import LogLevel, WorkerClass
from microsvc.config.resolve import load_config, resolve_settings
from microsvc.errors import UsageError


def write(tmp_path: Path, source: str, name: str = "microsvc_conf.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_gunicorn_names_map_to_microsvc_options(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        bind = "0.0.0.0:8000"
        workers = 3
        worker_class = "gthread"
        keepalive = 7
        preload_app = True
        loglevel = "debug"
        accesslog = "-"
        """,
    )
    cfg = load_config(path)
    assert cfg.path == path
    assert cfg.options == {
        "bind": "0.0.0.0:8000",
        "workers": 3,
        "worker_class": "gthread",
        "keep_alive": 7,
        "preload": True,
        "log_level": "debug",
        "access_log": "-",
    }
    assert cfg.gunicorn == {}
    assert cfg.unknown == ()

    resolved = resolve_settings({}, {}, cfg)
    settings = resolved.settings
    assert settings.bind == ("0.0.0.0:8000",)
    assert settings.workers == 3
    assert settings.worker_class is WorkerClass.GTHREAD
    assert settings.keep_alive == 7
    assert settings.preload is True
    assert settings.log_level is LogLevel.DEBUG
    assert settings.access_log == "-"
    for name in cfg.options:
        assert resolved.sources[name] == f"config file ({path})"


def test_microsvc_names_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        max_workers = 2
        memory_per_worker = "256MiB"
        keep_alive = 4
        bind = ["127.0.0.1:1", "unix:/tmp/c.sock"]
        """,
    )
    cfg = load_config(path)
    assert cfg.options == {
        "max_workers": 2,
        "memory_per_worker": "256MiB",
        "keep_alive": 4,
        "bind": ["127.0.0.1:1", "unix:/tmp/c.sock"],
    }
    settings = resolve_settings({}, {}, cfg).settings
    assert settings.memory_per_worker == 256 * 1024**2
    assert settings.bind == ("127.0.0.1:1", "unix:/tmp/c.sock")


def test_other_gunicorn_settings_pass_through(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        worker_connections = 500

        def post_fork(server, worker):
            pass
        """,
    )
    cfg = load_config(path)
    assert cfg.options == {}
    assert set(cfg.gunicorn) == {"worker_connections", "post_fork"}
    assert cfg.gunicorn["worker_connections"] == 500
    assert callable(cfg.gunicorn["post_fork"])

    resolved = resolve_settings({}, {}, cfg)
    assert resolved.gunicorn["worker_connections"] == 500
    assert resolved.gunicorn["post_fork"] is cfg.gunicorn["post_fork"]
    assert resolved.gunicorn_sources == {
        "worker_connections": f"config file ({path})",
        "post_fork": f"config file ({path})",
    }


def test_hook_with_wrong_arity_is_rejected_by_gunicorn(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "def post_fork(server):\n    pass\n"))
    with pytest.raises(UsageError, match="invalid value for gunicorn setting 'post_fork'"):
        resolve_settings({}, {}, cfg)


def test_modules_private_names_and_helpers_are_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        import json
        import os.path
        from os import path as ospath
        import multiprocessing as _mp

        _private = 42
        __also_private__ = "x"

        def helper():
            return 2

        class Thing:
            pass

        workers = helper()
        """,
    )
    cfg = load_config(path)
    assert cfg.options == {"workers": 2}
    assert cfg.gunicorn == {}
    assert cfg.unknown == ()


def test_unknown_plain_names_become_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, 'colour = "blue"\nanswer = 42\nworkers = 2\n')
    cfg = load_config(path)
    assert cfg.unknown == ("answer", "colour")
    resolved = resolve_settings({}, {}, cfg)
    assert resolved.settings.workers == 2
    assert resolved.warnings == (
        f"config file {path}: ignoring 'answer', an unknown name",
        f"config file {path}: ignoring 'colour', an unknown name",
    )


def test_the_file_runs_as_python(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        base = 8000
        bind = ":%d" % (base + 1)
        assert __name__ == "__microsvc_config__"
        """,
    )
    cfg = load_config(path)
    assert cfg.options == {"bind": ":8001"}
    assert cfg.unknown == ("base",)


def test_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 2\nbind = (\n")
    with pytest.raises(UsageError, match="syntax error on line 2") as info:
        load_config(path)
    assert path in str(info.value)


def test_file_that_raises(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 2\nraise RuntimeError('boom')\n")
    with pytest.raises(UsageError, match="raised RuntimeError: boom"):
        load_config(path)


def test_file_with_a_failing_import(tmp_path: Path) -> None:
    path = write(tmp_path, "import microsvc_unit_no_such_module\n")
    with pytest.raises(UsageError, match="raised ModuleNotFoundError"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.py")
    with pytest.raises(UsageError, match="does not exist"):
        load_config(path)


def test_directory_is_not_a_config_file(tmp_path: Path) -> None:
    (tmp_path / "conf.py").mkdir()
    with pytest.raises(UsageError, match="does not exist"):
        load_config(str(tmp_path / "conf.py"))


@pytest.mark.parametrize("name", ["gunicorn.conf", "settings.toml", "conf.pyc"])
def test_non_python_file(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, "workers = 2\n", name=name)
    with pytest.raises(UsageError, match=r"is not a Python file \(\*\.py\)"):
        load_config(path)


def test_names_microsvc_manages_are_warned_about_as_such(tmp_path: Path) -> None:
    path = write(tmp_path, "daemon = True\n")
    resolved = resolve_settings({}, {}, load_config(path))
    assert resolved.warnings == (f"config file {path}: ignoring 'daemon', which microsvc manages",)
    assert "daemon" not in resolved.gunicorn
