"""Rank facts from `torch.distributed`, and where each rank of a run group writes its run.

Inside an initialized process group of more than one process, `kvtrace.record(out_dir)` writes one run
directory per rank at `out_dir/rank-<r>/` (`out_dir` is then a run group, see kvtrace.format). A group
of one process (fairscale and other libraries often initialize gloo with world size 1) records a plain run
in `out_dir`, with its rank facts in the manifest all the same.

Every rank finds its own directory from its own rank, with no collective call: a rank that raises, or
dies, never blocks or breaks the others' recordings.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from kvtrace import format as fmt


def rank_facts() -> dict[str, Any] | None:
    """`rank`, `world_size`, `local_rank`, `hostname`, `backend` of this process; None outside a group.

    `local_rank` comes from the launcher's `LOCAL_RANK` (torchrun and most launchers set it); None when
    the launcher did not say, rather than a guess.
    """
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    local_rank: int | None = None
    with contextlib.suppress(ValueError):
        local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    backend: str | None
    try:
        backend = str(dist.get_backend())
    except (RuntimeError, ValueError):
        backend = None
    return {
        "rank": dist.get_rank(),
        "world_size": dist.get_world_size(),
        "local_rank": local_rank,
        "hostname": socket.gethostname(),
        "backend": backend,
    }


def run_path(out_dir: Path, facts: dict[str, Any] | None, overwrite: bool) -> Path:
    """Where this process writes its run: `out_dir` itself, or `out_dir/rank-<r>` in a group of several.

    Rank 0 writes the group marker, and with `overwrite` removes rank directories a larger world left
    behind, so that no reader mixes two recordings. Readers never need the marker (rank 0 may die first).
    """
    if facts is None or int(facts["world_size"]) <= 1:
        return out_dir
    rank, world_size = int(facts["rank"]), int(facts["world_size"])
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for other, folder in fmt.rank_dirs(out_dir):
                if other >= world_size:
                    shutil.rmtree(folder, ignore_errors=True)
        marker = {
            "format": fmt.GROUP_FORMAT,
            "schema_version": fmt.SCHEMA_VERSION,
            "world_size": world_size,
            "backend": facts.get("backend"),
        }
        fmt.write_json_atomic(out_dir / fmt.GROUP_MARKER, marker)
    return out_dir / f"{fmt.RANK_DIR_PREFIX}{rank}"


def local_tensor(tensor: Any) -> Any:
    """The shard this rank holds: a DTensor's local tensor (transformers' tensor-parallel weights are
    DTensors, whose own storage is a wrapper without data), any other tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
