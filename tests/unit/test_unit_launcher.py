"""Launcher construction: validation, warnings and the gunicorn settings it produces.
Nothing here runs the arbiter; tests/e2e does."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest

from microsvc import Launcher, UnpatchedAppWarning, UsageError, WorkerClass
from microsvc.config.resolve import COMMAND_LINE
from microsvc.planning.plan import SystemFacts
from microsvc.serving.context import settings_of

FACTS = SystemFacts(host_cpus=4, affinity_cpus=4)


def wsgi_app(environ: object, start_response: object) -> list[bytes]:
    return [b"ok"]


def make(app: object = "microsvc.demo:app", **options: object) -> Launcher:
    return Launcher(app, environ={}, facts=FACTS, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("worker_class", ["gevent", "eventlet"])
def test_app_object_for_a_patching_class_warns_once(worker_class: str) -> None:
    with pytest.warns(UnpatchedAppWarning, match="import string") as record:
        make(wsgi_app, worker_class=worker_class)
    assert len(record) == 1


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_app_object_for_a_plain_class_does_not_warn(worker_class: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make(wsgi_app, worker_class=worker_class)


def test_import_string_for_gevent_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make("microsvc.demo:app", worker_class="gevent")


def test_unknown_option_lists_valid_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown option 'wokers'.*valid options:.*workers"):
        make(wokers=3)


def test_gunicorn_setting_given_as_option_points_to_gunicorn_settings() -> None:
    with pytest.raises(UsageError, match="gunicorn_settings"):
        make(worker_connections=10)


def test_bad_value_raises_instead_of_exiting() -> None:
    with pytest.raises(UsageError, match="workers"):
        make(workers=0)


def test_not_an_app_raises() -> None:
    with pytest.raises(UsageError, match="WSGI callable or an import string"):
        make(42)


def test_cfg_follows_the_plan() -> None:
    launcher = make(worker_class="sync")
    assert launcher.plan.workers == 9  # 2*4+1
    assert launcher.cfg.workers == 9
    assert launcher.cfg.worker_class_str == "microsvc.workers.sync.EngineSyncWorker"
    assert launcher.cfg.bind == ["127.0.0.1:5000"]


def test_gthread_accepts_only_what_its_threads_can_serve() -> None:
    launcher = make(worker_class="gthread", threads=6, http_engine="gunicorn")
    assert launcher.cfg.threads == 6
    assert launcher.cfg.worker_connections == 6
    assert launcher.cfg.worker_class_str == "microsvc.workers.gthread.BalancedThreadWorker"


def test_gthread_on_the_engine_keeps_room_for_idle_connections() -> None:
    launcher = make(worker_class="gthread", threads=6)
    assert launcher.cfg.worker_connections == 1000  # gunicorn's default: parked ones
    assert launcher.cfg.worker_class_str == "microsvc.workers.gthread.EngineThreadWorker"


@pytest.mark.parametrize(
    ("worker_class", "engine", "path"),
    [
        ("sync", "microsvc", "microsvc.workers.sync.EngineSyncWorker"),
        ("sync", "gunicorn", "microsvc.workers.sync.SyncWorker"),
        ("gevent", "microsvc", "microsvc.workers.gevent.EngineGeventWorker"),
        ("gevent", "gunicorn", "microsvc.workers.gevent.GeventWorker"),
        ("eventlet", "microsvc", "microsvc.workers.eventlet.EngineEventletWorker"),
        ("eventlet", "gunicorn", "microsvc.workers.eventlet.EventletWorker"),
    ],
)
def test_the_http_engine_picks_the_worker_class(worker_class: str, engine: str, path: str) -> None:
    assert make(worker_class=worker_class, http_engine=engine).cfg.worker_class_str == path


@pytest.mark.parametrize(
    "setting",
    [
        {"proxy_protocol": "v1"},
        {"protocol": "uwsgi"},
        {"permit_obsolete_folding": True},
        {"header_map": "dangerous"},
        {"casefold_http_method": True},
        {"http_parser": "fast"},
    ],
)
def test_settings_the_engine_cannot_honour_are_refused(setting: dict[str, Any]) -> None:
    name = next(iter(setting))
    with pytest.raises(UsageError, match=f"{name}=.*--http-engine gunicorn"):
        make(gunicorn_settings=setting)
    make(gunicorn_settings=setting, http_engine="gunicorn")  # gunicorn's engine takes them


def test_gthread_worker_connections_can_be_passed_through() -> None:
    launcher = make(worker_class="gthread", gunicorn_settings={"worker_connections": 100})
    assert launcher.cfg.worker_connections == 100


def test_the_python_http_parser_unless_asked_otherwise() -> None:
    # gunicorn's `auto` would pick up any installed gunicorn_h1c without a word.
    assert make().cfg.http_parser == "python"
    fast = make(gunicorn_settings={"http_parser": "fast"}, http_engine="gunicorn")
    assert fast.cfg.http_parser == "fast"


def test_eventlet_uses_microsvcs_worker() -> None:
    assert make(worker_class="eventlet").cfg.worker_class_str == (
        "microsvc.workers.eventlet.EngineEventletWorker"
    )


def test_each_instance_gets_its_own_control_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/tmp")
    path = make().cfg.control_socket
    assert path.startswith("/tmp/microsvc-") and path.endswith(".ctl")
    assert path != "/tmp/gunicorn.ctl"


def test_options_map_to_gunicorn_names() -> None:
    launcher = make(
        keep_alive=7,
        preload=True,
        log_level="warning",
        access_log="-",
        max_requests=10,
        max_requests_jitter=3,
        timeout=11,
        graceful_timeout=12,
    )
    cfg = launcher.cfg
    assert (cfg.keepalive, cfg.preload_app, cfg.loglevel, cfg.accesslog) == (
        7,
        True,
        "warning",
        "-",
    )
    assert (cfg.max_requests, cfg.max_requests_jitter) == (10, 3)
    assert (cfg.timeout, cfg.graceful_timeout) == (11, 12)


def test_request_limits_and_proxy_trust_reach_gunicorn() -> None:
    cfg = make(
        limit_request_line=100,
        limit_request_fields=10,
        limit_request_field_size=200,
        forwarded_allow_ips="10.0.0.0/8,192.168.1.1",
    ).cfg
    assert (cfg.limit_request_line, cfg.limit_request_fields) == (100, 10)
    assert cfg.limit_request_field_size == 200
    assert cfg.forwarded_allow_ips == ["10.0.0.0/8", "192.168.1.1"]


def test_default_trust_is_loopback_only() -> None:
    assert make().cfg.forwarded_allow_ips == ["127.0.0.1", "::1"]


def test_heartbeat_files_live_in_ram_when_possible() -> None:
    from microsvc.serving.launcher import HEARTBEAT_DIR

    cfg = make().cfg
    if HEARTBEAT_DIR is None:
        pytest.skip("no /dev/shm on this machine")
    assert cfg.worker_tmp_dir == "/dev/shm"
    assert make(gunicorn_settings={"worker_tmp_dir": "/tmp"}).cfg.worker_tmp_dir == "/tmp"


def test_user_post_worker_init_hook_still_runs() -> None:
    calls: list[object] = []
    launcher = make(gunicorn_settings={"post_worker_init": lambda worker: calls.append(worker)})
    booted = launcher.state.booted
    launcher.cfg.post_worker_init("worker")
    assert calls == ["worker"]
    assert launcher.state.booted == booted + 1


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"health_path": "/x", "ready_path": "/x"}, "both /x"),
        ({"max_worker_lifetime_jitter": "5m"}, "needs max_worker_lifetime="),
        ({"threads": 8, "worker_class": "sync"}, r"threads=8 .*needs worker_class='gthread'"),
    ],
)
def test_contradicting_options_are_refused(options: dict[str, object], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        make(**options)


def test_command_line_callers_get_flags_in_errors() -> None:
    with pytest.raises(UsageError, match=r"^--threads 8 \(command line\) needs --worker-class"):
        make(caller=COMMAND_LINE, threads=8, worker_class=WorkerClass.SYNC)


def test_everything_comes_from_one_immutable_configuration() -> None:
    launcher = make(worker_class="gthread", threads=3, gunicorn_settings={"backlog": 64})
    configuration = launcher.configuration
    assert launcher.settings is configuration.settings
    assert launcher.plan is configuration.plan
    assert launcher.cfg.threads == configuration.gunicorn["threads"] == 3
    assert launcher.cfg.backlog == configuration.passthrough["backlog"] == 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        configuration.plan = configuration.plan  # type: ignore[misc]
    with pytest.raises(TypeError):
        configuration.gunicorn["workers"] = 1  # type: ignore[index]


def test_workers_read_the_settings_of_the_launcher_they_serve() -> None:
    launcher = make(max_worker_memory="300MB")
    settings = settings_of(launcher)  # a worker or the arbiter passes its `.app`
    assert settings is launcher.settings
    assert settings is not None and settings.max_worker_memory == 300 * 1000**2
    # A microsvc worker class under another gunicorn application has no settings.
    assert settings_of(wsgi_app) is None
    assert settings_of(None) is None


def test_the_app_sits_behind_health_and_readiness() -> None:
    launcher = make(wsgi_app)
    app = launcher.load()
    statuses: list[str] = []

    def start_response(status: str, headers: object, exc_info: object = None) -> None:
        statuses.append(status)

    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/readyz"}, start_response))
    assert statuses[-1].startswith("503") and b"not ready" in body  # not started yet
    launcher.state.ready = True
    app({"REQUEST_METHOD": "GET", "PATH_INFO": "/readyz"}, start_response)
    assert statuses[-1].startswith("200")
    assert app({"REQUEST_METHOD": "GET", "PATH_INFO": "/other"}, start_response) == [b"ok"]


@pytest.mark.parametrize(
    ("options", "every_request"),
    [
        ({}, False),
        ({"metrics": True}, False),  # the histogram is a sample
        ({"access_log": "-"}, True),
        ({"max_queue_time": 1.0}, True),
    ],
)
def test_queue_time_is_sampled_unless_an_access_log_or_shedding_needs_every_request(
    options: dict[str, object], every_request: bool
) -> None:
    from microsvc.serving import middleware

    app = make(wsgi_app, **options).load()
    assert isinstance(app, middleware.Middleware)
    expected = 0.0 if every_request else middleware.QUEUE_SAMPLE_INTERVAL
    assert app.queue_sample_interval == expected
