"""A folder holds one recording, a plain run or a run group of 2 gloo ranks: recording the other kind into
it is refused like a run already there, and with `overwrite=True` replaces it wholly, so that `report`
shows the new recording and `export` finds it alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_worker as worker
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.format import GROUP_MARKER, is_run_dir, is_run_group

WORLD = 2


def _plain_run(out: Path, overwrite: bool = False) -> int:
    """A plain run (no process group) of one tracked K tensor; its KV bytes."""
    kv = torch.zeros(1, 2, 4, 8)
    with kvtrace.record(out, profiler=False, nvtx=False, overwrite=overwrite):
        kvtrace.track(kv, layer=0, kind="k")
    return kv.untyped_storage().nbytes()


def _report(out: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["report", str(out), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_group_and_a_plain_run_replace_each_other_only_with_overwrite(tmp_path, capsys):
    out, facts_dir = tmp_path / "out", tmp_path / "facts"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    # GIVEN a plain run in the folder
    plain_bytes = _plain_run(out)
    plain_files = sorted(p.name for p in out.iterdir())
    # WHEN a 2-rank group is recorded into it without overwrite, THEN every rank refuses, in one line
    assert worker.launch("hf-dp", out, facts_dir / "refused", WORLD) == [1, 1]
    for rank in range(WORLD):
        log = (facts_dir / "refused" / f"rank-{rank}.log").read_text()
        assert (
            f"RecordingError: {out}: already holds a kvtrace run (pass overwrite=True to replace it)" in log
        )
    assert sorted(p.name for p in out.iterdir()) == plain_files
    assert _report(out, capsys)["kv"]["final_bytes"] == plain_bytes

    # WHEN it is recorded with overwrite, THEN the plain run's files are gone and the group is what reads
    statuses = worker.launch("hf-dp-overwrite", out, facts_dir / "group", WORLD)
    assert statuses == [0] * WORLD, (facts_dir / "group" / "rank-0.log").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [GROUP_MARKER, "notes.txt", "rank-0", "rank-1"]
    assert is_run_group(out)
    facts = [json.loads((facts_dir / "group" / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    data = _report(out, capsys)
    assert data["world_size"] == WORLD and [r["rank"] for r in data["ranks"]] == [0, 1]
    assert data["kv"]["final_bytes"] == sum(f["kv_bytes"] for f in facts)

    # WHEN a plain run is recorded into the group's folder without overwrite, THEN it is refused
    with pytest.raises(kvtrace.RecordingError) as refused:
        _plain_run(out)
    assert (
        str(refused.value) == f"{out}: already holds a kvtrace run group (pass overwrite=True to replace it)"
    )
    assert is_run_group(out) and not is_run_dir(out)

    # AND with overwrite it replaces the group: no rank folder nor marker left, one run exported
    _plain_run(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == plain_files
    assert is_run_dir(out) and not is_run_group(out)
    assert _report(out, capsys)["kv"]["final_bytes"] == plain_bytes
    assert main(["query", str(out), "select count(*) as runs from runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"runs": 1}]
