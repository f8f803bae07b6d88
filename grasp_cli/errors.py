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


class NotImplementedStage(UsageError):
    """A stage that a later release will fill."""
