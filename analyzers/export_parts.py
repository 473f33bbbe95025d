"""An export directory's parts (`kvtrace export`): each table's part written, every table's part
committed or none, and committed parts told from replaced ones and from what a killed export left.

Layout of an export directory (docs/format.md, "Parquet export")::

    DIR/runs/part-00000.parquet          one file per table per export invocation ("part")
    DIR/kv_events/part-00000.parquet     row groups of ROW_GROUP_ROWS to 2x that, written as they fill
    ...                                  (devices, memory_events, samples, engine_steps, engine_requests)

Each table is a folder of parts, the layout Spark, DuckDB and pyarrow.dataset read as one table. A later
export into the same DIR adds the next part and skips sources already in it (same resolved path) and
unchanged since (analyzers.export_state). One that changed since (a run read while it was being recorded)
is exported again: copy on write, as table formats update rows, the new part takes its fresh rows and the
other rows of the parts that held it, and replaces those parts as an overwrite replaces all of them.
Every table gets a part, even with no rows, so its schema is always there to query. Parts are written
under a temporary name and renamed only when every table's is complete, `runs` last: its part is the mark
that part N was committed. A killed or failed export (a full disk) thus leaves no runs part, its sources
are not "already exported", and the next export removes what it left: an empty `runs/.pending-NNNNN`, made
before any file of part N and removed after its runs part, proves them its own. Nothing else in DIR is
removed: a file there that is not a kvtrace part (a user's own dataset), a kvtrace part without its runs
part and without that mark, or a file of a part's name that is empty or not Parquet (a damaged export: a
full disk, a killed copy), is refused in one line and kept, unless `--overwrite` is to replace it.

`--overwrite` never removes a part before its replacement is committed: the new part is written beside the
old ones, numbered after them, and an empty mark `runs/.overwrite-NNNNN` is made before its runs part is
renamed into place. From that rename on, readers take the parts below the mark's number as gone; they are
then removed, and the mark last. A failed, interrupted or empty overwrite thus leaves the earlier export
whole, and one killed while removing the old parts leaves the new one, whose removal the next export ends.
A re-export's mark `runs/.replaced-PPPPP-by-NNNNN` takes part P alone as gone once runs part N is there.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Collection
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from analyzers.tables import SCHEMA_VERSION, TABLE_KEY, TABLE_NAMES
from kvtrace.errors import KvtraceError, cannot_write

ROW_GROUP_ROWS = 1 << 17
_COMPACT_PIECES = 64
_PART = re.compile(r"^part-(\d+)\.parquet$")
_OVERWRITE_MARK = re.compile(r"^\.overwrite-(\d+)$")
_REPLACED_MARK = re.compile(r"^\.replaced-(\d+)-by-(\d+)$")
_PENDING_MARK = re.compile(r"^\.pending-(\d+)$")
_TMP_PART = re.compile(r"^\.part-(\d+)\.parquet\.tmp$")
_MARKS = (_OVERWRITE_MARK, _REPLACED_MARK, _PENDING_MARK)


class _TableWriter:
    """One table's part file: rows are buffered across sources and written as row groups once
    ROW_GROUP_ROWS have gathered, so a thousand one-row sources do not make a thousand row groups."""

    def __init__(self, folder: Path, part: int, schema: pa.Schema) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.part = part
        self.final = folder / f"part-{part:05d}.parquet"
        self.tmp = folder / f".part-{part:05d}.parquet.tmp"
        self.schema = schema
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd")

    def add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self.flush()
        elif len(self._pending) >= _COMPACT_PIECES:
            # Many one-run tables cost far more than their rows (buffers per column per piece): merge.
            self._pending = [pa.concat_tables(self._pending).combine_chunks()]

    def flush(self) -> None:
        if self._pending:
            # Up to twice the threshold per group: a buffer just over it is not split into a runt group.
            try:
                self._writer.write_table(pa.concat_tables(self._pending), row_group_size=2 * ROW_GROUP_ROWS)
            except OSError as exc:  # pyarrow's errors name no file
                raise cannot_write(self.final, exc) from None
            self._pending.clear()
            self._pending_rows = 0

    def finish(self) -> None:
        """Write the rest and close the temporary file, complete but not yet visible."""
        self.flush()
        try:
            if self.rows == 0:  # an empty table still carries its schema
                self._writer.write_table(self.schema.empty_table())
            self._writer.close()
        except OSError as exc:
            raise cannot_write(self.final, exc) from None

    def commit(self) -> None:
        try:
            os.replace(self.tmp, self.final)
        except OSError as exc:
            raise cannot_write(self.final, exc) from None

    def discard(self) -> None:
        """Drop the part, committed or not, and the table's folder if that leaves it empty (a failed first
        export leaves no empty folders behind); never raises (it runs while another error goes up)."""
        with contextlib.suppress(OSError, pa.ArrowException):
            self._writer.close()  # on a full disk the footer fails too
        for path in (self.tmp, self.final):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # fails, as it should, while the folder holds earlier parts
            self.final.parent.rmdir()


def _overwrite_mark(out_dir: Path, part: int) -> Path:
    """The mark of an overwrite by `part`: once runs' part `part` is there, every part below it is gone."""
    return out_dir / "runs" / f".overwrite-{part:05d}"


def _replaced_mark(out_dir: Path, replaced: int, part: int) -> Path:
    """The mark of a re-export by `part`: once runs' part `part` is there, part `replaced` is gone."""
    return out_dir / "runs" / f".replaced-{replaced:05d}-by-{part:05d}"


def _commit(
    writers: dict[str, _TableWriter], root: Path, overwrite: bool = False, replaced: Collection[int] = ()
) -> None:
    """All tables' parts or none: every file is complete before the first rename, and `runs` is renamed
    last, so that a failure anywhere leaves no runs part (the mark of a committed part) behind. With
    `overwrite`, the earlier parts are replaced in that same last rename, and only then removed; so are the
    parts numbered in `replaced` (a re-export's)."""
    runs = writers["runs"]
    if overwrite:
        marks = [_overwrite_mark(root, runs.part)]
    else:
        marks = [_replaced_mark(root, number, runs.part) for number in sorted(replaced)]
    try:
        for writer in writers.values():
            writer.finish()
        for mark in marks:
            try:
                mark.touch()
            except OSError as exc:
                raise cannot_write(mark, exc) from None
        for name, writer in writers.items():
            if name != "runs":
                writer.commit()
        runs.commit()
    except BaseException:
        _abandon(writers, root, runs.part, marks)
        raise
    with contextlib.suppress(OSError):  # else the next export removes it: its runs part is there
        _pending_mark(root, runs.part).unlink()
    if marks:
        # The new part is committed and the old ones already out of sight: one that cannot be removed now
        # (a permission) is removed by the next export into this folder, which says so if it cannot either.
        with contextlib.suppress(OSError, KvtraceError):
            _remove_uncommitted(root, overwrite)


def _abandon(writers: dict[str, _TableWriter], root: Path, part: int, marks: Collection[Path] = ()) -> None:
    """Drop an uncommitted part: its files and `marks`, then its pending mark (last: a kill before leaves
    the files provably the next export's to remove), then the runs folder if that leaves it empty; never
    raises (it runs while another error goes up)."""
    for writer in writers.values():
        writer.discard()
    pending = _pending_mark(root, part)
    for mark in [*marks, pending]:
        with contextlib.suppress(OSError):
            mark.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        pending.parent.rmdir()


def _pending_mark(out_dir: Path, part: int) -> Path:
    """Made before any file of part `part` and removed once its runs part is renamed into place: while it is
    there without that runs part, the part's files are those of an export that was killed."""
    return out_dir / "runs" / f".pending-{part:05d}"


def _footer_table(path: Path) -> bytes | None:
    """The table a Parquet file's footer names (`kvtrace.table`), read without its data; None for a file
    kvtrace did not write. A file that cannot be read is refused: it is not provably kvtrace's."""
    try:
        return (pq.read_schema(path).metadata or {}).get(TABLE_KEY)
    except (OSError, pa.ArrowInvalid) as exc:
        raise KvtraceError(
            f"{path}: not a readable Parquet file ({exc}), left as it is; move it out of the export's table "
            "folders, or export into a new -o DIR"
        ) from None


def _damage(path: Path) -> str | None:
    """What is wrong with a regular file of kvtrace's part name that Parquet cannot read for its bytes (not
    for a permission or a link): "empty (0 bytes)", or Parquet's reason. None for any other file. A full
    disk, a killed copy or a crash before the rename reached the disk leaves such a part."""
    return _read_footer(path)[0]


def _read_footer(path: Path) -> tuple[str | None, pa.Schema | None]:
    """`_damage`'s reason, and the schema whose footer it read, if it read one: a part is checked with one
    read of its footer, not one for its damage and another for its table. No schema where none was read (a
    link, a file not readable)."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            return None, None
        if info.st_size == 0:
            return "empty (0 bytes)", None
        return None, pq.read_schema(path)
    except pa.ArrowInvalid as exc:
        return f"not readable as Parquet ({exc})", None
    except PermissionError:
        return None, None
    except OSError as exc:  # a footer whose bytes are damaged ("Couldn't deserialize thrift") in a file read
        return (f"not readable as Parquet ({exc})" if os.access(path, os.R_OK) else None), None


def _check_part(path: Path) -> tuple[int, str | None]:
    """The number of a part in a table's folder, which must be kvtrace's part of that table (by its name and
    its footer): a user's own Parquet file there (pyarrow's `part-0.parquet`, Spark's
    `part-00000-<uuid>.snappy.parquet`) is refused, never read as a part nor removed as a leftover. A file
    of kvtrace's part name whose bytes are not Parquet (`_damage`) is a damaged part, returned with what is
    wrong: nothing a user wrote is that, and it holds no rows to keep."""
    table = path.parent.name
    m = _PART.match(path.name)
    if m is not None and path.name == f"part-{int(m.group(1)):05d}.parquet":
        damage, schema = _read_footer(path)
        if damage is not None:
            return int(m.group(1)), damage
        # a link or an unreadable file: read (and refused) as before, by `_footer_table`
        named = (schema.metadata or {}).get(TABLE_KEY) if schema is not None else _footer_table(path)
        if named == table.encode():
            return int(m.group(1)), None
    raise KvtraceError(
        f"{path}: not a kvtrace {table} part, left as it is; export into a folder of kvtrace's own "
        "(a new -o DIR)"
    )


def _damaged_part(out_dir: Path, path: Path, damage: str, number: int, files: list[Path]) -> KvtraceError:
    """The one line for a damaged part file found without --overwrite: what is wrong, and how to export
    into the folder again."""
    named = ", ".join(f.relative_to(out_dir).as_posix() for f in sorted(files))
    return KvtraceError(
        f"{path}: {damage}: a damaged part of this export (cut by a full disk, a killed copy or a crash), "
        "left as it is; export again with --overwrite to replace the whole export with the inputs given, or "
        f"remove part {number}'s {len(files)} files ({named}) and export its inputs again, or export into a "
        "new -o DIR"
    )


def _remove_uncommitted(out_dir: Path, overwrite: bool = False) -> None:
    """Remove what a killed or failed export left, and nothing else: the files of a part whose `.pending`
    mark is there without its runs part (the runs part is renamed last, the mark removed after it); other
    temporary files whose footer says they are kvtrace's; parts a committed overwrite or re-export replaced;
    and the whole of a part whose runs part is there beside another table's temporary file of its number
    (kvtrace 0.1.0 renamed the tables one by one: it goes whole, so that its sources are exported again).
    The marks go last: until every part they replaced is gone, readers need them.

    A temporary file of kvtrace's own hidden name (`.part-NNNNN.parquet.tmp`) goes whatever mark is there: an
    export of an earlier kvtrace, killed, left it without one. Anything else is refused in one line before a
    file is touched: a Parquet file in a table's folder that is not kvtrace's part of that table, and the
    parts whose runs part is missing with no mark to say why (a damaged export: a copy that left runs out, a
    stray rm; every file of the first is named), and a file of a part's name whose bytes are not Parquet (an
    empty one: `_damage`), unless `overwrite` is to replace them (they are then left for `_commit`, numbered
    below the new part)."""
    folders = [out_dir / table for table in TABLE_NAMES if (out_dir / table).is_dir()]
    runs_folder = out_dir / "runs"
    dotted = list(runs_folder.glob(".*")) if runs_folder.is_dir() else []
    marks = [p for p in dotted if any(r.match(p.name) for r in _MARKS)]
    pending = {int(m.group(1)) for p in marks if (m := _PENDING_MARK.match(p.name))}
    checked = {
        p: _check_part(p) for folder in folders for p in sorted(folder.glob("*.parquet")) if p.name[0] != "."
    }
    parts = {p: number for p, (number, _) in checked.items()}
    runs_parts = sorted(p for p in parts if p.parent == runs_folder)
    floor, single = _replaced(runs_parts)
    committed = {p.name for p in _not_replaced(runs_parts)}
    leftovers: list[Path] = []
    unfinished: set[int] = set()  # 0.1.0's half-committed parts
    for folder in folders:
        for path in folder.glob(".*"):
            # Killed while writing (by this kvtrace, whose mark names it, or by an earlier one, which made
            # none): a hidden temporary file of kvtrace's own name, which no reader takes for a part
            if (m := _TMP_PART.match(path.name)) is None:
                continue
            number = int(m.group(1))
            if f"part-{number:05d}.parquet" in committed:
                unfinished.add(number)
            leftovers.append(path)
    for path, (number, damage) in checked.items():
        # A damaged part file that no export replaced: refused unless `overwrite` is to replace it (left for
        # `_commit`, which removes it, numbered below the new part, once that is committed)
        gone = number in pending or number < floor or number in single
        if damage is not None and not gone and not overwrite:
            raise _damaged_part(out_dir, path, damage, number, [p for p, n in parts.items() if n == number])
    damaged: dict[int, list[Path]] = {}
    for path, number in parts.items():
        if path.name in committed and number not in unfinished:
            continue
        if number in pending or number in unfinished or number < floor or number in single:
            leftovers.append(path)
        elif not overwrite:
            damaged.setdefault(number, []).append(path)
    if damaged:
        number, files = min(damaged.items())
        others = f" (and {len(damaged) - 1} other part(s) alike)" if len(damaged) > 1 else ""
        missing = runs_folder / f"part-{number:05d}.parquet"
        named = ", ".join(str(f.relative_to(out_dir)) for f in sorted(files))
        raise KvtraceError(
            f"{out_dir}: part {number}'s runs part ({missing}) is missing{others}: a damaged export, left as "
            f"it is; its rows name no run. Remove its {len(files)} files ({named}) to export into it again, "
            "or export into a new -o DIR"
        )
    for path in [*leftovers, *marks]:
        path.unlink(missing_ok=True)


def _replaced(runs_parts: list[Path]) -> tuple[int, set[int]]:
    """The parts replaced by a committed overwrite (every one below the number returned, 0: none) or
    re-export (the set): their marks count once the runs part that replaced them is there."""
    if not runs_parts:
        return 0, set()
    present = {int(m.group(1)) for p in runs_parts if (m := _PART.match(p.name))}
    floor, single = 0, set()
    for mark in runs_parts[0].parent.glob(".*"):
        if (m := _OVERWRITE_MARK.match(mark.name)) and int(m.group(1)) in present:
            floor = max(floor, int(m.group(1)))
        elif (m := _REPLACED_MARK.match(mark.name)) and int(m.group(2)) in present:
            single.add(int(m.group(1)))
    return floor, single


def _not_replaced(parts: list[Path]) -> list[Path]:
    floor, single = _replaced(parts)
    if not floor and not single:
        return parts
    return [
        p
        for p in parts
        if (m := _PART.match(p.name)) and int(m.group(1)) >= floor and int(m.group(1)) not in single
    ]


def table_files(export_dir: str | os.PathLike[str], table: str) -> list[Path]:
    """The table's committed parts: those whose runs part is there (an export renames it last), less those
    a committed overwrite replaced (still there while it removes them)."""
    folder = Path(export_dir) / table
    parts = sorted(p for p in folder.glob("part-*.parquet") if p.is_file()) if folder.is_dir() else []
    if table == "runs":
        return _not_replaced(parts)
    if not parts:
        return parts
    committed = {p.name for p in table_files(export_dir, "runs")}
    return [p for p in parts if p.name in committed]


def is_export_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder holding a committed runs part. A folder that cannot be searched is none:
    read as a folder of inputs, it is named as unreadable itself (not its `runs`, which may not exist)."""
    try:
        return Path(path).is_dir() and bool(table_files(path, "runs"))
    except OSError:
        return False


def check_schema_version(files: list[Path]) -> None:
    """Refuse parts written by a newer kvtrace (their columns may mean something else)."""
    for file in files:
        try:
            metadata = pq.read_schema(file).metadata or {}
        except (OSError, pa.ArrowInvalid) as exc:
            damaged = (
                ": a damaged part of this export (an export cut short, a disk that filled); run the "
                "`kvtrace export` that wrote it again with --overwrite"
                if _damage(file) is not None
                else ""
            )
            raise KvtraceError(f"{file}: not a readable Parquet file ({exc}){damaged}") from None
        version = int(metadata.get(b"kvtrace.schema_version", b"0") or 0)
        if version > SCHEMA_VERSION:
            raise KvtraceError(
                f"{file}: export schema version {version} is newer than this kvtrace reads "
                f"({SCHEMA_VERSION}); upgrade kvtrace"
            )


def _next_part(out_dir: Path) -> int:
    """One past every part there, committed or not (a damaged one an overwrite replaces): a new part never
    takes the name of a file already in the folder."""
    numbers = [
        int(match.group(1))
        for table in TABLE_NAMES
        for file in (out_dir / table).glob("part-*.parquet")
        if (match := _PART.match(file.name))
    ]
    return max(numbers, default=-1) + 1
