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
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtrace import format as fmt
from kvtrace.attr_patch import AttrPatch
from kvtrace.errors import RecordingError
from kvtrace.json_writes import write_json_atomic
from kvtrace.run_lock import lock_for_recording
from kvtrace.run_removal import check_run_removal


def rank_facts() -> dict[str, Any] | None:
    """`rank`, `world_size`, `local_rank`, `hostname`, `backend` of this process; None outside a group.

    `local_rank` comes from the launcher's `LOCAL_RANK` (torchrun and most launchers set it); None when
    the launcher did not say, rather than a guess.
    """
    local_rank: int | None = None
    with contextlib.suppress(ValueError):
        local_rank = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
    try:
        import torch.distributed as dist
    except ImportError:
        return _launched_rank(local_rank)
    if not (dist.is_available() and dist.is_initialized()):
        return _launched_rank(local_rank)
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


def _launched_rank(local_rank: int | None) -> dict[str, Any] | None:
    """This process's rank as the launcher says it (torchrun's `RANK` and `WORLD_SIZE`) before the script
    joins its process group: `kvtrace run` under torchrun starts recording before the script's
    `init_process_group`, and every rank recorded into one folder, each refusing the other's lock. None
    outside a launcher of several processes; the backend is not known yet."""
    try:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return None
    if world_size <= 1 or not 0 <= rank < world_size:
        return None
    return {
        "rank": rank,
        "world_size": world_size,
        "local_rank": local_rank,
        "hostname": socket.gethostname(),
        "backend": None,
    }


def joined_backend() -> str | None:
    """The backend of the process group this process has joined, None when it has joined none."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return str(dist.get_backend())
    except (ImportError, RuntimeError, ValueError):
        pass
    return None


class BackendWatch:
    """The backend of a rank recorded before its script joins its process group (`_launched_rank`: `kvtrace
    run` under torchrun), learnt once the script has joined: when it leaves the group
    (`destroy_process_group`, which scripts call at their end, before the recording ends) or, still joined,
    when the recording ends. Nothing on the per-step path: one wrapper on `destroy_process_group`, put back
    by `uninstall`."""

    def __init__(self) -> None:
        self.backend: str | None = None
        self._patch: AttrPatch | None = None

    def install(self) -> None:
        try:
            import torch.distributed as dist
        except ImportError:
            return
        if not dist.is_available():
            return
        original = dist.destroy_process_group

        def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
            if self.backend is None:
                self.backend = joined_backend()
            return original(*args, **kwargs)

        self._patch = AttrPatch(dist, "destroy_process_group", destroy_process_group)

    def uninstall(self) -> None:
        """Read the backend if the group is still joined, and put `destroy_process_group` back."""
        if self.backend is None:
            self.backend = joined_backend()
        patch, self._patch = self._patch, None
        if patch is not None:
            patch.undo()


def run_path(out_dir: Path, facts: dict[str, Any] | None, overwrite: bool) -> Path:
    """Where this process writes its run: `out_dir` itself, or `out_dir/rank-<r>` in a group of several.

    A folder holds one recording, a run or a group. Recording the other kind into it is refused like a
    run already there, and with `overwrite` replaces it wholly: a plain run removes the group's rank runs
    and marker, rank 0 of a group the plain run's files, so that no reader mixes two recordings or reads
    the old one. Rank 0 writes the group marker, and with `overwrite` removes rank directories a larger
    world left behind. Readers never need the marker (rank 0 may die first).
    """
    if facts is None or int(facts["world_size"]) <= 1:
        ranks = [folder for _, folder in fmt.rank_dirs(out_dir)]
        if ranks and not overwrite:
            raise RecordingError(
                f"{out_dir}: already holds a kvtrace run group (pass overwrite=True to replace it)"
            )
        if overwrite:
            remove_runs(ranks)
            if (out_dir / fmt.GROUP_MARKER).is_file():
                _unlink(out_dir / fmt.GROUP_MARKER)
        return out_dir
    rank, world_size = int(facts["rank"]), int(facts["world_size"])
    if fmt.is_run_dir(out_dir):  # a plain run: every rank refuses it, rank 0 replaces it
        if not overwrite:
            raise RecordingError(
                f"{out_dir}: already holds a kvtrace run (pass overwrite=True to replace it)"
            )
        if rank == 0:
            remove_run(out_dir, keep_folder=True)  # the other ranks may be making their folders in it
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if overwrite:
            remove_runs([folder for other, folder in fmt.rank_dirs(out_dir) if other >= world_size])
        marker = {
            "format": fmt.GROUP_FORMAT,
            "schema_version": fmt.SCHEMA_VERSION,
            "world_size": world_size,
            "backend": facts.get("backend"),
        }
        write_json_atomic(out_dir / fmt.GROUP_MARKER, marker)
    return out_dir / f"{fmt.RANK_DIR_PREFIX}{rank}"


def remove_run(folder: Path, keep_folder: bool = False) -> None:
    """Remove the run in `folder` (`remove_runs`)."""
    remove_runs([folder], keep_folder)


def remove_runs(
    folders: list[Path], keep_folder: bool = False, before: Callable[[], None] | None = None
) -> None:
    """Remove the runs in `folders`: the files each run owns (`kvtrace.run_removal`: its manifest last, so
    that a removal cut short still reads as a run, which `overwrite` replaces), then each folder once
    empty. Anything else in them is the user's and stays, with the folder. Every folder is locked and
    looked at before any file goes (then `before` runs: what goes with them): one another recording is
    writing, or holding what the removal must not touch (a link in place of profiler/), refuses them all."""
    locks = []
    try:
        for folder in folders:
            locks.append(lock_for_recording(folder))
        removals = [check_run_removal(folder) for folder in folders]
        if before is not None:
            before()
        for removal in removals:
            removal.remove()
    finally:
        for lock in locks:
            lock.release()  # removes the lock file
    if not keep_folder:
        for folder in folders:
            with contextlib.suppress(OSError):  # not empty: the user's files stay
                folder.rmdir()


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise RecordingError(f"{path}: cannot remove ({exc.strerror or exc})", exit_code=1) from None


def local_tensor(tensor: Any) -> Any:
    """The shard this rank holds: a DTensor's local tensor (transformers' tensor-parallel weights are
    DTensors, whose own storage is a wrapper without data), any other tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor
