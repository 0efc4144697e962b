"""Errors that burnish reports to users as one clear line."""

import json
from pathlib import Path


class BurnishError(Exception):
    """A user-facing error: the message says what is wrong and where.

    The CLI prints it as a single line (no traceback) and exits non-zero.
    """


def read_json(path):
    """The JSON document in `path`; bad JSON is a BurnishError naming the
    file, line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BurnishError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
