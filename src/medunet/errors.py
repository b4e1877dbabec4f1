"""One exception type for every user-facing failure.

The CLI turns :class:`InputError` into a one-line message and exit code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input from the user: a file, a folder, an option.

    The message names the offending path and says how to fix it, in one line.
    """

    exit_code = 2

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        parts = [f"{path}: {message}" if path is not None else message]
        if fix:
            parts.append(fix)
        super().__init__(" — ".join(parts))
        self.path = None if path is None else Path(path)
        self._args = (message, path, fix)

    def __reduce__(self):
        # rebuild from the original arguments, so the error survives worker processes intact
        return (type(self), self._args)
