"""One entry point: any input path -> attributed source -> `Report`."""

from __future__ import annotations

import os
from pathlib import Path

from analyzers.attribution import attribute
from analyzers.model import MemorySource
from analyzers.readers.sources import ProgressFn
from analyzers.summary import Report, summarize


def load_source(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    """A run directory, a Chrome trace (.json/.json.gz) or a snapshot pickle, attributed."""
    from kvtrace.format import is_run_dir

    if Path(path).is_dir() and is_run_dir(path):
        from analyzers.readers.run_dir import read_run_source

        source = read_run_source(path, progress=progress)
    else:
        from analyzers.readers.sources import open_source

        source = open_source(path, progress=progress)
    return attribute(source)


def build_report(
    path: str | os.PathLike[str], progress: ProgressFn | None = None
) -> tuple[MemorySource, Report]:
    source = load_source(path, progress=progress)
    return source, summarize(source)
