"""Which group an exported source belongs to (`runs.group_id`), unique per group within an export.

A group is one job's processes: the ranks of a run group (one folder, group.json), or Chrome traces of one
distributed job. `group_id` starts as the run_id of the folder holding the source (`runs/tp`); another
group already exported under that name (the same relative path from another working directory) takes
`runs/tp#2`, as run_ids do, so that `GROUP BY group_id` never adds two jobs up. The name is kept by the
group's folder (resolved) across later exports into the same folder: a rank re-exported, or a rank added
later, joins the group_id its folder already has.

Traces name no group folder of their own, only their `distributedInfo`: traces in one folder are one group
when they agree on `backend` and `world_size` (rank 0 of 16 over nccl and rank 34 of 300 over gloo, side by
side in a folder, are two jobs). Traces that also agree there but come from two jobs cannot be told apart.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from analyzers.export_inputs import parquet_text

# (kind, resolved folder, backend, world_size): a run group is its folder; traces add their job's shape
GroupKey = tuple[str, str, str | None, int | None]

_COLUMNS = ("group_id", "path", "source_kind", "backend", "world_size")


def group_key(path: Path, source_kind: str, backend: str | None, world_size: int | None) -> GroupKey:
    """The group of a source at resolved `path` (a rank directory or a trace file)."""
    folder = parquet_text(str(Path(path).parent))  # as the `path` column holds it
    if source_kind == "run":
        return ("run", folder, None, None)
    return ("trace", folder, backend, world_size)


class GroupIds:
    """Hands out group_ids: the one a group already has in the export, else its name made unique."""

    def __init__(self) -> None:
        self._ids: dict[GroupKey, str] = {}
        self._taken: set[str] = set()
        self._left_out: dict[Path, dict[str, str]] = {}

    def left_out(self, rank_dir: Path) -> str | None:
        """Why `kvtrace report` leaves the rank folder `rank_dir` out of its group's figures (a copy of
        another rank's run...: analyzers.readers.run_group.folders_left_out), None when it is one of the
        group's ranks. Each group folder's manifests are read once per export, not once per rank."""
        from analyzers.readers.run_group import folders_left_out

        group_dir = rank_dir.parent
        if group_dir not in self._left_out:
            self._left_out[group_dir] = folders_left_out(group_dir)
        return self._left_out[group_dir].get(rank_dir.name)

    @classmethod
    def of_export(cls, files: list[Path]) -> GroupIds:
        """The groups the committed runs parts `files` hold."""
        groups = cls()
        for file in files:
            names = set(pq.read_schema(file).names)
            rows = pq.read_table(file, columns=[c for c in _COLUMNS if c in names]).to_pylist()
            for row in rows:
                group_id, path = row.get("group_id"), row.get("path")
                if not group_id or not path:
                    continue
                kind = "run" if row.get("source_kind") == "run" else "trace"
                key = group_key(Path(path), kind, row.get("backend"), row.get("world_size"))
                # parts of a kvtrace that gave two groups one id keep it: the first keeps the name
                groups._ids.setdefault(key, group_id)
                groups._taken.add(group_id)
        return groups

    def id_for(self, key: GroupKey, name: str) -> str:
        """The group_id of `key`: its own if it has one, else `name`, or `name#N` when that is taken."""
        known = self._ids.get(key)
        if known is not None:
            return known
        group_id, n = name, 2
        while group_id in self._taken:
            group_id, n = f"{name}#{n}", n + 1
        self._ids[key] = group_id
        self._taken.add(group_id)
        return group_id
