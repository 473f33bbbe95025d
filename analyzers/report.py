"""One entry point: any input path -> attributed source -> `Report`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from analyzers.model import MemorySource
from analyzers.readers.sources import ProgressFn, next_stage
from analyzers.summary import Report, summarize
from analyzers.trace_coverage import all_memory_events_damaged
from kvtrace.collector import collector_paused
from kvtrace.errors import KvtraceError


def load_source(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    """A run directory, a Chrome trace (.json/.json.gz), a profiler folder or a snapshot pickle, attributed.

    The kind comes from `classify_path`; a folder of runs is refused with the list of its runs, and so is a
    Chrome trace whose `[memory]` events are all damaged, with what was skipped and why: it has no memory
    figures, and the tools that need them (`diagnose`, `compare`, `export`) say so in one line rather than
    read it as a trace profiled without `profile_memory=True`. `kvtrace report` reads it (`build_report`
    with `keep_events=False`) and gives the same in its notes.
    """
    with collector_paused():  # a long run's events: millions of objects, none of them in a cycle
        return _load_source(path, progress)


def _load_source(path: str | os.PathLike[str], progress: ProgressFn | None) -> MemorySource:
    from analyzers.readers.sources import classify_path, open_source, profiler_traces_in, runs_in
    from kvtrace.run_layout import is_run_group

    if is_run_group(path):  # one run per rank: the rank that ran out, failed or peaked (analyzers.group)
        from analyzers.group import load_group_focus

        return load_group_focus(path, progress=progress)
    kind = classify_path(path)
    if kind == "run":
        from analyzers.readers.run_dir import read_run_source

        source = read_run_source(path, progress=progress)
    elif kind == "runs_folder":
        raise KvtraceError(_runs_folder_said(Path(path), runs_in(Path(path))))
    elif kind == "profiler_folder":
        traces = profiler_traces_in(Path(path))
        source = open_source(traces[-1], progress=progress)
        source.meta.setdefault("input_notes", []).extend(_folder_notes(path, traces))
    else:
        source = open_source(path, progress=progress)
    damaged = all_memory_events_damaged(source)
    if damaged is not None:
        raise KvtraceError(f"{source.path}: {damaged}: no memory figure can be read from it")
    from analyzers.attribution import attribute  # here: a small snapshot's report needs none of it

    return attribute(source, progress=next_stage(progress, "joining KV log", "storage"))


_RUNS_NAMED = 3  # the runs a folder-of-runs error names before "and N more"


def _runs_folder_said(path: Path, runs: list[Path]) -> str:
    """The one line for a folder of runs given as one: how many, and the first few to pass instead (a
    folder of 300 runs took 301 lines)."""
    from kvtrace.run_layout import is_run_group

    groups = sum(1 for run in runs if is_run_group(run))
    named = [f"{run}" + (" (a run group)" if is_run_group(run) else "") for run in runs[:_RUNS_NAMED]]
    listing = ", ".join(named) + (f" and {len(runs) - _RUNS_NAMED} more" if len(runs) > _RUNS_NAMED else "")
    if len(runs) == 1:
        return f"{path}: a folder holding 1 kvtrace run, not a run itself; pass it: {listing}"
    of_them = f" ({groups} of them {'run groups' if groups > 1 else 'a run group'})" if groups else ""
    return f"{path}: a folder of {len(runs)} kvtrace runs{of_them}, not one run; pass one of them: {listing}"


def _folder_notes(path: str | os.PathLike[str], traces: list[Any]) -> list[str]:
    """What a profiler folder holds that its report does not read: which trace of several was read, and
    which ranks' were not, and the snapshot pickles beside them (analyzers.readers.trace_ranks)."""
    from analyzers.readers.sources import snapshots_in
    from analyzers.readers.trace_ranks import snapshots_note, traces_note

    read = [Path(trace) for trace in traces]
    notes = [traces_note(path, read)] if len(read) > 1 else []
    snapshots = snapshots_in(Path(path))
    if snapshots:
        notes.append(snapshots_note(path, read, snapshots))
    return notes


def build_report(
    path: str | os.PathLike[str],
    progress: ProgressFn | None = None,
    keep_events: bool = True,
    timelines: bool = True,
) -> tuple[MemorySource, Report]:
    """`keep_events=False`: a Chrome trace's events may be folded while reading and not kept (bounded
    memory, analyzers.stream_summary); the source's devices then hold no events, only the report does. A
    trace whose `[memory]` events are all damaged is then reported, its notes saying so (`load_source`,
    which `keep_events=True` reads with, refuses it). With `timelines=False` as well (no chart will be
    drawn), a small snapshot is reported with Python lists and without numpy (analyzers.snapshot_summary):
    its source holds no devices and its report no timelines.

    A run group gives the group's report, as `kvtrace report` does: every rank's devices, the KV summed
    over ranks, the group's notes, and `report.group` (each rank's report, which rank to look at and why);
    the source is that rank's (`source.meta["run_group"]`)."""
    from kvtrace.run_layout import is_run_group

    if is_run_group(path):
        import dataclasses

        from analyzers.group import build_group_report, focus_source

        group = build_group_report(path, progress=progress)
        return focus_source(group), dataclasses.replace(group.total, notes=list(group.notes), group=group)
    if not keep_events:
        from analyzers.readers.sources import classify_path, profiler_traces_in

        kind = classify_path(path)
        traces: list[Any] = profiler_traces_in(Path(path)) if kind == "profiler_folder" else [path]
        notes = _folder_notes(path, traces) if kind == "profiler_folder" else []
        if kind == "snapshot" and not timelines:
            from analyzers.snapshot_summary import plain_snapshot_report

            return plain_snapshot_report(str(path), progress)
        if kind in ("chrome_trace", "profiler_folder"):
            from analyzers.stream_summary import stream_report

            streamed = stream_report(traces[-1], progress=progress, input_notes=notes)
            if streamed is not None:
                return streamed
    source = load_source(path, progress=progress)
    return source, summarize(source)
