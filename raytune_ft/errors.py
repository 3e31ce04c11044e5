"""The base of every error raytune_ft raises for its user: bad data, a missing file, a cluster out of reach, a
search whose trials all failed. The command line prints such an error's message, without a traceback, and exits
with its EXIT_CODE (cli.common.App). Any other exception is a bug and keeps its traceback.

A leaf: each module's error subclasses one of these beside the builtin it always was (ValueError, RuntimeError),
so code that catches the builtin still does."""


class RaytuneFtError(Exception):
    """Something the user can act on; exit status 1."""

    exit_code = 1


class InputError(RaytuneFtError):
    """Bad configuration or arguments; exit status 2."""

    exit_code = 2
