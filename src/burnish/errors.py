"""Errors that burnish reports to users as one clear line."""


class BurnishError(Exception):
    """A user-facing error: the message says what is wrong and where.

    The CLI prints it as a single line (no traceback) and exits non-zero.
    """
