"""Errors the user can fix. train.py prints their message (no traceback) and exits 2."""


class UserError(Exception):
    """A problem with the user's input or machine; the message says what to do."""

    exit_code = 2


class Interrupted(UserError):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for "killed by signal"


class ConfigError(UserError):
    """A bad config value; the message names the key and what is allowed."""


class DataError(UserError):
    """Bad data: a missing or malformed file, a corrupt image, an unknown category."""


class DeviceError(UserError):
    """A requested device or backend that this machine cannot provide."""
