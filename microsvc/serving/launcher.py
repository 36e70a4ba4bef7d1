"""`Launcher`: gunicorn embedded, configured from microsvc's settings and worker plan."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import sys
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from microsvc._gunicorn import BaseApplication, Config
from microsvc._version import __version__
from microsvc.config.options import HttpEngine, Settings, WorkerClass
from microsvc.config.pipeline import HEARTBEAT_DIR as HEARTBEAT_DIR
from microsvc.config.pipeline import JSON_LOGGER as JSON_LOGGER
from microsvc.config.pipeline import Configuration, build, replan
from microsvc.config.resolve import LAUNCHER, Caller
from microsvc.errors import BindError, MicrosvcError, ServerError, UsageError
from microsvc.observe.scoreboard import Scoreboard, ScoreboardApp, slot_count
from microsvc.planning.plan import SystemFacts, WorkerPlan
from microsvc.serving import middleware, patching
from microsvc.serving.appload import (
    AppRef,
    check_in_subprocess,
    load_app,
    measured_facts,
    parse_app_string,
)
from microsvc.serving.arbiter import MicrosvcArbiter, ServerState
from microsvc.serving.binding import bind_tcp, check_overlaps, defer_accept, inherited_listeners
from microsvc.wsgi import WSGIApp

if TYPE_CHECKING:
    from microsvc.http.meter import RequestMeter

    if sys.version_info >= (3, 11):
        from typing import Unpack
    else:
        from typing_extensions import Unpack

    from microsvc.config.keywords import LauncherOptions
    from microsvc.metrics import MetricsService

DEMO_APP = "microsvc.demo:app"


class UnpatchedAppWarning(RuntimeWarning):
    """A gevent/eventlet app object was imported before microsvc could monkey-patch."""


def check_gunicorn_paths(cfg: Config) -> None:
    """Directories gunicorn writes to must exist before it needs them: worker_tmp_dir
    (each worker's heartbeat file) and the pidfile's directory."""
    tmp_dir = cfg.worker_tmp_dir
    if tmp_dir and not os.path.isdir(tmp_dir):
        raise UsageError(f"worker_tmp_dir {tmp_dir!r} is not a directory")
    if cfg.pidfile:
        directory = os.path.dirname(os.path.abspath(cfg.pidfile))
        if not os.path.isdir(directory):
            raise UsageError(f"pidfile {cfg.pidfile!r}: directory {directory} does not exist")


class Launcher(BaseApplication):  # type: ignore[misc]
    """Gunicorn, configured by microsvc.

    `app` is a WSGI callable, an import string (`pkg.mod:app`, `pkg.mod:create_app()`),
    or None for the demo service. Keyword options are those of `microsvc run`, typed by
    `microsvc.config.keywords.LauncherOptions` (`workers="auto"`, `worker_class="gevent"`,
    `bind="127.0.0.1:5000"`, ...); any other gunicorn setting goes in
    `gunicorn_settings`. `config` is a gunicorn-style Python config file. The
    environment (`MICROSVC_*`, WEB_CONCURRENCY, HOST, PORT) fills what the arguments
    leave out. `caller` says who gave the options (`microsvc run` passes
    `COMMAND_LINE`, so errors name `--flags`). Errors raise
    `microsvc.errors.MicrosvcError`. Everything it runs with is `configuration`
    (`microsvc.config.pipeline.build`).
    """

    def __init__(
        self,
        app: WSGIApp | str | None = None,
        *,
        config: str | None = None,
        gunicorn_settings: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        facts: SystemFacts | None = None,
        caller: Caller = LAUNCHER,
        **options: Unpack[LauncherOptions],
    ) -> None:
        self._options: dict[str, object] = dict(options)
        self._config_path = config
        self._gunicorn_settings = dict(gunicorn_settings or {})
        self._environ = dict(os.environ if environ is None else environ)
        self._caller = caller
        self._facts = facts
        self._master_pid = os.getpid()
        self.configuration = self._build()
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
        if self.app_ref is not None and self.settings.memory_per_worker == "auto":
            # plan with the app's memory, measured in a child process (reloads keep it)
            self._facts, _ = measured_facts(self.app_ref, self._facts)
            self.configuration = replan(self.configuration, self._facts, pid=self._master_pid)
        self._user_post_worker_init: Any = None
        self._launch_dir = os.getcwd()
        self._loaded_app: WSGIApp | None = None
        self.state = ServerState()
        self.metrics: MetricsService | None = None
        self.scoreboard: Scoreboard | None = None
        self._scoreboard_error = ""
        super().__init__(prog="microsvc")

    def _build(self, cwd: str | None = None) -> Configuration:
        """The configuration from what this Launcher was given, the config file and the
        environment as they are now; relative paths are read from `cwd` (default: the
        current directory)."""
        return build(
            self._options,
            self._environ,
            self._config_path,
            self._facts,
            gunicorn_settings=self._gunicorn_settings,
            caller=self._caller,
            cwd=cwd,
            pid=self._master_pid,
        )

    @property
    def settings(self) -> Settings:
        return self.configuration.settings

    @property
    def plan(self) -> WorkerPlan:
        return self.configuration.plan

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
        self.cfg, self._user_post_worker_init = self.load_config(self.configuration)

    def load_config(self, configuration: Configuration) -> tuple[Config, Any]:
        """gunicorn's Config for `configuration` (checked by `build`) with microsvc's
        hooks in it, and the user's post_worker_init hook (microsvc's own runs in its
        place and calls it)."""
        cfg = configuration.gunicorn_config()
        user_hook = configuration.gunicorn.get("post_worker_init")
        cfg.set("post_worker_init", self._post_worker_init)
        self._install_server_hooks(
            cfg, engine=configuration.settings.http_engine == HttpEngine.MICROSVC
        )
        return cfg, user_hook

    def _install_server_hooks(self, cfg: Config, *, engine: bool) -> None:
        """Server hooks that keep the scoreboard (see `microsvc.observe.scoreboard`) and,
        on microsvc's engine, defer accepts on the listeners (`defer_accept`), each
        calling the hook the configuration gave before."""

        def board() -> Scoreboard | None:
            return self.scoreboard

        def pre_fork(user: Any) -> Any:
            def hook(server: Any, worker: Any) -> None:  # in the master
                if (scoreboard := board()) is not None:
                    scoreboard.reserve(worker.age)
                user(server, worker)

            return hook

        def post_fork(user: Any) -> Any:
            def hook(server: Any, worker: Any) -> None:  # in the new worker
                if (scoreboard := board()) is not None:
                    scoreboard.attach(scoreboard.reserved, worker.age)
                user(server, worker)

            return hook

        def stopping(user: Any, reason: str) -> Any:
            def hook(worker: Any) -> None:
                if (scoreboard := board()) is not None:
                    scoreboard.worker_stopping(reason)
                user(worker)

            return hook

        def worker_exit(user: Any) -> Any:
            def hook(server: Any, worker: Any) -> None:
                if (scoreboard := board()) is not None:
                    scoreboard.worker_stopping()
                user(server, worker)

            return hook

        def when_ready(user: Any) -> Any:
            def hook(server: Any) -> None:  # in the master, listening, before any fork
                if engine:
                    defer_accept(server.LISTENERS)
                if (scoreboard := board()) is not None:
                    scoreboard.sample(server.LISTENERS)
                user(server)

            return hook

        cfg.set("when_ready", when_ready(cfg.when_ready))
        cfg.set("pre_fork", pre_fork(cfg.pre_fork))
        cfg.set("post_fork", post_fork(cfg.post_fork))
        cfg.set("worker_int", stopping(cfg.worker_int, ""))
        cfg.set("worker_abort", stopping(cfg.worker_abort, "timeout"))
        cfg.set("worker_exit", worker_exit(cfg.worker_exit))

    def _post_worker_init(self, worker: Any) -> None:
        """In each worker once its app is loaded: count it toward readiness."""
        if self.metrics is not None:
            self.metrics.in_worker()
        if self.scoreboard is not None:
            self.scoreboard.booted()
        self.state.worker_booted()
        if self._user_post_worker_init is not None:
            self._user_post_worker_init(worker)

    def worker_recycling(self, kind: str) -> None:
        """In a worker that gunicorn recycles (max-requests): the master reads the reason
        from its scoreboard slot when it reaps it."""
        if self.scoreboard is not None:
            self.scoreboard.worker_stopping(kind)

    def reload(self) -> None:
        """On HUP: read the config file and environment again, plan again, and check the
        whole new configuration before any of the running one is replaced: microsvc's
        checks, gunicorn's, the addresses it adds can be bound, the directories it names
        exist, its worker class is installed, and, when it turns --preload on, the app
        loads. When a check fails, the error is logged in one line and the running
        configuration is kept. The app is wrapped again (`load`) with the new settings,
        with or without --preload."""
        log = logging.getLogger("gunicorn.error")
        try:
            configuration = self._build(cwd=self._launch_dir)
            cfg, user_hook = self.load_config(configuration)
            self._check_reload(configuration, cfg)
        except MicrosvcError as exc:
            log.error("Reload kept the running configuration: %s", exc)
            return
        before = self.settings
        after = configuration.settings
        if (after.metrics, after.metrics_bind) != (before.metrics, before.metrics_bind):
            log.warning(
                "Reload: --metrics and --metrics-bind take effect at the next start; "
                "metrics stay as they were"
            )
        self.configuration = configuration
        self.cfg, self._user_post_worker_init = cfg, user_hook
        if not after.preload:
            self._loaded_app = None  # workers import the app themselves
        self.callable = None  # wrapped again with the new settings
        self.enter_paths()

    def _check_reload(self, configuration: Configuration, cfg: Config) -> None:
        """What could stop the master once a new configuration is in place."""
        settings = configuration.settings
        patching.require_extra(settings.worker_class)
        metrics_bind = self.settings.metrics_bind if self.metrics is not None else None
        check_overlaps(settings.bind, metrics_bind)  # metrics keep their running address
        for bind in settings.bind:
            if bind in self.settings.bind:
                continue  # already listening there
            if bind.startswith("unix:"):
                _check_unix_bind(bind)
            elif bind.startswith("fd://"):
                _check_fd_bind(bind)
            elif not cfg.reuse_port:
                _check_tcp_bind(bind)
        check_gunicorn_paths(cfg)
        if "chdir" in configuration.passthrough and not os.access(cfg.chdir, os.X_OK):
            raise UsageError(f"gunicorn setting 'chdir': cannot enter {cfg.chdir}")
        if settings.preload and self.app_ref is not None and self._loaded_app is None:
            self._loaded_app = load_app(self.app_ref)

    def enter_paths(self) -> None:
        """gunicorn's `chdir` and `pythonpath`, applied in this process before the app is
        imported (workers inherit them): move to `chdir` and put it first on sys.path; put
        the `pythonpath` directories (comma-separated; relative ones are read from the new
        working directory) in front of it, in their order. Without `chdir` the working
        directory is the one microsvc started in."""
        directory = (
            self.cfg.chdir if "chdir" in self.configuration.passthrough else self._launch_dir
        )
        if os.getcwd() != directory:
            os.chdir(directory)
        entries = (entry.strip() for entry in (self.cfg.pythonpath or "").split(","))
        front = [os.path.abspath(entry) for entry in entries if entry]
        if "chdir" in self.configuration.passthrough:
            front.append(directory)
        sys.path[:0] = [path for path in dict.fromkeys(front) if path not in sys.path]

    def _user_app(self) -> WSGIApp:
        if self.app_object is not None:
            return self.app_object
        if self._loaded_app is None:
            assert self.app_ref is not None
            self._loaded_app = load_app(self.app_ref)
        return self._loaded_app

    def load(self) -> WSGIApp:
        """The app, with health, readiness and proxy trust in front of it, from the
        settings in force. The app itself is imported once per process; after a reload
        gunicorn asks again and gets it wrapped with the new settings."""
        app = self._user_app()
        settings = self.settings
        wrapped: WSGIApp = middleware.wrap(
            app,
            health_path=settings.health_path,
            ready_path=settings.ready_path,
            is_ready=self.state.is_ready,
            trusted_proxies=settings.forwarded_allow_ips,
            max_queue_time=settings.max_queue_time,
            queue_sample_interval=self._queue_sample_interval(),
        )
        if self.metrics is not None and not self._engine_records_metrics():
            wrapped = self.metrics.instrument(wrapped, app)
        if self.scoreboard is not None and self.settings.http_engine == HttpEngine.GUNICORN:
            # microsvc's engine notes each request in the scoreboard itself (`Hooks.slot`,
            # `microsvc.http.slot`), without a wrapper around the app and its body.
            wrapped = ScoreboardApp(wrapped, self.scoreboard)
        return wrapped

    def _engine_records_metrics(self) -> bool:
        return (
            self.metrics is not None
            and self.metrics.recorded_by_the_engine
            and self.settings.http_engine == HttpEngine.MICROSVC
        )

    def engine_meter(self) -> RequestMeter | None:
        """In a worker on microsvc's HTTP engine, with --metrics: what the engine records
        each request with (the app itself is not wrapped then); else None."""
        if self.metrics is None or not self._engine_records_metrics():
            return None
        # The app as loaded, not imported again: with --reload, a worker whose app has a
        # syntax error serves the error page instead (`load` failed, nothing is loaded).
        app = self.app_object if self.app_object is not None else self._loaded_app
        return self.metrics.meter(app)

    def _queue_sample_interval(self) -> float:
        """0 (every request) when something needs each request's queue time: an access
        log, shedding; else a sample is enough (the scoreboard shows the latest, the
        metrics' histogram is a sample)."""
        if self.settings.max_queue_time is not None:
            return 0.0
        if self.cfg.accesslog or self.settings.access_log:
            return 0.0
        return middleware.QUEUE_SAMPLE_INTERVAL

    # running

    def check_binds(self) -> None:
        """Fail with one line before gunicorn retries a busy address for five seconds.

        Addresses that overlap (the same port on the same address, or under a wildcard)
        are a usage error. A master that takes over listening sockets (from the master it
        replaces on USR2, or from systemd) binds none of its addresses: gunicorn listens on
        those sockets instead, so only they are checked."""
        inherited = inherited_listeners()
        if inherited is not None:
            for fd in inherited:
                _check_fd_bind(f"fd://{fd}")
            return
        settings = self.settings
        metrics_bind = settings.metrics_bind if settings.metrics else None
        check_overlaps(settings.bind, metrics_bind, reuse_port=bool(self.cfg.reuse_port))
        for bind in settings.bind:
            if bind.startswith("unix:"):
                _check_unix_bind(bind)
            elif bind.startswith("fd://"):
                _check_fd_bind(bind)
            elif not self.cfg.reuse_port:
                _check_tcp_bind(bind)

    def check_paths(self) -> None:
        """Directories gunicorn writes to must exist before workers start."""
        check_gunicorn_paths(self.cfg)

    def run(self) -> None:
        """Serve until stopped (TERM, INT, QUIT). Returns when the server stops cleanly."""
        self._master_pid = os.getpid()
        worker_class = self.settings.worker_class
        patching.require_extra(worker_class)
        self.enter_paths()
        self.check_binds()
        self.check_paths()
        worker_env = _worker_env(self.cfg)
        if self.app_ref is not None and not self.settings.preload:
            check_in_subprocess(self.app_ref, timeout=self.cfg.timeout or None, env=worker_env)
        # After the checks: patched, their name lookups would start gevent's resolver
        # thread, and the master would fork with it running.
        patching.patch(worker_class)
        self._open_scoreboard()
        try:
            if self.settings.metrics:
                from microsvc.metrics import MetricsService

                self.metrics = MetricsService(
                    self.settings.metrics_bind,
                    version=__version__,
                    worker_class=worker_class,
                    scoreboard=self.scoreboard.path if self.scoreboard else None,
                )
        except BaseException:
            self._close_scoreboard()
            raise
        handlers = _SignalHandlers()
        try:
            self._serve()
        finally:
            if os.getpid() == self._master_pid:
                handlers.restore()
                if self.metrics is not None:
                    self.metrics.close()
                    self.metrics = None
                self._close_scoreboard()

    def _open_scoreboard(self) -> None:
        """The scoreboard `microsvc status` and the metrics read; without it (no
        writable runtime directory) the server runs unobserved, with a warning."""
        try:
            self.scoreboard = Scoreboard.create(
                slot_count(self.plan.workers),
                worker_class=str(self.settings.worker_class),
                http_engine=str(self.settings.http_engine),
            )
        except OSError as exc:
            self.scoreboard = None
            self._scoreboard_error = (
                f"no scoreboard, `microsvc status` cannot see this server: {exc}"
            )

    def _close_scoreboard(self) -> None:
        if self.scoreboard is not None:
            self.scoreboard.remove()
            self.scoreboard = None

    def _serve(self) -> None:
        worker_class = self.settings.worker_class
        arbiter: MicrosvcArbiter | None = None
        try:
            arbiter = MicrosvcArbiter(
                self,
                self.state,
                self.settings.drain_period,
                metrics=self.metrics,
                scoreboard=self.scoreboard,
            )
            for warning in self.configuration.warnings:
                arbiter.log.warning("%s", warning)
            if self.scoreboard is None and self._scoreboard_error:
                arbiter.log.warning("%s", self._scoreboard_error)
            from microsvc.http.build import describe_engine

            arbiter.log.info(
                "microsvc %s: %s; HTTP engine: %s",
                __version__,
                self.plan.summary(),
                describe_engine(self.settings.http_engine),
            )
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
        finally:
            if arbiter is not None and os.getpid() == self._master_pid:
                arbiter.close()


class _SignalHandlers:
    """The process's signal handlers and wakeup fd, saved before gunicorn's arbiter
    replaces them, so that a program embedding `Launcher` gets its own back."""

    SIGNALS = (*MicrosvcArbiter.SIGNALS, signal.SIGCHLD)

    def __init__(self) -> None:
        self.handlers = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
        self.wakeup_fd: int | None = None
        try:
            self.wakeup_fd = signal.set_wakeup_fd(-1)
            signal.set_wakeup_fd(self.wakeup_fd)
        except ValueError:  # not the main thread: gunicorn cannot set signals either
            pass

    def restore(self) -> None:
        for sig, handler in self.handlers.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, handler)
        if self.wakeup_fd is not None:
            try:
                signal.set_wakeup_fd(self.wakeup_fd)
            except ValueError:  # the fd was closed meanwhile
                signal.set_wakeup_fd(-1)


def _worker_env(cfg: Config) -> dict[str, str]:
    """The variables gunicorn's raw_env sets for the workers."""
    try:
        return dict(cfg.env)
    except RuntimeError as exc:  # an entry without '='
        raise UsageError(f"gunicorn setting 'raw_env': {exc}; write NAME=VALUE") from None


def _check_tcp_bind(bind: str) -> None:
    bind_tcp(bind, "listen on", like_gunicorn=True).close()


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
