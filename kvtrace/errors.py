"""The one exception type that the CLI turns into a one-line message and an exit status."""

from __future__ import annotations


class KvtraceError(Exception):
    """A problem the user can fix (bad input file, impossible option): printed as one line.

    `exit_code` follows the usual CLI convention: 2 for bad input or usage, 1 for a failed run.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
