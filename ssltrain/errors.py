"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero. With
SSLTRAIN_DEBUG=1 in the environment it prints the traceback first, causes included (an objective
that fails to import, a data file a library cannot read)."""

import os

DEBUG_ENV = "SSLTRAIN_DEBUG"


def debugging() -> bool:
    """Whether SSLTRAIN_DEBUG asks for tracebacks of user errors."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class UserError(Exception):
    """A mistake in the config, the data or the command line. Never shown as a traceback."""


class ConfigError(UserError):
    """The composed config asks for something impossible or unknown."""


class DataError(UserError):
    """The data cannot be read or gives no training examples."""
