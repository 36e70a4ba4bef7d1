"""The `microsvc` command: `run` serves an app, `plan` shows what `run` would do, `status`
shows what a running instance is doing."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from microsvc._version import __version__
from microsvc.config.options import OPTIONS, OptionSpec
from microsvc.config.values import parse_bind, split_bind
from microsvc.errors import MicrosvcError, UsageError

if TYPE_CHECKING:
    from microsvc.serving.launcher import Launcher

F = Callable[..., Any]


class SpecType(click.ParamType):  # type: ignore[type-arg]
    """A click type that checks with the option's own parser, so a bad value is a
    usage error at the edge with the same message everywhere."""

    def __init__(self, spec: OptionSpec) -> None:
        self.spec = spec
        self.name = spec.metavar or spec.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            self.spec.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        # The settings resolver parses again; passing the text on keeps "given, and
        # it means none" (e.g. --health-path off) apart from "not given".
        return value


def _click_option(spec: OptionSpec) -> Callable[[F], F]:
    help_text = f"{spec.help} [env: {spec.envvar}]"
    if spec.is_flag:
        name = spec.flag[2:]
        return click.option(f"--{name}/--no-{name}", spec.name, default=None, help=help_text)
    kind: click.ParamType = SpecType(spec)  # type: ignore[type-arg]
    if spec.choices:
        kind = click.Choice(spec.choices, case_sensitive=False)
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


def build_launcher(
    app: str | None, config: str | None, gunicorn_settings: tuple[str, ...], options: dict[str, Any]
) -> Launcher:
    from microsvc.config.resolve import parse_assignments
    from microsvc.serving.launcher import Launcher

    explicit = {name: value for name, value in options.items() if value not in (None, ())}
    return Launcher(
        app,
        config=config,
        gunicorn_settings=parse_assignments(gunicorn_settings, "--set"),
        explicit_source="command line",
        **explicit,
    )


def fail(exc: MicrosvcError) -> None:
    click.echo(f"Error: {exc}", err=True)
    raise SystemExit(exc.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="microsvc")
def main() -> None:
    """Run Flask and any WSGI microservice in production on Gunicorn."""


@main.command()
@server_options
def run(
    app: str | None, config: str | None, gunicorn_settings: tuple[str, ...], **options: Any
) -> None:
    """Serve APP (pkg.module:app or pkg.module:create_app()); the demo service if omitted."""
    try:
        launcher = build_launcher(app, config, gunicorn_settings, options)
        launcher.run()
    except MicrosvcError as exc:
        fail(exc)


@main.command()
@server_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(
    app: str | None,
    config: str | None,
    gunicorn_settings: tuple[str, ...],
    as_json: bool,
    **options: Any,
) -> None:
    """Show the worker plan and effective settings `run` would use, and why."""
    try:
        launcher = build_launcher(app, config, gunicorn_settings, options)
    except MicrosvcError as exc:
        fail(exc)
    report = plan_report(launcher)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    click.echo(f"microsvc {__version__}, app {report['app']}")
    for line in launcher.plan.explain():
        click.echo(line)
    click.echo(f"http engine: {report['http_engine']}")
    click.echo("settings:")
    for spec in OPTIONS:
        value = getattr(launcher.settings, spec.name)
        shown = "-" if value is None else spec.show(value)
        if isinstance(value, tuple):
            shown = " ".join(value)
        click.echo(f"  {spec.name:<20} {shown:<24} {launcher.resolved.sources[spec.name]}")
    if report["gunicorn_settings"]:
        click.echo("gunicorn settings passed through:")
        for name, entry in report["gunicorn_settings"].items():
            click.echo(f"  {name:<20} {entry['value']!s:<24} {entry['source']}")
    for warning in launcher.resolved.warnings:
        click.echo(f"warning: {warning}")


def plan_report(launcher: Launcher) -> dict[str, Any]:
    plan_data = launcher.plan.as_dict()
    settings = {
        spec.name: {
            "value": getattr(launcher.settings, spec.name),
            "source": launcher.resolved.sources[spec.name],
        }
        for spec in OPTIONS
    }
    gunicorn = {
        name: {"value": value, "source": launcher.resolved.gunicorn_sources[name]}
        for name, value in launcher.resolved.gunicorn.items()
    }
    return {
        "app": str(launcher.app_ref) if launcher.app_ref else repr(launcher.app_object),
        "usable_cpus": plan_data["usable_cpus"],
        "worker_class": plan_data["worker_class"],
        "workers": plan_data["workers"],
        "threads": plan_data["threads"],
        "http_engine": str(launcher.settings.http_engine),
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
    except MicrosvcError as exc:
        fail(exc)


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

    try:
        click.echo(render(upstreams, listen=listen, server_name=server_name, full=full), nl=False)
    except MicrosvcError as exc:
        fail(exc)


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
    **options: Any,
) -> None:
    """Print Kubernetes manifests (Deployment, Service, HorizontalPodAutoscaler,
    PodDisruptionBudget) that run APP with these options."""
    from microsvc.config.resolve import parse_assignments
    from microsvc.deploy.manifest import render
    from microsvc.serving.appload import parse_app_string
    from microsvc.serving.launcher import resolve

    explicit = {key: value for key, value in options.items() if value not in (None, ())}
    try:
        if gunicorn_settings:
            raise UsageError(
                "--set is not carried into manifests; put the setting in a config "
                "file baked into the image"
            )
        if app is not None:
            parse_app_string(app)
        resolved = resolve(
            explicit, config, parse_assignments(gunicorn_settings, "--set"), {}, "command line"
        )
        text = render(
            name=name,
            image=image,
            replicas=replicas,
            cpu=cpu,
            memory=memory,
            port=port,
            settings=resolved.settings,
            app=app,
        )
    except MicrosvcError as exc:
        fail(exc)
    click.echo(text, nl=False)
