"""The `kvtrace` command's entry point (pyproject's [project.scripts], `python -m kvtrace`): a Ctrl-C typed as
the command starts, while kvtrace's own modules import, is one line and exit 130, not a traceback.

`kvtrace.cli.main` says an interrupt as one line from inside its try, but the console script imported
`kvtrace.cli` (and the ~20 ms of argparse, pathlib and kvtrace's modules under it) before that try existed. So
this module imports nothing (`kvtrace/__init__.py`, run first, imports no more than `__future__`) and takes
`kvtrace.cli` inside its own try. What runs before it is out of its reach: Python's own start-up (`site`, the
editable install's finder) and the console script's first line, `import re, sys`.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run `kvtrace` on `sys.argv[1:]`; the exit status, 130 on a Ctrl-C that `kvtrace.cli.main` did not
    get to say (while it imports, or in its first lines before its own try)."""
    swallowed = False
    previous_hook = sys.unraisablehook

    def drop_ctrl_c(unraisable: sys.UnraisableHookArgs) -> None:
        """A Ctrl-C whose handler ran inside a weakref callback (importlib frees its module locks through
        one) raised where Python can only print it, "Exception ignored in: ...", and the import went on."""
        nonlocal swallowed
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            swallowed = True
        else:
            previous_hook(unraisable)

    try:
        sys.unraisablehook = drop_ctrl_c
        try:
            from kvtrace.cli import main as cli_main
        finally:
            if sys.unraisablehook is drop_ctrl_c:
                sys.unraisablehook = previous_hook
        if swallowed:
            raise KeyboardInterrupt
        return cli_main()
    except KeyboardInterrupt:
        # The command's name is known to kvtrace.cli alone, which may be what was cut short
        try:
            sys.stderr.write("kvtrace: interrupted\n")
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):  # no stderr (`2>&-`), a full disk, a closed pipe
            pass
        return 130
