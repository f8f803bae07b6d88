"""The error hierarchy. The CLI turns each into one line and an exit code."""


class GraspError(Exception):
    """Base class: a problem a user can act on. Exit code 1."""

    exit_code = 1


class UsageError(GraspError):
    """Bad input, bad flags or a bad config. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config key, type or value is wrong."""


class InputError(UsageError):
    """An input file is missing, unreadable, or has the wrong schema or contents."""


class StaleError(UsageError):
    """An artifact no longer matches its inputs or config."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when it has none), at most
    ``limit`` characters: what a one-line error quotes of a library's multi-line message."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
