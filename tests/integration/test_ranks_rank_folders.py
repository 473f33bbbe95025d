"""One tensor-parallel rank planned on its own, and a group's rank folders that are not the runs their names
say: a Hugging Face Llama sharded by its own `tp_plan="auto"` on 2 gloo ranks on CPU, recorded once with the
profiler (its allocator events give the plan the run's activations), then copied and edited per test: a rank
folder that holds another rank's run, a rank whose profiler trace is gone."""

from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import ranks_worker as worker

from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.format import MANIFEST
from kvtrace.geometry import transformers_version

pytest.importorskip("transformers.distributed")

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
TOKENS = worker.PROMPT_LEN + worker.DECODE_STEPS
LOCAL_KV_HEADS = worker.N_KV_HEADS // WORLD
# A rank's cache: layers x K,V x its KV heads (half the model's) x head_dim x fp32, per token of a row.
RANK_PER_TOKEN = worker.N_LAYERS * 2 * LOCAL_KV_HEADS * HEAD_DIM * 4
RANK_KV_BYTES = RANK_PER_TOKEN * TOKENS * worker.MAX_BATCH
# A rank's fp32 parameters: its shard of the attention and MLP, and of the embeddings (vocab-sharded under
# transformers 5.25: 128 x 64; 5.17 keeps the whole 256 x 64 table on every rank, 32,768 B more)
EMBED_BYTES = worker.VOCAB * worker.DIM * 4
RANK_PARAMETERS = 214_272 + (0 if (transformers_version() or (5, 25)) >= (5, 25) else EMBED_BYTES // WORLD)


@pytest.fixture(scope="module")
def tp_group(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """The recorded group and each rank's facts (measured on its own cache tensors)."""
    root = tmp_path_factory.mktemp("tp")
    facts = worker.launch_facts("hf-tp-profiled", root / "group", root / "facts", WORLD)
    for rank_facts in facts:
        assert rank_facts["weight_type"] == "DTensor"  # really sharded
        assert rank_facts["kv_bytes"] == RANK_KV_BYTES == 4608
    return root / "group", facts


def _json(capsys: pytest.CaptureFixture[str], argv: list[str], status: int = 0) -> dict[str, Any]:
    assert main(argv) == status
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def _copy(tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path) -> Path:
    return Path(shutil.copytree(tp_group[0], tmp_path / "group"))


def test_plan_from_one_tensor_parallel_rank_plans_that_rank(
    tp_group: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN rank 0 of the group, whose cache holds 1 of the model's 2 KV heads
    rank = tp_group[0] / "rank-0"
    report = _json(capsys, ["report", str(rank), "--no-export", "--json"])
    assert report["kv"]["final_bytes"] == RANK_KV_BYTES
    # WHEN it is planned with no other flag (the run itself, on one GPU)
    planned = _json(capsys, ["plan", "--from-run", str(rank), "--json"])
    # THEN its KV is the rank's, as recorded: the rank's KV heads, not the whole model's
    assert planned["kv_bytes_per_token"] == RANK_PER_TOKEN == 256
    assert planned["kv_tokens"] == TOKENS
    assert planned["kv_bytes"] == RANK_KV_BYTES
    assert planned["kv_peak_bytes"] == report["kv"]["peak_bytes"]
    # AND its peak is the run's, activations the rest of it beside the weights and the KV its peak's moment
    # held (not shrunk to make room for KV the rank never held; before, beside the KV peak, a growth copy
    # the moment did not hold: 2,560 B less than the run's)
    assert planned["peak_bytes"] == report["peak_allocated_bytes"]
    weights = report["categories_at_peak"]["weights"]
    assert planned["weights_bytes"] == weights
    assert planned["kv_at_peak_bytes"] == report["categories_at_peak"]["kv"]
    rest = report["peak_allocated_bytes"] - weights - report["categories_at_peak"]["kv"]
    assert planned["activations_bytes"] == rest == report["categories_at_peak"]["other"]
    said = "rank-0 is rank 0 of 2 (tensor parallel): its cache holds 1 of the model's 2 KV heads"
    assert any(note.startswith(said) for note in planned["notes"])
    assert main(["plan", "--from-run", str(rank)]) == 0
    text = capsys.readouterr().out
    assert "KV per token           256 B\n" in text
    assert "KV cache               4.50 KiB (2 x 9 tokens)" in text


def test_rank_folders_whose_manifest_says_another_rank_are_left_out(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group with three folders that are not runs of their own rank: a copy of rank 1 as rank-3,
    # a second name for rank 1 (rank-01), and a rank-2 whose manifest says rank 2 of a world of 2
    group = _copy(tp_group, tmp_path)
    shutil.copytree(group / "rank-1", group / "rank-3")
    shutil.copytree(group / "rank-1", group / "rank-01")
    shutil.copytree(group / "rank-1", group / "rank-2")
    manifest = json.loads((group / "rank-2" / MANIFEST).read_text())
    manifest["rank"] = 2
    (group / "rank-2" / MANIFEST).write_text(json.dumps(manifest))
    # WHEN the group is reported
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    # THEN only the two ranks' own folders are summed, and each other folder is named with why
    assert data["world_size"] == WORLD
    assert [entry["rank"] for entry in data["ranks"]] == [0, 1]
    assert data["kv"]["final_bytes"] == sum(f["kv_bytes"] for f in tp_group[1]) == 2 * RANK_KV_BYTES
    notes = data["notes"]
    assert any(n.startswith("rank-3/ left out: its manifest says rank 1 of 2") for n in notes), notes
    assert any(n.startswith("rank-01/ left out: rank-1/ holds rank 1 already") for n in notes), notes
    no_rank_2 = "rank-2/ left out: its manifest's world size is 2, which has no rank 2"
    assert any(n.startswith(no_rank_2) for n in notes), notes
    assert not any("no run from rank" in n for n in notes)


def test_rank_folder_without_its_manifest_is_called_what_it_is(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group whose rank 1 lost its manifest (a partial copy): its logs and profiler trace remain
    group = _copy(tp_group, tmp_path)
    (group / "rank-1" / MANIFEST).unlink()
    assert (group / "rank-1" / "profiler").is_dir()
    assert main(["report", str(group), "--no-export", "--json"]) == 2
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    # THEN rank 0 alone is reported, and the note says rank 1's folder holds files but no manifest, which
    # record() writes first: not a rank that never started recording
    assert [entry["rank"] for entry in data["ranks"]] == [0]
    held = "holds kv_events.jsonl, memory_samples.jsonl, model_config.json and 2 more"
    said = (
        f"rank 1 left out: rank-1/ {held} but no manifest.json, which record() writes before any other file"
    )
    assert any(note.startswith(said) for note in data["notes"]), data["notes"]
    assert not any("stopped before record() started" in note for note in data["notes"])
    # AND, as `kvtrace export` skips that folder as an unreadable input, the report exits 2 with one line
    # naming it on stderr
    (line,) = captured.err.splitlines()
    assert line.startswith(f"kvtrace report: error: rank 1 left out: {group / 'rank-1'}/ {held} but no "), (
        line
    )
    # AND a rank folder left empty is one that never recorded, as before
    shutil.rmtree(group / "rank-1")
    (group / "rank-1").mkdir()
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    assert "no run from rank 1: it stopped before record() started, or wrote elsewhere" in data["notes"]


def test_rank_folder_holding_another_ranks_run_gets_one_note(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group whose rank-1/ holds a copy of rank 0's run (its manifest says rank 0 of 2)
    group = _copy(tp_group, tmp_path)
    shutil.rmtree(group / "rank-1")
    shutil.copytree(group / "rank-0", group / "rank-1")
    # WHEN the group is reported
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    # THEN rank 0 alone is summed, and rank-1/ has the one note that says what it holds: not also one that
    # calls it a folder without a manifest, nor a rank that never recorded
    assert [entry["rank"] for entry in data["ranks"]] == [0]
    assert data["kv"]["final_bytes"] == RANK_KV_BYTES
    about_rank_1 = [n for n in data["notes"] if "rank 1" in n or "rank-1" in n]
    assert len(about_rank_1) == 1, data["notes"]
    said = "rank-1/ left out: its manifest says rank 0 of 2 (a copy of that rank's run?)"
    assert about_rank_1[0].startswith(said), about_rank_1


def test_swapped_rank_folders_are_read_as_their_manifests_say(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group with its two rank folders swapped (rank-0/ holds rank 1's run), group.json kept
    group = _copy(tp_group, tmp_path)
    (group / "rank-0").rename(group / "swap")
    (group / "rank-1").rename(group / "rank-0")
    (group / "swap").rename(group / "rank-1")
    assert json.loads((group / "rank-0" / MANIFEST).read_text())["rank"] == 1
    # WHEN the group is reported and diagnosed
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    # THEN each run is read as the rank its manifest says, whole, and a note names each renamed folder
    assert data["world_size"] == WORLD
    folders = [(entry["rank"], Path(entry["path"]).name) for entry in data["ranks"]]
    assert folders == [(0, "rank-1"), (1, "rank-0")]
    assert data["kv"]["final_bytes"] == sum(f["kv_bytes"] for f in tp_group[1]) == 2 * RANK_KV_BYTES
    for folder, rank in (("rank-0", 1), ("rank-1", 0)):
        said = f"{folder}/ read as rank {rank}: its manifest says rank {rank} of 2, and no other folder holds"
        assert any(n.startswith(said) for n in data["notes"]), data["notes"]
    assert not any("left out" in n or "no run from rank" in n for n in data["notes"]), data["notes"]
    assert main(["diagnose", str(group)]) == 0
    assert "no rank of this run group could be read" not in capsys.readouterr().err


def test_plan_of_a_tensor_parallel_rank_at_another_dtype_weighs_its_shard(
    tp_group: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN rank 0's weights as its weights.jsonl lists them: fp32 parameters (its shard) and the rotary
    # inv_freq buffers, which transformers keeps at fp32 whatever the weights' dtype
    rank = tp_group[0] / "rank-0"
    lines = [json.loads(line) for line in (rank / "weights.jsonl").read_text().splitlines()]
    assert {line["dtype"] for line in lines} == {"float32"}
    buffers = sum(line["storage_bytes"] for line in lines if line["name"].endswith("inv_freq"))
    parameters = sum(line["storage_bytes"] for line in lines) - buffers
    assert (parameters, buffers) == (RANK_PARAMETERS, 64)
    report = _json(capsys, ["report", str(rank), "--no-export", "--json"])
    assert report["categories_at_peak"]["weights"] == parameters + buffers
    # WHEN it is planned at bf16
    planned = _json(capsys, ["plan", "--from-run", str(rank), "--dtype", "bf16", "--json"])
    # THEN the weights are its shard's parameters at 2 B an element beside the same buffers, not the whole
    # model's MLP, embeddings and lm_head beside its attention heads
    bf16 = parameters // 2 + buffers  # 107,200 B (5.17: 123,584)
    assert planned["weights_bytes"] == bf16
    measured = f"{parameters + buffers:,}"  # 214,336 (5.17: 247,104)
    said = f"--dtype bf16 is not the run's (fp32): the weights are the rank's measured {measured} B re-stored"
    assert any(note.startswith(said) for note in planned["notes"]), planned["notes"]
    assert main(["plan", "--from-run", str(rank), "--dtype", "bf16"]) == 0
    assert f"weights                {bf16 / 1024:.2f} KiB (the run's, at bf16)" in capsys.readouterr().out


def test_plan_of_a_rank_cast_to_bf16_at_fp32_restores_its_cast_buffers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tensor-parallel group whose model was cast whole by `.to(torch.bfloat16)`: its rotary buffers
    # (inv_freq, original_inv_freq) are bf16 as well, not the fp32 transformers keeps under torch_dtype=
    facts = worker.launch_facts("hf-tp-bf16", tmp_path / "group", tmp_path / "facts", WORLD)
    rank = tmp_path / "group" / "rank-0"
    buffers = facts[0]["buffers"]
    assert {dtype for _, dtype in buffers.values()} == {"torch.bfloat16"}
    elements = facts[0]["parameters"] + sum(count for count, _ in buffers.values())  # 5.25: 53,568 + 16
    lines = [json.loads(line) for line in (rank / "weights.jsonl").read_text().splitlines()]
    assert {line["dtype"] for line in lines} == {"bfloat16"}
    assert sum(line["storage_bytes"] for line in lines) == 2 * elements  # 107,168 B measured
    # WHEN it is planned at fp32
    planned = _json(capsys, ["plan", "--from-run", str(rank), "--dtype", "fp32", "--json"])
    # THEN every parameter and buffer is 4 B an element: 214,336 B under transformers 5.25, 247,104 under
    # 5.17, which shards the embeddings otherwise (the buffers taken as kept at fp32 and subtracted at 4 B
    # from the bf16 measure said 64 B less)
    assert planned["weights_bytes"] == 4 * elements


def test_group_missing_a_rank_says_its_kv_sums_the_ranks_present(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group without rank 1's folder (its process never started record())
    group = _copy(tp_group, tmp_path)
    shutil.rmtree(group / "rank-1")
    # WHEN it is reported
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    # THEN its KV figures are rank 0's alone, a half of the model's KV heads, and say so
    assert data["missing_ranks"] == [1]
    assert data["kv"]["final_bytes"] == RANK_KV_BYTES
    assert data["kv"]["bytes_per_token_measured"] == RANK_PER_TOKEN == 256
    said = "measured and arithmetic summed over the 1 of 2 ranks present, not the model's: no run from rank 1"
    assert data["kv"]["bytes_per_token_note"] == said
    assert main(["report", str(group), "--no-export"]) == 0
    text = capsys.readouterr().out
    assert f"kvtrace report: {group} (KV summed over 1 of 2 ranks: no run from rank 1)\n" in text
    assert "all ranks, KV summed over ranks" not in text
    assert f"      ({said})\n" in text


def test_tensor_parallel_ranks_stopped_at_different_tokens_sum_their_own_bytes_per_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a tensor-parallel group whose rank 1 raised after its prefill and one decode step: it holds
    # PROMPT_LEN + 1 tokens, rank 0 all of them
    statuses = worker.launch("hf-tp-raise-early", tmp_path / "group", tmp_path / "facts", WORLD)
    assert statuses == [0, 0]
    facts = [json.loads((tmp_path / "facts" / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    assert [f["tokens"] for f in facts] == [TOKENS, worker.PROMPT_LEN + 1] == [9, 7]
    # WHEN the group is reported
    data = _json(capsys, ["report", str(tmp_path / "group"), "--no-export", "--json"])
    # THEN each rank measures its own 256 B a token, and the group the two summed: the model's 512 (the
    # summed bytes over the fullest rank's tokens x rows were 8,192 / 18 = 455.1)
    assert [r["kv"]["bytes_per_token_measured"] for r in data["ranks"]] == [RANK_PER_TOKEN] * WORLD
    kv = data["kv"]
    assert kv["final_bytes"] == RANK_PER_TOKEN * worker.MAX_BATCH * (9 + 7) == 8192
    model_per_token = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4
    assert kv["bytes_per_token_measured"] == WORLD * RANK_PER_TOKEN == model_per_token == 512
    assert kv["bytes_per_token_expected"] == 512
    assert kv["bytes_per_token_note"] == (
        "the ranks' own figures summed (rank 0 256.0 over 9 tokens; rank 1 256.0 over 7 tokens): "
        "tensor-parallel ranks hold their own KV heads of the same tokens, and these stopped at different "
        "tokens"
    )


def test_rank_folder_from_a_later_job_is_said_to_mix_jobs(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group whose rank-1/ is replaced by rank 1 of a second job, recorded after the first ended
    later = tmp_path / "later"
    worker.launch_facts("hf-tp", later / "group", later / "facts", WORLD)
    group = _copy(tp_group, tmp_path)
    shutil.rmtree(group / "rank-1")
    shutil.copytree(later / "group" / "rank-1", group / "rank-1")
    first = json.loads((group / "rank-0" / MANIFEST).read_text())
    second = json.loads((group / "rank-1" / MANIFEST).read_text())
    gap_s = (second["started_ns"] - first["ended"]["t_ns"]) / 1e9
    assert gap_s > 0
    # WHEN it is reported
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    # THEN a note says the runs are of different jobs: one job's ranks run together
    said = (
        f"rank 0's run ended {gap_s:,.1f} s before rank 1's started: several jobs' runs are mixed, and "
        "their KV summed is no one job's"
    )
    assert said in data["notes"], data["notes"]
    # AND the first job's own group says nothing of the kind
    whole = _json(capsys, ["report", str(tp_group[0]), "--no-export", "--json"])
    assert not any("several jobs" in note for note in whole["notes"])


def test_ranks_of_two_jobs_recorded_at_once_are_said_to_mix_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two 2-rank jobs recorded at the same time (every rank waits inside its recording for the other
    # job's): one tensor parallel (each rank 1 of the model's 2 KV heads), one data parallel (all 2 each)
    monkeypatch.setenv("KVTRACE_TEST_MEET", f"{tmp_path / 'meet'}:4")
    statuses: dict[str, list[int]] = {}

    def launch(mode: str) -> None:
        statuses[mode] = worker.launch(mode, tmp_path / mode / "group", tmp_path / mode / "facts", WORLD)

    jobs = [threading.Thread(target=launch, args=(mode,)) for mode in ("hf-tp", "hf-dp")]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert statuses == {"hf-tp": [0, 0], "hf-dp": [0, 0]}
    # AND a group of the tensor-parallel job's rank 0 and the data-parallel job's rank 1, with the
    # data-parallel job's rank 0 beside them as rank-2/
    group = tmp_path / "mixed"
    group.mkdir()
    shutil.copytree(tmp_path / "hf-tp" / "group" / "rank-0", group / "rank-0")
    shutil.copytree(tmp_path / "hf-dp" / "group" / "rank-1", group / "rank-1")
    shutil.copytree(tmp_path / "hf-dp" / "group" / "rank-0", group / "rank-2")
    manifests = [json.loads((group / f"rank-{r}" / MANIFEST).read_text()) for r in range(3)]
    spans = [(m["started_ns"], m["ended"]["t_ns"]) for m in manifests]
    assert all(start < end for start, _ in spans for _, end in spans)  # every run overlaps every other
    # WHEN it is reported
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    # THEN no note of runs apart in time, but one that says the ranks hold 1 and 2 KV heads, 3 of the
    # model's 2 together: no one job's ranks do
    assert [(r["rank"], r["kv"]["rank_heads"]["kv_heads_held"]) for r in data["ranks"]] == [(0, 1), (1, 2)]
    assert data["kv"]["final_bytes"] == RANK_KV_BYTES + 2 * RANK_KV_BYTES  # what no one job holds
    assert not any("before rank" in note for note in data["notes"]), data["notes"]
    said = (
        "the ranks' caches hold different numbers of the model's 2 KV heads (rank 0: 1, rank 1: 2; 3 "
        "together): one job's ranks hold as many each, so several jobs' runs are mixed, and their KV summed "
        "is no one job's"
    )
    assert said in data["notes"], data["notes"]
    # AND rank-2/, whose manifest says rank 0 as rank-0/'s does, is another job's run of that rank (started
    # at another time), not a copy of rank-0/'s
    gap_s = (manifests[2]["started_ns"] - manifests[0]["started_ns"]) / 1e9
    order = "after" if gap_s > 0 else "before"
    said = (
        f"rank-2/ left out: its manifest says rank 0 of 2, as rank-0/'s does, in a run started "
        f"{abs(gap_s):,.1f} s {order} it: several jobs' runs are mixed; its KV is not in the group's figures"
    )
    assert said in data["notes"], data["notes"]
    # AND each job's own group says nothing of the kind
    for mode in ("hf-tp", "hf-dp"):
        whole = _json(capsys, ["report", str(tmp_path / mode / "group"), "--no-export", "--json"])
        assert not any("several jobs" in note for note in whole["notes"]), whole["notes"]


def test_report_of_a_folder_of_the_ranks_traces_names_the_rank_it_read_and_those_it_did_not(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the two ranks' torch.profiler traces in one folder, as a distributed job's profiler writes them
    # (Kineto's distributedInfo in each: gloo, rank r of 2)
    folder = tmp_path / "traces"
    folder.mkdir()
    for rank in range(WORLD):
        (trace,) = (tp_group[0] / f"rank-{rank}" / "profiler").iterdir()
        shutil.copy(trace, folder / trace.name)
    traces = sorted(folder.iterdir())
    ranks = [json.loads(t.read_text())["distributedInfo"]["rank"] for t in traces]
    assert sorted(ranks) == [0, 1]
    # WHEN the folder is reported
    data = _json(capsys, ["report", str(folder), "--no-export", "--json"])
    # THEN it reads the last trace by name, as before, and says which rank's that is and which rank's trace
    # it did not read, and that export reads them all as one job
    assert data["devices"] == _json(capsys, ["report", str(traces[-1]), "--json"])["devices"]
    said = (
        f"{folder} holds the profiler traces of 2 ranks of one distributed job (gloo, world size 2): read "
        f"rank {ranks[1]}'s {traces[1].name} alone (the last by name); not read: rank {ranks[0]}'s "
        f"{traces[0].name}. A report reads one trace: name another to read it, or `kvtrace export {folder} "
        "-o DIR` to read every rank, each job's ranks one group (runs.group_id)"
    )
    assert said in data["notes"], data["notes"]
    # AND export reads both ranks, one group, as the note says
    assert main(["export", str(folder), "-o", str(tmp_path / "tables"), "-q"]) == 0
    capsys.readouterr()
    sql = "SELECT rank, world_size, backend, group_id FROM runs ORDER BY rank"
    rows = _json(capsys, ["query", str(tmp_path / "tables"), "--json", sql])
    assert rows == [
        {"rank": r, "world_size": 2, "backend": "gloo", "group_id": folder.as_posix()} for r in (0, 1)
    ]


# A rank whose profiler trace is gone counts the KV log's storages over its weights: its fp32 shard and the
# rotary inv_freq buffers (64 B), beside its cache's peak, the final KV and the transient copy of the last
# update's torch.cat (one layer's V of TOKENS - 1 tokens, MAX_BATCH rows, its KV head, still held as its
# grown copy is made).
RANK_WEIGHTS = RANK_PARAMETERS + 64
RANK_KV_PEAK = RANK_KV_BYTES + LOCAL_KV_HEADS * HEAD_DIM * 4 * worker.MAX_BATCH * (TOKENS - 1)
TRACE_SIZES = "sizes as the allocator reported them"
TENSOR_SIZES = "the KV log's and the weights' tensor sizes"


def _without_traces(tp_group: tuple[Path, list[dict[str, Any]]], folder: Path, ranks: list[int]) -> Path:
    """A copy of the group whose `ranks` lost their profiler/ folder (the manifest still lists the trace)."""
    group = Path(shutil.copytree(tp_group[0], folder))
    for rank in ranks:
        shutil.rmtree(group / f"rank-{rank}" / "profiler")
    return group


def _device_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " allocs / " in line]


def test_group_whose_rank_lost_its_trace_labels_each_rank_as_its_own_report(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group whose rank 1 lost its profiler trace: its figures are the KV log's over its weights,
    # 214,336 + 5,632 B (transformers 5.25), while rank 0 keeps its allocator events
    group = _without_traces(tp_group, tmp_path / "lost", [1])
    own = {r: _json(capsys, ["report", str(group / f"rank-{r}"), "--no-export", "--json"]) for r in (0, 1)}
    assert own[1]["kv"]["peak_bytes"] == RANK_KV_PEAK == 5632
    assert own[1]["peak_allocated_bytes"] == RANK_WEIGHTS + RANK_KV_PEAK
    # THEN each rank's own report names its unit: rank 1's no allocator's (it said "allocator")
    assert [(own[r]["size_basis"], own[r]["partial"]) for r in (0, 1)] == [
        ("allocator", False),
        ("tensors", True),
    ]
    assert [d["size_basis"] for d in own[1]["devices"]] == ["tensors"]
    assert own[0]["peak_allocated_bytes"] > own[1]["peak_allocated_bytes"]  # activations beside KV, weights
    # WHEN the group is reported
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    # THEN each rank's device keeps its own report's figures and unit, and the group's peak is rank 0's, as
    # measured by its allocator: not a peak of the weights and KV only because rank 1 lost its trace
    devices = [(d["device"], d["peak_allocated_bytes"], d["size_basis"]) for d in data["devices"]]
    assert devices == [
        ("rank0/cpu", own[0]["peak_allocated_bytes"], "allocator"),
        ("rank1/cpu", RANK_WEIGHTS + RANK_KV_PEAK, "tensors"),
    ]
    assert data["peak_rank"] == 0
    assert (data["peak_allocated_bytes"], data["size_basis"], data["partial"]) == (
        own[0]["peak_allocated_bytes"],
        "allocator",
        False,
    )
    # AND the text labels each rank's line as its own report does (both said the KV log's before)
    assert main(["report", str(group), "--no-export"]) == 0
    lines = _device_lines(capsys.readouterr().out)
    for rank, said in ((0, TRACE_SIZES), (1, TENSOR_SIZES)):
        assert main(["report", str(group / f"rank-{rank}"), "--no-export"]) == 0
        (line,) = _device_lines(capsys.readouterr().out)
        assert line.startswith("  cpu: peak ") and line.endswith(f" ({said})"), line
        assert f"  rank{rank}/{line.lstrip()}" in lines, lines


def test_compare_of_a_group_marks_its_peak_as_its_peak_rank_counts_it(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group whose rank 1 lost its trace, and the group whole
    lost, whole = _without_traces(tp_group, tmp_path / "lost", [1]), tp_group[0]
    own_peak = [
        _json(capsys, ["report", str(whole / f"rank-{r}"), "--no-export", "--json"])["peak_allocated_bytes"]
        for r in (0, 1)
    ]
    # (rank 0 measured above what rank 1's weights and KV alone make; either rank may peak in the whole group)
    assert own_peak[0] > RANK_WEIGHTS + RANK_KV_PEAK
    # WHEN they are compared
    rows = {row["label"]: row for row in _json(capsys, ["compare", str(lost), str(whole), "--json"])["runs"]}
    # THEN the lost trace's group's peak is rank 0's measured one, unmarked as the whole group's (it was
    # "weights + KV only" for an allocator figure), and only rank 1's own cell counts the weights and KV alone
    cells = {label: (row["peak_bytes"], row["partial"], row["peak_counts"]) for label, row in rows.items()}
    assert cells == {
        "lost": (own_peak[0], False, None),
        "group": (max(own_peak), False, None),
        "lost/rank-0": (own_peak[0], False, None),
        "group/rank-0": (own_peak[0], False, None),
        "lost/rank-1": (RANK_WEIGHTS + RANK_KV_PEAK, True, "weights + KV"),
        "group/rank-1": (own_peak[1], False, None),
    }
    assert any(
        "rank 1: " in note and "is listed in the manifest but missing" in note
        for note in rows["lost"]["notes"]
    )
    assert main(["compare", str(lost), str(whole)]) == 0
    peak_line = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("peak allocated")
    )
    partial = f"{human_bytes(RANK_WEIGHTS + RANK_KV_PEAK)} (weights + KV only)"
    whole_peak, rank_0, rank_1 = (human_bytes(b) for b in (max(own_peak), *own_peak))
    # a group's cell names its highest rank, whose device the row is (each rank's own row: its own)
    whole_rank = own_peak.index(max(own_peak))
    groups = [f"{rank_0} (rank 0: highest)", f"{whole_peak} (rank {whole_rank}: highest)"]
    cells_said = ["peak allocated (one rank)", *groups, rank_0, rank_0, partial, rank_1]
    assert re.split(r"\s{2,}", peak_line.strip()) == cells_said


def test_group_whose_ranks_all_lost_their_traces_counts_weights_and_kv_only(
    tp_group: tuple[Path, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group whose ranks both lost their traces: each counts its weights and KV, the same bytes
    group = _without_traces(tp_group, tmp_path / "bare", [0, 1])
    # WHEN it is reported and compared
    data = _json(capsys, ["report", str(group), "--no-export", "--json"])
    runs = _json(capsys, ["compare", str(group), str(tp_group[0]), "--json"])["runs"]
    row = next(run for run in runs if run["label"] == "bare")
    # THEN its peak (rank 0's, the first of two equal ones) is no allocator's, and says so
    assert [(d["peak_allocated_bytes"], d["size_basis"]) for d in data["devices"]] == [
        (RANK_WEIGHTS + RANK_KV_PEAK, "tensors")
    ] * WORLD
    assert (data["peak_rank"], data["size_basis"], data["partial"]) == (0, "tensors", True)
    assert (row["peak_bytes"], row["partial"], row["peak_counts"]) == (
        RANK_WEIGHTS + RANK_KV_PEAK,
        True,
        "weights + KV",
    )
