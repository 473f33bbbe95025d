"""`python -m kvtrace`: the `kvtrace` command where the environment's scripts folder is not on PATH (a venv
not activated, `pip install --user`), with the same exit status and one-line errors."""

from __future__ import annotations

import sys

from kvtrace.entry_point import main

if __name__ == "__main__":
    sys.exit(main())
