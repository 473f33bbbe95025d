"""Reading a run directory back (`read_run`): its manifest and every complete line of its logs, each
checked (`kvtrace.run_checks`); a last line cut by a killed writer is dropped and said. Stdlib only (and
msgspec for the KV log, where installed): the analyzers read runs on a laptop without torch.
"""

from __future__ import annotations

import codecs
import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtrace.collector import collector_paused
from kvtrace.errors import (
    KvtraceError,
    link_problem,
    refuse_special_file,
    refuse_unnamed_path,
)
from kvtrace.format import (
    KV_EVENTS,
    MANIFEST,
    MEMORY_SAMPLES,
    RANK_DIR_PREFIX,
    SCHEMA_VERSION,
    WEIGHTS,
    Run,
    rank_dirs,
)
from kvtrace.json_reads import read_json_file, read_json_line
from kvtrace.run_checks import (
    _MANIFEST_FIELDS,
    _MANIFEST_VALUES,
    _kind,
    _KvEventLines,
    _SampleLines,
    _WeightLines,
    check_generate_calls,
    check_prompt_ends,
)


def _read_jsonl(
    path: Path,
    check: Callable[[dict[str, Any], Path, int], Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    blocks: Callable[[list[bytes]], list[Any] | None] | None = None,
) -> tuple[list[Any], bool]:
    """Every complete line (through `check(record, path, lineno)`, which returns what to keep, None to skip
    the line, or raises); a cut last line (killed writer) is dropped and reported, corrupt lines elsewhere
    are an error naming the file and line. Read a block of whole lines at a time: a long run's KV log (270 MB
    for 8,000 tokens of 32 layers) was held whole, twice (its text and its lines), beside the events made of
    it. `blocks(lines)`: what to keep of a block's lines (bytes, without their newlines) read at once, or
    None to read them one by one (as text, through `check`). `progress(done, total)`: the bytes read so
    far and the file's, every 4 MiB and at the end."""
    if not path.exists():
        return [], False
    records: list[Any] = []
    refuse_special_file(path)
    lineno = 0

    def read_lines(text: str) -> bool:
        """The block's lines as text (UTF-8 with errors replaced, universal newlines: what reading the
        file in text mode gives); False where a cut last line ends the file."""
        nonlocal lineno
        for line in io.StringIO(text, newline=None):
            lineno += 1
            if not line.strip():
                continue
            value = read_json_line(line, path, lineno, last=not line.endswith("\n"))
            if value is None:  # the last line, cut where a killed writer stopped
                return False
            kept = value if check is None else check(value, path, lineno)
            if kept is not None:
                records.append(kept)
        return True

    try:
        with open(path, "rb") as fh:
            total = os.fstat(fh.fileno()).st_size if progress is not None else 0
            done = reported = 0
            start = fh.read(len(codecs.BOM_UTF8))
            # the text after the last newline read, in pieces: a line longer than a block is joined once
            pending = [] if start == codecs.BOM_UTF8 else [start]  # a BOM an editor added, as manifests
            while True:
                data = fh.read(_BLOCK_BYTES)
                if progress is not None:
                    done += len(data)
                    if done - reported >= _PROGRESS_STEP:
                        reported = done
                        progress(min(done, total), total)
                if not data:
                    break
                cut = data.rfind(b"\n") + 1
                if not cut:
                    pending.append(data)
                    continue
                block = b"".join([*pending, data[:cut]])
                pending = [data[cut:]]
                if blocks is not None and b"\r" not in block:  # "\r" alone ends a line in text mode
                    lines = block.split(b"\n")
                    lines.pop()  # the empty text after the last newline
                    kept = blocks(lines)
                    if kept is not None:
                        records.extend(kept)
                        lineno += len(lines)
                        continue
                read_lines(block.decode("utf-8", errors="replace"))
            rest = b"".join(pending)
            truncated = bool(rest) and not read_lines(rest.decode("utf-8", errors="replace"))
    except OSError as exc:  # a folder of that name, no permission
        raise KvtraceError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if progress is not None:
        progress(total, total)
    return records, truncated


_BLOCK_BYTES = 1 << 18  # read at a time, cut after its last newline: ~1,000 lines of a KV log
_PROGRESS_STEP = 4 << 20  # a progress call at most every 4 MiB read, as the trace readers report


# The manifest's count of each log's lines besides `kv_events` (written by the recorder as it ends)
_LINE_COUNTS = {WEIGHTS: "weights_lines", MEMORY_SAMPLES: "memory_samples_lines"}


def read_run(path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None) -> Run:
    """Read a run directory written by any schema version up to ours.

    A run that was interrupted (manifest still says "running", or a cut last line) is read up to its last
    complete event; `Run.truncated` and the manifest's `ended` say so. `progress(done, total)`: how far into
    the KV log reading has got (characters of `total`, its bytes), the run's long read.
    """
    with collector_paused():  # millions of objects made, none of them in a cycle
        return _read_run(path, progress)


def _read_run(path: str | os.PathLike[str], progress: Callable[[int, int], None] | None) -> Run:
    refuse_unnamed_path(path)  # before pathlib reads "" as the current folder
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise KvtraceError(f"{root}: not a directory")
    link = link_problem(manifest_path)
    if link is not None:  # there, but leading nowhere: not "no manifest.json"
        raise KvtraceError(f"{manifest_path}: cannot read ({link})")
    if not manifest_path.exists():
        ranks = rank_dirs(root)
        if ranks:  # a run group: this reader takes one run, so one rank's is named to pass
            raise KvtraceError(
                f"{root}: a run group ({len(ranks)} {RANK_DIR_PREFIX}<r>/ runs, one per rank), not one run: "
                f"pass one rank's run, e.g. {ranks[0][1]}"
            )
        raise KvtraceError(f"{root}: not a kvtrace run directory (no {MANIFEST})")
    # utf-8-sig: a BOM an editor added
    manifest = read_json_file(manifest_path, "corrupt manifest", encoding="utf-8-sig")
    if not isinstance(manifest, dict) or manifest.get("format") != "kvtrace-run":
        raise KvtraceError(f"{manifest_path}: not a kvtrace manifest")
    version = manifest.get("schema_version")
    if type(version) is not int or version < 1:
        raise KvtraceError(f"{manifest_path}: missing or invalid schema_version")
    if version > SCHEMA_VERSION:
        raise KvtraceError(
            f"{manifest_path}: schema version {version} is newer than this kvtrace reads ({SCHEMA_VERSION}); "
            "upgrade kvtrace"
        )
    for key, types, what in _MANIFEST_FIELDS:
        if key in manifest and not isinstance(manifest[key], types):
            found = "null" if manifest[key] is None else type(manifest[key]).__name__
            raise KvtraceError(f"{manifest_path}: field {key!r} is {found}, expected {what}")
    for dotted, check, what in _MANIFEST_VALUES:
        outer, _, inner = dotted.partition(".")
        holder = manifest.get(outer) if inner else manifest
        name = inner or outer
        if isinstance(holder, dict) and name in holder and not check(holder[name]):
            raise KvtraceError(f"{manifest_path}: field {dotted!r} is {_kind(holder[name])}, expected {what}")
    check_generate_calls(manifest, manifest_path)
    ended = manifest.get("ended") or {}
    write_error = ended.get("write_error")
    if write_error is not None:
        # The recorder could not write its logs to the end (a full disk): they hold an early part of the run.
        # (Only its profiler trace unwritten, the logs whole: `ended.trace_error`, and the run reads.)
        lost = ended.get("kv_events_lost")
        lost_said = f"; {lost} KV events were lost" if isinstance(lost, int) else ""
        raise KvtraceError(f"{root}: incomplete run: the recorder failed to write {write_error}{lost_said}")
    events_path = root / KV_EVENTS
    kv_lines = _KvEventLines()
    events, cut_events = _read_jsonl(events_path, kv_lines, progress, kv_lines.block)
    if kv_lines.unknown and not events:
        raise KvtraceError(
            f"{events_path}: none of its {kv_lines.lines:,} lines is a KV event this kvtrace knows "
            f"({unknown_kinds_text(kv_lines.unknown)}): written by a newer kvtrace (upgrade it), or damaged"
        )
    weights, cut_weights = _read_jsonl(root / WEIGHTS, _WeightLines())
    sample_lines = _SampleLines()
    samples, cut_samples = _read_jsonl(root / MEMORY_SAMPLES, sample_lines)
    damaged: dict[str, str] = {}
    finished = manifest.get("ended", {}).get("status") not in (None, "running")
    if finished:
        # The recorder closed every file and counted the events: a cut or short file was damaged after the
        # run (a partial copy, a full disk), and figures from it would be wrong, not merely early.
        count = manifest.get("kv_events")
        if isinstance(count, int) and count and not events_path.is_file():
            raise KvtraceError(f"{events_path}: missing, while the manifest counts {count} KV events")
        short = isinstance(count, int) and count != kv_lines.lines  # skipped lines were written all the same
        if cut_events or short:
            counted = f" of the {count} the manifest counts" if isinstance(count, int) else ""
            raise KvtraceError(
                f"{events_path}: damaged after the run ended: {kv_lines.lines} complete events{counted}"
            )
        # The other logs by the same rule where the manifest counts their lines (older runs do not). Neither
        # is the run's KV: one found damaged is read as missing, its note (`missing_files_notes`) saying the
        # damage and what the figures lack, and the KV log's figures stand, as a missing one's do
        for name, lines, cut in ((WEIGHTS, weights, cut_weights), (MEMORY_SAMPLES, samples, cut_samples)):
            written = manifest.get(_LINE_COUNTS[name])
            short = isinstance(written, int) and (root / name).is_file() and written != len(lines)
            if cut and isinstance(written, int):
                said = f"{len(lines)} complete lines of the {written} the manifest counts, the last one cut"
            elif cut:
                said = "its last line is cut"
            elif short:
                said = f"{len(lines)} complete lines of the {written} the manifest counts"
            else:
                continue
            damaged[name] = f"damaged after the run ended: {said}"
        if WEIGHTS in damaged:
            weights, cut_weights = [], False
        if MEMORY_SAMPLES in damaged:
            samples, cut_samples = [], False
    if MEMORY_SAMPLES not in damaged:
        check_prompt_ends(root / MEMORY_SAMPLES, sample_lines.prompt_ends, events, finished)
    return Run(
        path=root,
        manifest=manifest,
        kv_events=events,
        weights=[w for w in weights if not w.event],
        memory_samples=samples,
        truncated=cut_events or cut_weights or cut_samples,
        weight_changes=[w for w in weights if w.event],
        unknown_kv_events=kv_lines.unknown,
        short_kv_storages=kv_lines.short_storages,
        unknown_kv_dtypes=kv_lines.unknown_dtypes,
        repeated_kv_seqs=kv_lines.repeated_seqs,
        kv_fields_left_out=kv_lines.left_out,
        damaged_files=damaged,
    )


_UNKNOWN_KINDS_SHOWN = 5  # event names a message lists (a damaged log may hold thousands of distinct ones)


def unknown_kinds_text(unknown: dict[str, int]) -> str:
    """The unknown event names of `Run.unknown_kv_events`, most lines first: "'growed' on 2 lines, 'spill'
    on 1 line", and how many more names."""
    ranked = sorted(unknown.items(), key=lambda item: (-item[1], item[0]))
    shown = ", ".join(
        f"{name!r} on {count:,} line{'s' if count != 1 else ''}"
        for name, count in ranked[:_UNKNOWN_KINDS_SHOWN]
    )
    more = len(ranked) - _UNKNOWN_KINDS_SHOWN
    return shown + (f", and {more:,} more names" if more > 0 else "")
