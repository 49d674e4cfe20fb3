"""Errors the user can fix. train.py prints their message (no traceback) and exits 2."""


class UserError(Exception):
    """A problem with the user's input or machine; the message says what to do."""


class DataError(UserError):
    """Bad data: a missing or malformed file, a corrupt image, an unknown category."""


class DeviceError(UserError):
    """A requested device or backend that this machine cannot provide."""
