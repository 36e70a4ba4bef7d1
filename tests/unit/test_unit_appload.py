"""microsvc.serving.appload: app import strings, loading the app, and the pre-flight child check."""

from __future__ import annotations

import importlib
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from microsvc.errors import AppImportError, AppLoadError, UsageError
from microsvc.planning.plan import SystemFacts
from microsvc.serving.appload import (
    check_in_subprocess,
    load_app,
    measure_in_subprocess,
    measured_facts,
    parse_app_string,
)

WSGI = "def app(environ, start_response):\n    return [b'ok']\n"


def unique(prefix: str = "msvc_unit") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., str]]:
    """Write a module (or `pkg/mod.py`) under tmp_path, importable; forget it afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str, name: str | None = None) -> str:
        name = name or unique()
        path = tmp_path.joinpath(*name.split(".")).with_suffix(".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in path.relative_to(tmp_path).parents:
            if parent != Path("."):
                (tmp_path / parent / "__init__.py").touch()
        path.write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        written.append(name.split(".")[0])
        return name

    yield write
    for top in written:
        for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[loaded]


# --- parse_app_string ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "module"),
    [
        ("mod", "mod"),
        ("mod:app", "mod"),
        ("pkg.mod:create_app()", "pkg.mod"),
        ("mod:make('x', debug=True)", "mod"),
        ("mod:obj.wsgi_app", "mod"),
        ("mod:factory(1, [2, 3], {'a': None}, name=-1.5)", "mod"),
        ("  mod:app  ", "mod"),
    ],
)
def test_parse_app_string_accepts(text: str, module: str) -> None:
    ref = parse_app_string(text)
    assert ref.module == module
    assert str(ref) == text


def test_parse_app_string_without_expression() -> None:
    assert parse_app_string("pkg.mod").expression is None
    assert parse_app_string("pkg.mod:app").expression is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (":app", "not an app import string"),
        ("", "not an app import string"),
        ("bad-name:app", "not an app import string"),
        ("pkg..mod:app", "not an app import string"),
        ("1mod:app", "not an app import string"),
        ("mod:1+2", "put a name or a call"),
        ("mod:app[0]", "put a name or a call"),
        ("mod:'app'", "put a name or a call"),
        ("mod:f(x)", "factory arguments must be literals"),
        ("mod:f(debug=x)", "factory arguments must be literals"),
        ("mod:f(*args)", "factory arguments must be literals"),
        ("mod:app(", "is not a name or a call"),
        ("mod:a b", "is not a name or a call"),
    ],
)
def test_parse_app_string_rejects(text: str, message: str) -> None:
    with pytest.raises(AppImportError, match=message):
        parse_app_string(text)


def test_app_import_error_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_app_string("bad-name")


@pytest.mark.parametrize("text", ["mod:make({[]: 1})", "mod:make({1, []})"])
def test_parse_app_string_rejects_unhashable_literals_cleanly(text: str) -> None:
    with pytest.raises(AppImportError):
        parse_app_string(text)


# --- load_app --------------------------------------------------------------------------


def test_load_named_attribute(write_module: Callable[..., str]) -> None:
    name = write_module(WSGI + "other = app\n")
    module = sys.modules.get(name)
    assert module is None
    app = load_app(parse_app_string(f"{name}:other"))
    assert app is sys.modules[name].app


def test_load_nested_attribute(write_module: Callable[..., str]) -> None:
    name = write_module(WSGI + "class Holder:\n    wsgi = staticmethod(app)\n")
    assert load_app(parse_app_string(f"{name}:Holder.wsgi")) is sys.modules[name].app


def test_default_name_app(write_module: Callable[..., str]) -> None:
    name = write_module(WSGI + "application = lambda e, s: []\n")
    assert load_app(parse_app_string(name)) is sys.modules[name].app


def test_default_name_application(write_module: Callable[..., str]) -> None:
    name = write_module("def application(environ, start_response):\n    return []\n")
    assert load_app(parse_app_string(name)) is sys.modules[name].application


def test_default_name_skips_a_non_callable_app(write_module: Callable[..., str]) -> None:
    name = write_module("app = 'not callable'\ndef application(e, s):\n    return []\n")
    assert load_app(parse_app_string(name)) is sys.modules[name].application


def test_no_default_name(write_module: Callable[..., str]) -> None:
    name = write_module("wsgi = None\n")
    with pytest.raises(AppImportError, match="has no 'app' or 'application'"):
        load_app(parse_app_string(name))


def test_missing_attribute(write_module: Callable[..., str]) -> None:
    name = write_module(WSGI)
    with pytest.raises(AppImportError, match=f"'{name}' has no attribute 'missing'"):
        load_app(parse_app_string(f"{name}:missing"))


def test_missing_nested_attribute(write_module: Callable[..., str]) -> None:
    name = write_module(WSGI)
    with pytest.raises(AppImportError, match=f"'{name}.app' has no attribute 'nope'"):
        load_app(parse_app_string(f"{name}:app.nope"))


def test_not_callable(write_module: Callable[..., str]) -> None:
    name = write_module("app = 42\n")
    with pytest.raises(AppImportError, match="is a int, not a WSGI callable"):
        load_app(parse_app_string(f"{name}:app"))


def test_factory_not_callable(write_module: Callable[..., str]) -> None:
    name = write_module("create_app = 42\n")
    with pytest.raises(AppImportError, match="'create_app' is not callable"):
        load_app(parse_app_string(f"{name}:create_app()"))


def test_factory_returning_non_callable(write_module: Callable[..., str]) -> None:
    name = write_module("def create_app():\n    return None\n")
    with pytest.raises(AppImportError, match="is a NoneType, not a WSGI callable"):
        load_app(parse_app_string(f"{name}:create_app()"))


def test_factory_in_a_package_with_literal_arguments(write_module: Callable[..., str]) -> None:
    top = unique()
    write_module(
        """
        def make(label, debug=False):
            def app(environ, start_response):
                return [label.encode()]
            app.args = (label, debug)
            return app
        """,
        name=f"{top}.mod",
    )
    app = load_app(parse_app_string(f"{top}.mod:make('x', debug=True)"))
    assert app.args == ("x", True)  # type: ignore[attr-defined]


def test_factory_double_star_arguments_are_rejected() -> None:
    # A **mapping would be easy to drop silently; it is refused with a hint instead.
    with pytest.raises(AppImportError, match="name=value"):
        parse_app_string("mod:make(**{'debug': True})")


def test_missing_module() -> None:
    name = unique()
    with pytest.raises(AppImportError, match=f"cannot import '{name}': no module named '{name}'"):
        load_app(parse_app_string(f"{name}:app"))


def test_missing_submodule(write_module: Callable[..., str]) -> None:
    top = unique()
    write_module(WSGI, name=f"{top}.real")
    with pytest.raises(AppImportError, match=f"no module named '{top}.missing'"):
        load_app(parse_app_string(f"{top}.missing:app"))


def test_module_raising_at_import(write_module: Callable[..., str]) -> None:
    name = write_module("x = 1\ny = x / 0\n")
    with pytest.raises(AppLoadError) as info:
        load_app(parse_app_string(f"{name}:app"))
    message = str(info.value)
    assert f"importing '{name}' raised ZeroDivisionError: division by zero" in message
    assert f"{name}.py:2)" in message
    assert not isinstance(info.value, AppImportError)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_factory_that_raises(write_module: Callable[..., str]) -> None:
    name = write_module("def create_app():\n    raise RuntimeError('no database')\n")
    with pytest.raises(AppLoadError) as info:
        load_app(parse_app_string(f"{name}:create_app()"))
    message = str(info.value)
    assert "the factory raised RuntimeError: no database" in message
    assert f"{name}.py:2)" in message


def test_module_importing_a_missing_dependency(write_module: Callable[..., str]) -> None:
    dependency = unique("msvc_unit_missing_dep")
    name = write_module(f"import json\nimport {dependency}\n" + WSGI)
    with pytest.raises(AppLoadError) as info:
        load_app(parse_app_string(name))
    assert not isinstance(info.value, AppImportError)
    message = str(info.value)
    assert f"No module named '{dependency}'" in message
    assert f"{name}.py:2)" in message


# --- check_in_subprocess ---------------------------------------------------------------


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    monkeypatch.chdir(tmp_path)

    def write(source: str) -> str:
        name = unique()
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


def test_check_in_subprocess_good_module(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp("print('chatter from the app')\n" + WSGI)
    check_in_subprocess(parse_app_string(f"{name}:app"))
    assert name not in sys.modules


def test_check_in_subprocess_module_that_raises(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp("y = 1 / 0\n")
    with pytest.raises(AppLoadError, match=f"ZeroDivisionError: division by zero .*{name}.py:1"):
        check_in_subprocess(parse_app_string(f"{name}:app"))


def test_check_in_subprocess_missing_attribute(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp(WSGI)
    with pytest.raises(AppImportError, match="has no attribute 'nope'"):
        check_in_subprocess(parse_app_string(f"{name}:nope"))


def test_check_in_subprocess_child_that_exits(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp("import os\nos._exit(3)\n")
    with pytest.raises(AppLoadError, match="ended its process with status 3"):
        check_in_subprocess(parse_app_string(name))


def test_check_in_subprocess_reports_when_loaded_not_at_exit(in_tmp: Callable[[str], str]) -> None:
    """A non-daemon thread started at import would keep the child from exiting."""
    name = in_tmp(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,)).start()\n" + WSGI
    )
    check_in_subprocess(parse_app_string(f"{name}:app"), timeout=60)


def test_check_in_subprocess_ignores_what_the_app_prints(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp(
        "import atexit\natexit.register(print, '\\nAppImportError\\tfrom the app')\n"
        "print('AppLoadError\\tfrom the app too')\n" + WSGI
    )
    check_in_subprocess(parse_app_string(f"{name}:app"))


def test_check_in_subprocess_time_limit(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp("import time\ntime.sleep(600)\n" + WSGI)
    with pytest.raises(AppLoadError, match=r"did not finish within 0.5 s"):
        check_in_subprocess(parse_app_string(f"{name}:app"), timeout=0.5)


def test_check_in_subprocess_environment_directory_and_path(
    tmp_path: Path, in_tmp: Callable[[str], str]
) -> None:
    """The child gets the workers' environment variables, working directory and path."""
    elsewhere = tmp_path / "elsewhere"
    libs = tmp_path / "libs"
    elsewhere.mkdir()
    libs.mkdir()
    helper = unique("helper")
    (libs / f"{helper}.py").write_text("VALUE = 1\n")
    name = unique()
    (elsewhere / f"{name}.py").write_text(
        f"import os\nimport {helper}\nassert os.environ['MSVC_UNIT_NEEDED'] == 'yes'\n"
        "assert os.path.basename(os.getcwd()) == 'elsewhere'\n" + WSGI
    )
    ref = parse_app_string(f"{name}:app")
    with pytest.raises(AppImportError, match="no module named"):
        check_in_subprocess(ref)
    check_in_subprocess(
        ref, env={"MSVC_UNIT_NEEDED": "yes"}, cwd=str(elsewhere), pythonpath=[str(libs)]
    )


def test_syntax_error_is_an_app_load_error_and_a_syntax_error(
    write_module: Callable[..., str],
) -> None:
    """gunicorn's workers under --reload serve a SyntaxError and watch its file."""
    name = write_module("def app(environ, start_response):\n    return [\n")
    with pytest.raises(AppLoadError) as info:
        load_app(parse_app_string(f"{name}:app"))
    assert isinstance(info.value, SyntaxError)
    assert info.value.filename is not None and info.value.filename.endswith(f"{name}.py")
    assert str(info.value) == (
        f"importing {name!r} raised SyntaxError: '[' was never closed ({name}.py, line 2)"
    )


# --- measuring the app's memory (plan --measure, --memory-per-worker auto) ---------------

#: Keeps about 40 MB of its own at import (written, so resident and private).
HEAVY = "KEPT = bytearray(40 * 1000 * 1000)\nKEPT[::4096] = b'x' * len(KEPT[::4096])\n" + WSGI


def test_measure_reads_the_memory_the_import_added(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp(HEAVY)
    memory = measure_in_subprocess(parse_app_string(f"{name}:app"))
    assert memory.measure == "USS"
    assert 38e6 <= memory.imported <= 60e6, memory
    assert memory.own == memory.after.own >= memory.imported + memory.before.own - 4096
    assert memory.after.pss is not None and memory.after.rss >= memory.own
    assert memory.as_dict()["own"] == memory.own
    assert memory.describe().startswith("app memory after import: own (USS) ")
    assert name not in sys.modules


def test_measured_facts_carry_the_apps_own_memory(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp(HEAVY)
    facts, memory = measured_facts(parse_app_string(f"{name}:app"), SystemFacts(host_cpus=2))
    assert (facts.host_cpus, facts.app_memory) == (2, memory.own)
    assert facts.app_memory_source == "own memory (USS) of a process that imported the app"


def test_measure_raises_the_apps_error(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp("raise RuntimeError('no database')\n")
    with pytest.raises(AppLoadError, match="no database"):
        measure_in_subprocess(parse_app_string(f"{name}:app"))


def test_the_check_alone_measures_nothing(in_tmp: Callable[[str], str]) -> None:
    name = in_tmp(WSGI)
    assert check_in_subprocess(parse_app_string(f"{name}:app")) is None
