"""A process group of one (fairscale and others initialize gloo with world size 1): a plain run in
out_dir, not a group, with its rank facts in the manifest all the same."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

import kvtrace
from kvtrace.format import MANIFEST, is_run_dir, is_run_group


def test_world_of_one_records_a_plain_run_with_rank_facts(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # the launcher did not say: null, not a guess
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        with kvtrace.record(tmp_path / "run", profiler=False, nvtx=False):
            kv = torch.zeros(1, 2, 4, 8)
            kvtrace.track(kv, layer=0, kind="k")
    finally:
        torch.distributed.destroy_process_group()
    out = tmp_path / "run"
    assert is_run_dir(out) and not is_run_group(out)
    assert not any(p.name.startswith("rank-") for p in out.iterdir())
    manifest = json.loads((out / MANIFEST).read_text())
    assert {k: manifest[k] for k in ("rank", "world_size", "local_rank", "hostname", "backend")} == {
        "rank": 0,
        "world_size": 1,
        "local_rank": None,
        "hostname": socket.gethostname(),
        "backend": "gloo",
    }


def test_outside_a_process_group_the_manifest_has_no_rank(tmp_path):
    assert not torch.distributed.is_initialized()
    with kvtrace.record(tmp_path / "run", profiler=False, nvtx=False):
        pass
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert "rank" not in manifest and "world_size" not in manifest


def test_a_group_carries_a_dead_ranks_kv_and_its_budget(tmp_path, capsys):
    # GIVEN a group of two ranks recorded with a 64 MiB budget (this repo's dynamic sample run, twice);
    # rank 1 died after step 2: its log stops there, its manifest still says "running"
    import shutil

    from kvtrace.cli import main

    sample = Path(__file__).resolve().parents[2] / "sample_traces" / "dynamic_b2"
    group = tmp_path / "group"
    for rank in (0, 1):
        shutil.copytree(sample, group / f"rank-{rank}", ignore=shutil.ignore_patterns("kv_counters*", "tb_*"))
        manifest = json.loads((group / f"rank-{rank}" / MANIFEST).read_text())
        manifest.update(rank=rank, world_size=2, options={**manifest["options"], "gpu_memory": 64 << 20})
        if rank == 1:
            manifest["ended"] = {"status": "running"}
            events = (group / "rank-1" / "kv_events.jsonl").read_text().splitlines()
            kept = [line for line in events if json.loads(line)["step"] <= 2]
            (group / "rank-1" / "kv_events.jsonl").write_text("\n".join(kept) + "\n")
        (group / f"rank-{rank}" / MANIFEST).write_text(json.dumps(manifest))
    # WHEN it is compared, THEN the group's KV per step keeps the dead rank's last state (its cache was never
    # freed), and ends at the group's final KV
    assert main(["compare", str(group), str(sample), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    whole, alone = runs[0], runs[1]
    rank1_last = alone["kv_by_step"]["2"]
    for step, held in alone["kv_by_step"].items():
        rank1 = rank1_last if int(step) >= 2 else held
        assert whole["kv_by_step"][step] == held + rank1, step
    # AND the group's report names the rank that crossed the budget first, in text, JSON and HTML
    assert main(["report", str(group), "--json", "--no-export"]) == 0
    budget = json.loads(capsys.readouterr().out)["budget"]
    assert budget["bytes"] == 64 << 20 and budget["crossed"] and budget["rank"] in (0, 1)
    page = tmp_path / "group.html"
    assert main(["report", str(group), "--no-export", "-o", str(page)]) == 0
    assert f"budget 64.00 MiB (rank {budget['rank']})" in capsys.readouterr().out
    assert f"budget 64.00 MiB (rank {budget['rank']})" in page.read_text()


def test_runs_of_a_world_of_one_export_as_plain_runs_not_a_group(tmp_path):
    # GIVEN two unrelated runs, each recorded in a process group of one (rank 0 of 1), in one folder
    import pyarrow.parquet as pq

    from kvtrace.cli import main

    runs = tmp_path / "runs"
    for name, tokens in (("a", 4), ("b", 6)):
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{tmp_path / f'pg_{name}'}", rank=0, world_size=1
        )
        try:
            with kvtrace.record(runs / name, profiler=False, nvtx=False):
                kv = torch.zeros(1, 2, tokens, 8)
                kvtrace.track(kv, layer=0, kind="k")
        finally:
            torch.distributed.destroy_process_group()
    assert not is_run_group(runs)
    # WHEN both are exported
    assert main(["export", str(runs / "a"), str(runs / "b"), "-o", str(tmp_path / "out"), "-q"]) == 0
    rows = pq.read_table(tmp_path / "out" / "runs").to_pylist()
    # THEN each keeps its rank facts but belongs to no group (a GROUP BY group_id must not add them up)
    assert sorted((r["run_id"], r["rank"], r["world_size"], r["group_id"]) for r in rows) == [
        ((runs / "a").as_posix(), 0, 1, None),
        ((runs / "b").as_posix(), 0, 1, None),
    ]
