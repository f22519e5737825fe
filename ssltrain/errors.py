"""Errors that are the user's to fix: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in the config, the data or the command line. Never shown as a traceback."""


class ConfigError(UserError):
    """The composed config asks for something impossible or unknown."""


class DataError(UserError):
    """The data cannot be read or gives no training examples."""
