"""`Launcher`: gunicorn embedded, configured from microsvc's settings and worker plan."""

from __future__ import annotations

import logging
import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from microsvc import middleware, patching
from microsvc._gunicorn import BaseApplication, ConfigError
from microsvc._version import __version__
from microsvc.appload import AppRef, WSGIApp, check_in_subprocess, load_app, parse_app_string
from microsvc.arbiter import MicrosvcArbiter, ServerState
from microsvc.binding import bind_tcp
from microsvc.errors import BindError, MicrosvcError, ServerError, UsageError
from microsvc.options import OPTIONS, LogFormat, Settings, WorkerClass
from microsvc.planning import SystemFacts, WorkerPlan, plan_workers
from microsvc.resolve import Resolved, load_config, resolve_settings
from microsvc.system import read_system_facts
from microsvc.workers import WORKER_CLASSES

if TYPE_CHECKING:
    from microsvc.metrics import MetricsService

DEMO_APP = "microsvc.demo:app"

#: gunicorn's HTTP parser. Its default, `auto`, switches to the C parser (gunicorn_h1c)
#: whenever that package is importable; the only release installable today accepts
#: request lines with repeated spaces that the Python parser refuses, so microsvc uses
#: the Python parser unless `--set http_parser=...` asks otherwise.
HTTP_PARSER = "python"

#: gunicorn's logger_class for --log-format json.
JSON_LOGGER = "microsvc.jsonlog.JsonLogger"

#: Workers touch a heartbeat file every second; on RAM, a slow disk cannot make them look
#: hung to the master.
HEARTBEAT_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


class UnpatchedAppWarning(RuntimeWarning):
    """A gevent/eventlet app object was imported before microsvc could monkey-patch."""


def control_socket_path(pid: int) -> str:
    """A control socket of this instance's own, so instances never unlink each other's."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else Path.home() / ".microsvc"
    return str(base / f"microsvc-{pid}.ctl")


def resolve(
    options: Mapping[str, Any],
    config: str | None,
    gunicorn_settings: Mapping[str, Any] | None,
    environ: Mapping[str, str],
    explicit_source: str,
) -> Resolved:
    return resolve_settings(
        options,
        environ,
        load_config(config) if config else None,
        explicit_source=explicit_source,
        gunicorn=gunicorn_settings,
    )


def make_plan(resolved: Resolved, facts: SystemFacts | None = None) -> WorkerPlan:
    settings = resolved.settings
    return plan_workers(
        facts or read_system_facts(),
        settings.worker_class,
        workers=settings.workers,
        threads=settings.threads,
        max_workers=settings.max_workers,
        memory_per_worker=settings.memory_per_worker,
        workers_from=resolved.sources["workers"],
    )


def gunicorn_config(
    settings: Settings, plan: WorkerPlan, passthrough: Mapping[str, Any], pid: int
) -> dict[str, Any]:
    """The gunicorn settings for these microsvc settings and plan."""
    config: dict[str, Any] = {}
    for spec in OPTIONS:
        if spec.gunicorn:
            config[spec.gunicorn] = spec.to_gunicorn(getattr(settings, spec.name))
    config.update(
        workers=plan.workers,
        threads=plan.threads,
        worker_class=WORKER_CLASSES[settings.worker_class],
        control_socket=control_socket_path(pid),
        proc_name="microsvc",
        http_parser=HTTP_PARSER,
    )
    if settings.worker_class == WorkerClass.GTHREAD:
        config["worker_connections"] = plan.threads
    if settings.log_format == LogFormat.JSON:
        config["logger_class"] = JSON_LOGGER
    if HEARTBEAT_DIR and os.access(HEARTBEAT_DIR, os.W_OK):
        config["worker_tmp_dir"] = HEARTBEAT_DIR
    config.update(passthrough)
    return config


class Launcher(BaseApplication):  # type: ignore[misc]
    """Gunicorn, configured by microsvc.

    `app` is a WSGI callable, an import string (`pkg.mod:app`, `pkg.mod:create_app()`),
    or None for the demo service. Keyword options are those of `microsvc run`
    (`workers="auto"`, `worker_class="gevent"`, `bind="127.0.0.1:5000"`, ...); any
    other gunicorn setting goes in `gunicorn_settings`. `config` is a gunicorn-style
    Python config file. The environment (`MICROSVC_*`, WEB_CONCURRENCY, HOST, PORT)
    fills what the arguments leave out. Errors raise `microsvc.errors.MicrosvcError`.
    """

    def __init__(
        self,
        app: WSGIApp | str | None = None,
        *,
        config: str | None = None,
        gunicorn_settings: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        facts: SystemFacts | None = None,
        explicit_source: str = "Launcher argument",
        **options: Any,
    ) -> None:
        self._options = dict(options)
        self._config_path = config
        self._gunicorn_settings = dict(gunicorn_settings or {})
        self._environ = dict(os.environ if environ is None else environ)
        self._explicit_source = explicit_source
        self._facts = facts
        self.resolved = resolve(options, config, gunicorn_settings, self._environ, explicit_source)
        self.plan = make_plan(self.resolved, facts)
        self.app_ref: AppRef | None = None
        self.app_object: WSGIApp | None = None
        if app is None or isinstance(app, str):
            self.app_ref = parse_app_string(DEMO_APP if app is None else app)
        elif callable(app):
            self.app_object = app
            self._warn_if_unpatched()
        else:
            raise UsageError(
                f"app must be a WSGI callable or an import string, not {type(app).__name__}"
            )
        self._master_pid = os.getpid()
        self._user_post_worker_init: Any = None
        self.state = ServerState()
        self.metrics: MetricsService | None = None
        super().__init__(prog="microsvc")

    @property
    def settings(self) -> Settings:
        return self.resolved.settings

    def _warn_if_unpatched(self) -> None:
        worker_class = self.settings.worker_class
        if worker_class in patching.PATCHING_CLASSES and not patching.is_patched(worker_class):
            warnings.warn(
                f"the app object was imported before microsvc could monkey-patch for "
                f"{worker_class}, so modules it imported may keep blocking sockets and ssl; "
                f"pass an import string instead, e.g. Launcher('pkg.mod:app', "
                f"worker_class='{worker_class}')",
                UnpatchedAppWarning,
                stacklevel=3,
            )

    # gunicorn's BaseApplication interface

    def do_load_config(self) -> None:
        # gunicorn's version turns every error into sys.exit(1); the library raises instead.
        self.load_default_config()
        self.load_config()

    def load_config(self) -> None:
        config = gunicorn_config(self.settings, self.plan, self.resolved.gunicorn, self._master_pid)
        self._user_post_worker_init = config.get("post_worker_init")
        config["post_worker_init"] = self._post_worker_init
        for name, value in config.items():
            try:
                self.cfg.set(name, value)
            except (AttributeError, ValueError, TypeError, ConfigError) as exc:
                raise UsageError(f"gunicorn setting {name!r}: {exc}") from None

    def _post_worker_init(self, worker: Any) -> None:
        """In each worker once its app is loaded: count it toward readiness."""
        if self.metrics is not None:
            self.metrics.in_worker()
        self.state.worker_booted()
        if self._user_post_worker_init is not None:
            self._user_post_worker_init(worker)

    def worker_recycling(self, kind: str) -> None:
        """In a worker that recycles itself (max-requests, memory, lifetime)."""
        if self.metrics is not None:
            self.metrics.worker_stopping(kind)

    def reload(self) -> None:
        """On HUP: read the config file and environment again, plan again, reconfigure."""
        try:
            resolved = resolve(
                self._options,
                self._config_path,
                self._gunicorn_settings,
                self._environ,
                self._explicit_source,
            )
            plan = make_plan(resolved, self._facts)
        except MicrosvcError as exc:
            logging.getLogger("gunicorn.error").error(
                "Reload kept the running configuration: %s", exc
            )
            return
        before = self.settings
        after = resolved.settings
        if (after.metrics, after.metrics_bind) != (before.metrics, before.metrics_bind):
            logging.getLogger("gunicorn.error").warning(
                "Reload: --metrics and --metrics-bind take effect at the next start; "
                "metrics stay as they were"
            )
        self.resolved, self.plan = resolved, plan
        super().reload()

    def load(self) -> WSGIApp:
        """The app, with health, readiness and proxy trust in front of it."""
        if self.app_object is not None:
            app = self.app_object
        else:
            assert self.app_ref is not None
            app = load_app(self.app_ref)
        settings = self.settings
        wrapped: WSGIApp = middleware.wrap(
            app,
            health_path=settings.health_path,
            ready_path=settings.ready_path,
            is_ready=self.state.is_ready,
            trusted_proxies=settings.forwarded_allow_ips,
        )
        if self.metrics is not None:
            wrapped = self.metrics.instrument(wrapped, app)
        return wrapped

    # running

    def check_binds(self) -> None:
        """Fail with one line before gunicorn retries a busy address for five seconds."""
        for bind in self.settings.bind:
            if bind.startswith("unix:"):
                _check_unix_bind(bind)
            elif bind.startswith("fd://"):
                _check_fd_bind(bind)
            elif not self.cfg.reuse_port:
                _check_tcp_bind(bind)

    def check_paths(self) -> None:
        """Directories gunicorn writes to must exist before workers start."""
        tmp_dir = self.cfg.worker_tmp_dir
        if tmp_dir and not os.path.isdir(tmp_dir):
            raise UsageError(f"worker_tmp_dir {tmp_dir!r} is not a directory")

    def run(self) -> None:
        """Serve until stopped (TERM, INT, QUIT). Returns when the server stops cleanly."""
        self._master_pid = os.getpid()
        worker_class = self.settings.worker_class
        patching.require_extra(worker_class)
        patching.patch(worker_class)
        self.check_binds()
        self.check_paths()
        if self.app_ref is not None and not self.settings.preload:
            check_in_subprocess(self.app_ref)
        if self.settings.metrics:
            from microsvc.metrics import MetricsService

            self.metrics = MetricsService(
                self.settings.metrics_bind, version=__version__, worker_class=worker_class
            )
        try:
            self._serve()
        finally:
            if self.metrics is not None and os.getpid() == self._master_pid:
                self.metrics.close()
                self.metrics = None

    def _serve(self) -> None:
        worker_class = self.settings.worker_class
        try:
            arbiter = MicrosvcArbiter(
                self, self.state, self.settings.drain_period, metrics=self.metrics
            )
            for warning in self.resolved.warnings:
                arbiter.log.warning("%s", warning)
            arbiter.log.info("microsvc %s: %s", __version__, self.plan.summary())
            if worker_class == WorkerClass.EVENTLET:
                arbiter.log.warning(
                    "eventlet is unmaintained and gunicorn dropped its worker; "
                    "microsvc keeps one, but gevent (-k gevent) is the better "
                    "choice"
                )
            if self.metrics is not None:
                self.metrics.start()
                arbiter.log.info("Metrics at %s", self.metrics.url)
            arbiter.run()
        except SystemExit as exc:
            if os.getpid() != self._master_pid:
                raise  # a worker process ending: let it end
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            code = code if 0 <= code <= 255 else 1
            if code != 0:
                raise ServerError(
                    f"the server stopped with exit status {code} (see the log above)", code
                ) from None
        except (RuntimeError, OSError) as exc:
            if os.getpid() != self._master_pid:
                raise
            raise ServerError(str(exc).removeprefix("Error: ")) from None


def _check_tcp_bind(bind: str) -> None:
    bind_tcp(bind, "listen on").close()


def _check_unix_bind(bind: str) -> None:
    directory = os.path.dirname(os.path.abspath(bind[len("unix:") :]))
    if not os.path.isdir(directory):
        raise BindError(f"cannot listen on {bind}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise BindError(f"cannot listen on {bind}: directory {directory} is not writable")


def _check_fd_bind(bind: str) -> None:
    fd = int(bind[len("fd://") :])
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        raise BindError(f"cannot listen on {bind}: file descriptor {fd} is not open") from None
    if not stat.S_ISSOCK(mode):
        raise BindError(f"cannot listen on {bind}: file descriptor {fd} is not a socket")
