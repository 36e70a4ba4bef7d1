"""The exceptions microsvc raises. The CLI maps each to an exit code in one place."""

from __future__ import annotations


class MicrosvcError(Exception):
    """Base of every error microsvc raises on purpose; its message is one line."""

    exit_code = 1


class UsageError(MicrosvcError):
    """A value the user gave is invalid: an option, an app string, a config file entry."""

    exit_code = 2


class AppImportError(UsageError):
    """The app string does not import or does not name a WSGI callable."""


class AppLoadError(MicrosvcError):
    """The app's own code raised while it was imported or created."""


class MissingExtraError(MicrosvcError):
    """A worker class needs a package that is not installed."""


class BindError(MicrosvcError):
    """The listen address cannot be bound (in use, or not an address of this machine)."""


class ServerError(MicrosvcError):
    """Gunicorn's arbiter stopped with a failure."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
