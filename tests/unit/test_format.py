"""The run-directory reader: interrupted, corrupt and wrong-version runs give exact results or one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtrace.errors import KvtraceError
from kvtrace.format import KV_EVENTS, MANIFEST, SCHEMA_VERSION, next_cache_id
from kvtrace.run_reader import read_run


def _run(tmp_path: Path, manifest: object, events: str = "") -> Path:
    (tmp_path / MANIFEST).write_text(json.dumps(manifest) if not isinstance(manifest, str) else manifest)
    (tmp_path / KV_EVENTS).write_text(events)
    return tmp_path


def _event(seq: int) -> str:
    return json.dumps(
        {
            "seq": seq,
            "t_ns": seq,
            "step": 1,
            "phase": "prefill",
            "event": "created",
            "layer": 0,
            "kv": "k",
            "part": "data",
            "addr": 16 * seq,
            "storage_bytes": 64,
        }
    )


GOOD = {"format": "kvtrace-run", "schema_version": SCHEMA_VERSION, "ended": {"status": "running"}}


def test_cut_last_line_is_dropped_and_reported(tmp_path: Path) -> None:
    run = read_run(_run(tmp_path, GOOD, _event(1) + "\n" + _event(2) + "\n" + _event(3)[:25]))
    assert [e.seq for e in run.kv_events] == [1, 2]
    assert run.truncated and not run.complete


def test_corrupt_line_in_the_middle_names_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(KvtraceError, match=r"kv_events\.jsonl: line 2 is not valid JSON"):
        read_run(_run(tmp_path, GOOD, _event(1) + "\n{oops\n" + _event(3) + "\n"))


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("{not json", "corrupt manifest"),
        ({"format": "something-else"}, "not a kvtrace manifest"),
        ({"format": "kvtrace-run"}, "missing or invalid schema_version"),
        ({"format": "kvtrace-run", "schema_version": SCHEMA_VERSION + 1}, "newer than this kvtrace reads"),
    ],
)
def test_bad_manifests(tmp_path: Path, manifest: object, message: str) -> None:
    with pytest.raises(KvtraceError, match=message):
        read_run(_run(tmp_path, manifest))


def test_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(KvtraceError, match="not a kvtrace run directory"):
        read_run(tmp_path)


def test_transformers_cache_ids_step_over_every_other_sources_id() -> None:
    # The other sources keep the ids older runs gave them: module caches, track(), vLLM's and CB's pools
    # (module caches 1000 to 1099: one id per cache-holding module of a layer)
    reserved = (*range(1000, 1100), 2000, 3000, 3100)
    ids = [next_cache_id(0)]
    while len(ids) < 4000:
        ids.append(next_cache_id(ids[-1]))
    # 4000 caches count 1 to 4103, the 103 ids below that left out: the 1000th cache is 1100, the 3100th 3203
    assert ids == [cid for cid in range(1, 4000 + len(reserved) + 1) if cid not in reserved]
    assert (ids[999], ids[1999], ids[2999], ids[3099]) == (1100, 2101, 3103, 3203)
