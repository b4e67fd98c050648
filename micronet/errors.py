"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class MicronetError(Exception):
    """A problem the user can fix (bad params, missing data, incompatible checkpoint)."""
