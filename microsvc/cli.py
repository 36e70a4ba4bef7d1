"""The `microsvc` command: `run` serves an app, `plan` shows what `run` would do, `status`
shows what a running instance is doing."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import click
from click.core import ParameterSource

from microsvc._version import __version__
from microsvc.config.options import OPTIONS, OptionSpec
from microsvc.config.resolve import COMMAND_LINE, parse_assignments
from microsvc.config.values import parse_bind, split_bind
from microsvc.errors import MicrosvcError, UsageError

if TYPE_CHECKING:
    from microsvc.config.pipeline import Configuration
    from microsvc.planning.plan import SystemFacts
    from microsvc.serving.launcher import Launcher

F = Callable[..., Any]


class SpecType(click.ParamType):  # type: ignore[type-arg]
    """A click type that parses with the option's own parser: a bad value is a usage
    error at the edge with the same message everywhere, and a good one is parsed here
    once (`COMMAND_LINE.parsed`: the settings resolver takes it as it is)."""

    def __init__(self, spec: OptionSpec) -> None:
        self.spec = spec
        self.name = spec.metavar or spec.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return self.spec.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class SpecChoice(click.Choice):  # type: ignore[type-arg]
    """click's choice (its help and error list the choices), parsed into the option's
    enum by the option's own parser."""

    def __init__(self, spec: OptionSpec) -> None:
        super().__init__(spec.choices, case_sensitive=False)
        self.spec = spec

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return self.spec.parse(super().convert(value, param, ctx))


def _click_option(spec: OptionSpec) -> Callable[[F], F]:
    help_text = f"{spec.help} [env: {spec.envvar}]"
    if spec.is_flag:
        name = spec.flag[2:]
        return click.option(f"--{name}/--no-{name}", spec.name, default=None, help=help_text)
    kind: click.ParamType = SpecChoice(spec) if spec.choices else SpecType(spec)  # type: ignore[type-arg]
    if spec.multiple:
        return click.option(
            *spec.flags, spec.name, type=kind, multiple=True, metavar=spec.metavar, help=help_text
        )
    return click.option(
        *spec.flags, spec.name, type=kind, default=None, metavar=spec.metavar, help=help_text
    )


def server_options(command: F) -> F:
    """APP, every registry option, --config and --set: shared by `run` and `plan`."""
    for spec in reversed(OPTIONS):
        command = _click_option(spec)(command)
    command = click.option(
        "-c",
        "--config",
        type=click.Path(dir_okay=False),
        envvar="MICROSVC_CONFIG",
        help="A gunicorn-style Python config file (bind = ..., workers = ..., hooks). "
        "[env: MICROSVC_CONFIG]",
    )(command)
    command = click.option(
        "--set",
        "gunicorn_settings",
        multiple=True,
        metavar="NAME=VALUE",
        help="Any other gunicorn setting by its gunicorn name, checked by gunicorn, e.g. "
        "--set worker_connections=500; repeatable. [env: MICROSVC_SET, space-separated]",
    )(command)
    return click.argument("app", required=False, envvar="MICROSVC_APP")(command)


def given_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The registry options given on the command line, as their click types parsed
    them (a repeated option's values joined); the others are left to the environment,
    the config file and the defaults."""
    ctx = click.get_current_context()
    given: dict[str, Any] = {}
    for spec in OPTIONS:
        if ctx.get_parameter_source(spec.name) is not ParameterSource.COMMANDLINE:
            continue
        value = options[spec.name]
        if spec.multiple:
            value = tuple(item for part in value for item in part)
        given[spec.name] = value
    return given


def build_launcher(
    app: str | None, config: str | None, gunicorn_settings: tuple[str, ...], options: dict[str, Any]
) -> Launcher:
    from microsvc.serving.launcher import Launcher

    return Launcher(
        app,
        config=config,
        gunicorn_settings=parse_assignments(gunicorn_settings, "--set"),
        caller=COMMAND_LINE,
        **given_options(options),
    )


def build_configuration(
    config: str | None,
    gunicorn_settings: tuple[str, ...],
    options: dict[str, Any],
    environ: Mapping[str, str] | None = None,
    facts: SystemFacts | None = None,
) -> Configuration:
    """What `microsvc run` with these arguments would run with (environment: this
    process's, unless `environ` is given; the machine: read, unless `facts` is given)."""
    import os

    from microsvc.config.pipeline import build

    return build(
        given_options(options),
        os.environ if environ is None else environ,
        config,
        facts,
        gunicorn_settings=parse_assignments(gunicorn_settings, "--set"),
        caller=COMMAND_LINE,
    )


def fail(exc: MicrosvcError) -> NoReturn:
    """The one place a microsvc error becomes an exit: `Error: ...` on one line, exit
    status 2 for a usage error, 1 (or the server's own status) otherwise."""
    click.echo(f"Error: {exc}", err=True)
    raise SystemExit(exc.exit_code)


class _Main(click.Group):
    """The `microsvc` group: a `MicrosvcError` from any command ends in `fail`."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MicrosvcError as exc:
            fail(exc)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="microsvc")
def main() -> None:
    """Run Flask and any WSGI microservice in production on Gunicorn."""


@main.command()
@server_options
def run(
    app: str | None, config: str | None, gunicorn_settings: tuple[str, ...], **options: Any
) -> None:
    """Serve APP (pkg.module:app or pkg.module:create_app()); the demo service if omitted."""
    build_launcher(app, config, gunicorn_settings, options).run()


@main.command()
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@click.option(
    "--measure",
    is_flag=True,
    help="Load the app in a child process and report its memory after import "
    "(done anyway with --memory-per-worker auto, which plans with it).",
)
def plan(
    app: str | None,
    config: str | None,
    gunicorn_settings: tuple[str, ...],
    as_json: bool,
    measure: bool,
    **options: Any,
) -> None:
    """Show the worker plan and effective settings `run` would use, and why."""
    from microsvc.config.pipeline import replan
    from microsvc.serving.appload import measured_facts, parse_app_string
    from microsvc.serving.launcher import DEMO_APP

    app_ref = parse_app_string(DEMO_APP if app is None else app)
    configuration = build_configuration(config, gunicorn_settings, options)
    memory = None
    if measure or configuration.settings.memory_per_worker == "auto":
        facts, memory = measured_facts(app_ref)
        configuration = replan(configuration, facts)
    report = plan_report(str(app_ref), configuration)
    if memory is not None:
        report["app_memory"] = memory.as_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"microsvc {__version__}, app {report['app']}")
    if memory is not None:
        click.echo(memory.describe())
    for line in configuration.plan.explain():
        click.echo(line)
    click.echo(f"http engine: {report['http_engine_build']}")
    click.echo("settings:")
    for spec in OPTIONS:
        value = getattr(configuration.settings, spec.name)
        shown = "-" if value is None else spec.show(value)
        if isinstance(value, tuple):
            shown = " ".join(value)
        click.echo(f"  {spec.name:<20} {shown:<24} {configuration.sources[spec.name]}")
    if report["gunicorn_settings"]:
        click.echo("gunicorn settings passed through:")
        for name, entry in report["gunicorn_settings"].items():
            click.echo(f"  {name:<20} {entry['value']!s:<24} {entry['source']}")
    for warning in configuration.warnings:
        click.echo(f"warning: {warning}")


def plan_report(app: str, configuration: Configuration) -> dict[str, Any]:
    from microsvc.http.build import describe_engine

    plan_data = configuration.plan.as_dict()
    settings = {
        spec.name: {
            "value": getattr(configuration.settings, spec.name),
            "source": configuration.sources[spec.name],
        }
        for spec in OPTIONS
    }
    gunicorn = {
        name: {"value": value, "source": configuration.passthrough_sources[name]}
        for name, value in configuration.passthrough.items()
    }
    return {
        "app": app,
        "usable_cpus": plan_data["usable_cpus"],
        "worker_class": plan_data["worker_class"],
        "workers": plan_data["workers"],
        "threads": plan_data["threads"],
        "http_engine": str(configuration.settings.http_engine),
        "http_engine_build": describe_engine(str(configuration.settings.http_engine)),
        "plan": plan_data,
        "settings": settings,
        "gunicorn_settings": gunicorn,
    }


@main.command()
@click.option(
    "--pid",
    type=click.IntRange(min=1),
    default=None,
    metavar="PID",
    help="The master pid of the instance (needed when several of yours run).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C.")
@click.option(
    "-n",
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    metavar="SECONDS",
    help="Seconds between refreshes with --watch.",
)
def status(pid: int | None, as_json: bool, watch: bool, interval: float) -> None:
    """Show what a running instance of yours is doing: each worker's state, request in
    progress, requests served and memory; busy ratio, listen queue, workers recycled."""
    import sys
    import time

    from microsvc.observe.status import StatusError, locate, open_board, render, report

    try:
        path = locate(pid)
        board = open_board(path)
        while True:
            data = report(board)
            if as_json:
                click.echo(json.dumps(data, indent=None if watch else 2))
            else:
                if watch and sys.stdout.isatty():
                    click.clear()
                click.echo(render(data) + ("\n" if watch else ""))
            if not watch:
                return
            time.sleep(interval)
            if not path.exists():
                raise StatusError(f"the instance with master pid {data['master_pid']} stopped")
    except KeyboardInterrupt:
        return


def _tcp_address(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """HOST:PORT only (nginx and Kubernetes speak TCP to microsvc here)."""
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        try:
            parsed = parse_bind(item)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        if split_bind(parsed) is None:
            raise click.BadParameter(f"{item!r} is not HOST:PORT")
    return value


@main.command()
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    default=("127.0.0.1:5000",),
    show_default=True,
    metavar="HOST:PORT",
    callback=_tcp_address,
    help="A microsvc instance to balance over; repeatable.",
)
@click.option(
    "--listen",
    default="0.0.0.0:80",
    show_default=True,
    metavar="HOST:PORT",
    callback=_tcp_address,
    help="Where nginx listens.",
)
@click.option("--server-name", default="_", show_default=True, help="nginx server_name.")
@click.option(
    "--full",
    is_flag=True,
    help="Print a whole nginx.conf, not only the http-context blocks for conf.d/.",
)
def nginx(upstreams: tuple[str, ...], listen: str, server_name: str, full: bool) -> None:
    """Print nginx configuration for one or more microsvc instances."""
    from microsvc.deploy.nginx import render

    click.echo(render(upstreams, listen=listen, server_name=server_name, full=full), nl=False)


@main.command()
@server_options
@click.option("--name", default="microsvc", show_default=True, help="Name of every object.")
@click.option("--image", required=True, help="Container image that has microsvc and the app.")
@click.option(
    "--replicas",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Pods (the HorizontalPodAutoscaler's minimum).",
)
@click.option(
    "--cpu",
    default="1",
    show_default=True,
    help="CPU request and limit per pod (e.g. 500m, 2); --workers auto plans from it.",
)
@click.option(
    "--memory",
    default="512Mi",
    show_default=True,
    help="Memory request and limit per pod (e.g. 512Mi, 1Gi).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="Container port microsvc listens on.",
)
@click.option(
    "--hpa",
    type=click.Choice(["cpu", "busy-ratio", "queue-time"]),
    default="cpu",
    show_default=True,
    help="What the HorizontalPodAutoscaler follows: CPU, or (with --metrics, through the "
    "Prometheus adapter: docs/overload.md) the workers' busy ratio or the queue time.",
)
def manifest(
    app: str | None,
    config: str | None,
    gunicorn_settings: tuple[str, ...],
    name: str,
    image: str,
    replicas: int,
    cpu: str,
    memory: str,
    port: int,
    hpa: str,
    **options: Any,
) -> None:
    """Print Kubernetes manifests (Deployment, Service, HorizontalPodAutoscaler,
    PodDisruptionBudget) that run APP with these options."""
    from microsvc.deploy.manifest import render
    from microsvc.serving.appload import parse_app_string

    if gunicorn_settings:
        raise UsageError(
            "--set is not carried into manifests; put the setting in a config "
            "file baked into the image"
        )
    if app is not None:
        parse_app_string(app)
    # The pod's environment, not this one: the settings are those of the command line
    # and the config file.
    configuration = build_configuration(config, gunicorn_settings, options, environ={})
    text = render(
        name=name,
        image=image,
        replicas=replicas,
        cpu=cpu,
        memory=memory,
        port=port,
        settings=configuration.settings,
        app=app,
        hpa=hpa,
    )
    click.echo(text, nl=False)
