"""Text from the input as it goes into a page: HTML-escaped, and its control characters written out.

A run folder's name, a file name or a field of another's trace reaches the pages' notes, titles and
tables. `html.escape` keeps markup out but lets an ESC, a carriage return or a NUL through, raw, into a
file that is also read with `cat`, `grep` and a terminal's pager; the text report writes them out with
`printable`, and the pages do the same, so a name reads alike in both.
"""

from __future__ import annotations

import html

from kvtrace.errors import printable

__all__ = ["html_text"]


def html_text(text: str) -> str:
    """`text` HTML-escaped (quotes too), its control characters as Python writes them ("x\\x1b[31m")."""
    return html.escape(printable(text))
