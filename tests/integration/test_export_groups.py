"""`kvtrace export` of run groups and distributed traces: one `group_id` per job, the KV heads a
tensor-parallel rank holds, and the files a folder holds but the export does not read.

The groups are recorded here: a Hugging Face Llama 3 (tiny, random weights) on 2 gloo ranks, once sharded by
its tensor-parallel plan, once data parallel, each under the same relative name `runs/tp` in two working
directories (as two jobs' folders are named alike on two machines).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import ranks_worker as worker

from kvtrace.cli import main

pytest.importorskip("transformers.distributed")

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
REAL_CHROME = ROOT.parent / "shared" / "real_traces" / "chrome"
WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
TOKENS = worker.PROMPT_LEN + worker.DECODE_STEPS
LOCAL_KV_HEADS = worker.N_KV_HEADS // WORLD
# a dynamic cache holds the tokens seen: layers x K,V x the KV heads held x head_dim x tokens x rows x fp32
TP_RANK_KV_BYTES = worker.N_LAYERS * 2 * LOCAL_KV_HEADS * HEAD_DIM * TOKENS * worker.MAX_BATCH * 4
DP_TOKEN_BYTES = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4  # every rank all KV heads


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two working directories, each with a 2-rank group `runs/tp`: a's tensor parallel, b's data parallel."""
    base = tmp_path_factory.mktemp("jobs")
    for cwd, mode in (("a", "hf-tp"), ("b", "hf-dp")):
        facts = worker.launch_facts(mode, base / cwd / "runs" / "tp", base / f"facts-{cwd}", WORLD)
        (base / f"facts-{cwd}.json").write_text(json.dumps(facts))
    return base / "a", base / "b"


@pytest.mark.slow
def test_two_groups_of_one_name_keep_their_own_group_id(
    two_jobs: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN two jobs' run groups, both named runs/tp where they were exported from, into one folder
    tp_job, dp_job = two_jobs
    out = tmp_path / "tables"
    summaries = []
    for cwd in (tp_job, dp_job):
        monkeypatch.chdir(cwd)
        summaries.append(_cli_json(capsys, "export", "runs/tp", "-o", str(out), "--json", "-q"))
    assert [s["exported"] for s in summaries] == [WORLD, WORLD]
    # WHEN the ranks are grouped by group_id
    sql = (
        "SELECT group_id, list(run_id ORDER BY run_id) AS runs, list(DISTINCT path) AS paths"
        " FROM runs GROUP BY group_id ORDER BY group_id"
    )
    groups = _cli_json(capsys, "query", str(out), "--json", sql)
    # THEN each job is a group of its own ranks, the second named as its ranks' run_ids are
    assert [(g["group_id"], g["runs"]) for g in groups] == [
        ("runs/tp", ["runs/tp/rank-0", "runs/tp/rank-1"]),
        ("runs/tp#2", ["runs/tp/rank-0#2", "runs/tp/rank-1#2"]),
    ]
    assert {str(Path(p).parent) for p in groups[0]["paths"]} == {str((tp_job / "runs" / "tp").resolve())}
    # AND a group's KV sum (the README's arithmetic per rank, summed) is that job's, as its report says
    kv = _readme_kv(capsys, out)
    per_group = {}
    for row in _cli_json(capsys, "query", str(out), "--json", "SELECT run_id, group_id FROM runs"):
        per_group[row["group_id"]] = per_group.get(row["group_id"], 0) + kv[row["run_id"]]
    tp_facts = json.loads((tp_job.parent / "facts-a.json").read_text())
    dp_facts = json.loads((dp_job.parent / "facts-b.json").read_text())
    assert per_group == {
        "runs/tp": WORLD * TP_RANK_KV_BYTES,
        "runs/tp#2": sum(DP_TOKEN_BYTES * TOKENS * (rank + 1) for rank in range(WORLD)),
    }
    assert per_group["runs/tp"] == sum(f["kv_bytes"] for f in tp_facts)
    for cwd, group_id in ((tp_job, "runs/tp"), (dp_job, "runs/tp#2")):
        report = _cli_json(capsys, "report", str(cwd / "runs" / "tp"), "--json", "--no-export", "-q")
        assert report["kv"]["final_bytes"] == per_group[group_id]
    assert per_group["runs/tp#2"] == sum(f["kv_bytes"] for f in dp_facts)

    assert [s["left_out"] for s in summaries] == [[], []]  # group.json is the group's own, no input
    # WHEN a rank of each changes and is exported again, incrementally, from its own directory
    for cwd in (tp_job, dp_job):
        log = cwd / "runs" / "tp" / "rank-1" / "kv_events.jsonl"
        later = log.stat().st_mtime_ns + 10**9
        os.utime(log, ns=(later, later))
        monkeypatch.chdir(cwd)
        summary = _cli_json(capsys, "export", "runs/tp", "-o", str(out), "--json", "-q")
        assert (summary["exported"], summary["already_exported"]) == (1, 1)
    # THEN each keeps its group_id
    rows = _cli_json(capsys, "query", str(out), "--json", "SELECT run_id, group_id FROM runs ORDER BY run_id")
    assert [(r["run_id"], r["group_id"]) for r in rows] == [
        ("runs/tp/rank-0", "runs/tp"),
        ("runs/tp/rank-0#2", "runs/tp#2"),
        ("runs/tp/rank-1", "runs/tp"),
        ("runs/tp/rank-1#2", "runs/tp#2"),
    ]


@pytest.mark.slow
def test_a_rank_folder_the_report_leaves_out_is_in_no_group(
    two_jobs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the tensor-parallel group with a second folder for rank 1 (`rank-01/`, a copy of `rank-1/`),
    # which its report leaves out of the group's figures
    group = tmp_path / "tp"
    shutil.copytree(two_jobs[0] / "runs" / "tp", group)
    shutil.copytree(group / "rank-1", group / "rank-01")
    report = _cli_json(capsys, "report", str(group), "--json", "--no-export", "-q")
    assert report["kv"]["final_bytes"] == WORLD * TP_RANK_KV_BYTES
    # WHEN the group is exported
    out = tmp_path / "tables"
    capsys.readouterr()
    assert main(["export", str(group), "-o", str(out), "-q"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "group_id" in line]
    # THEN the copy is exported in no group, and a note says why
    name = group.as_posix()
    sql = "SELECT run_id, group_id, rank FROM runs ORDER BY run_id"
    rows = _cli_json(capsys, "query", str(out), "--json", sql)
    assert [(r["run_id"], r["group_id"], r["rank"]) for r in rows] == [
        (f"{name}/rank-0", name, 0),
        (f"{name}/rank-01", None, 1),
        (f"{name}/rank-1", name, 1),
    ]
    assert notes == [
        f"kvtrace export: note: {name}/rank-01: exported with no group_id: `kvtrace report` leaves it out"
        " of its run group's figures, as rank-1/ holds rank 1 already"
    ]
    # AND the README's KV arithmetic summed over the group_id is the group's report, not a rank more
    kv = _readme_kv(capsys, out)
    assert sum(kv[r["run_id"]] for r in rows if r["group_id"] == name) == report["kv"]["final_bytes"]


def _readme_kv(capsys: pytest.CaptureFixture[str], tables: Path) -> dict[str, int]:
    """run_id -> kv_bytes of the README's KV arithmetic query, as a user copies it."""
    query = re.search(r'kvtrace query tables/ "(SELECT r\.run_id.*?)"\n', README.read_text(), re.S)
    assert query is not None
    return {
        r["run_id"]: r["kv_bytes"] for r in _cli_json(capsys, "query", str(tables), "--json", query.group(1))
    }


@pytest.mark.slow
def test_a_tensor_parallel_rank_counts_the_kv_heads_it_holds(
    two_jobs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN both groups exported: a tensor-parallel rank holds half the model's 2 KV heads, a data-parallel
    # rank all of them
    tp_group, dp_group = (job / "runs" / "tp" for job in two_jobs)
    out = tmp_path / "tables"
    assert main(["export", str(tp_group), str(dp_group), "-o", str(out), "-q"]) == 0
    heads = _cli_json(
        capsys, "query", str(out), "--json", "SELECT path, num_kv_heads, kv_heads_held FROM runs"
    )
    held = {Path(r["path"]).parent: (r["num_kv_heads"], r["kv_heads_held"]) for r in heads}
    assert held == {
        tp_group.resolve(): (worker.N_KV_HEADS, LOCAL_KV_HEADS),
        dp_group.resolve(): (worker.N_KV_HEADS, worker.N_KV_HEADS),
    }
    # WHEN the README's KV arithmetic runs THEN each rank's figure is its report's, and the arithmetic's
    kv = _readme_kv(capsys, out)
    for rank in range(WORLD):
        for group, expected in (
            (tp_group, TP_RANK_KV_BYTES),
            (dp_group, DP_TOKEN_BYTES * TOKENS * (rank + 1)),
        ):
            report = _cli_json(capsys, "report", str(group / f"rank-{rank}"), "--json", "--no-export", "-q")
            assert kv[f"{group.as_posix()}/rank-{rank}"] == report["kv"]["final_bytes"] == expected


def _trace_of_rank(source: Path, target: Path, rank: int) -> None:
    """A copy of a real Kineto trace, its distributedInfo naming another rank of the same job."""
    raw = json.loads(gzip.decompress(source.read_bytes()))
    raw["distributedInfo"]["rank"] = rank
    target.write_bytes(gzip.compress(json.dumps(raw).encode()))


def test_traces_of_two_jobs_in_one_folder_are_two_groups(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN in one folder rank 34 of a 300-process gloo job (and rank 35 of it, made from that trace), and
    # rank 0 of a 16-process nccl job: two jobs
    folder = tmp_path / "chrome"
    folder.mkdir()
    gloo = REAL_CHROME / "rank-34.Jul_15_10_52_41.1074.pt.trace.json.gz"
    shutil.copy(gloo, folder / gloo.name)
    _trace_of_rank(gloo, folder / "rank-35.pt.trace.json.gz", 35)
    shutil.copy(REAL_CHROME / "rank0.json.gz", folder / "rank0.json.gz")
    infos = {p.name: json.loads(gzip.decompress(p.read_bytes()))["distributedInfo"] for p in folder.iterdir()}
    assert {(i["backend"], i["world_size"]) for i in infos.values()} == {("gloo", 300), ("nccl", 16)}
    # WHEN the folder is exported (rank0.json.gz named: a folder's search takes *.pt.trace.json[.gz] only)
    out = tmp_path / "tables"
    assert main(["export", str(folder), str(folder / "rank0.json.gz"), "-o", str(out), "-q"]) == 0
    sql = "SELECT run_id, group_id, rank, world_size, backend FROM runs ORDER BY rank"
    rows = _cli_json(capsys, "query", str(out), "--json", sql)
    # THEN the gloo job's ranks share a group, the nccl job has its own
    name = folder.as_posix()
    assert [(r["rank"], r["world_size"], r["backend"], r["group_id"]) for r in rows] == [
        (0, 16, "nccl", f"{name}#2"),
        (34, 300, "gloo", name),
        (35, 300, "gloo", name),
    ]
    # AND a later rank of the gloo job, exported into the same folder, joins its group
    _trace_of_rank(gloo, folder / "rank-36.pt.trace.json.gz", 36)
    assert main(["export", str(folder / "rank-36.pt.trace.json.gz"), "-o", str(out), "-q"]) == 0
    rows = _cli_json(capsys, "query", str(out), "--json", "SELECT group_id FROM runs WHERE rank = 36")
    assert rows == [{"group_id": name}]


def test_files_a_folder_search_leaves_out_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the real traces folder: two Chrome traces and a memory timeline not named *.pt.trace.json[.gz]
    unread = ["memory_timeline.raw.gz", "mi250_minitoy_train_ROCm6_2_kineto.json.gz", "rank0.json.gz"]
    # WHEN it is exported
    capsys.readouterr()
    assert main(["export", str(REAL_CHROME), "-o", str(tmp_path / "tables"), "--json", "-q"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    # THEN the traces named so are exported, and each other file is named, once, with why
    taken = sorted(p.name for p in REAL_CHROME.iterdir() if p.name.endswith(".pt.trace.json.gz"))
    assert summary["exported"] == summary["inputs"] == len(taken) == 2
    assert [Path(e["path"]).name for e in summary["left_out"]] == unread
    notes = [line for line in captured.err.splitlines() if "left out" in line]
    assert [line.split(": ")[2] for line in notes] == [str(REAL_CHROME / name) for name in unread]
    assert all("name the file to export it" in line for line in notes)
    # AND each is readable when named, as the note says
    for i, name in enumerate(unread):
        assert main(["export", str(REAL_CHROME / name), "-o", str(tmp_path / f"named{i}"), "-q"]) == 0
