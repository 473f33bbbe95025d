"""`kvtrace export` + `kvtrace query` on real files: kvtrace's sample runs, a real Chrome trace and a real
CUDA snapshot. Row counts are counted from the raw files here; SQL sums are checked against
`kvtrace report --json` and against the same Parquet files read back with pyarrow."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from kvtrace.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_traces"
RUNS = ("dynamic_b2", "static_b2", "sliding_b2")
REAL = ROOT.parent / "shared" / "real_traces"
TRACE = REAL / "chrome" / "worker0.1623143089861.pt.trace.json.gz"
SNAPSHOT = REAL / "snapshots" / "memory_snapshot.pickle"
NEW_TOKENS, BATCH = 16, 2

pytestmark = pytest.mark.skipif(not TRACE.exists() or not SNAPSHOT.exists(), reason="../shared/real_traces")

# Live bytes after each memory event, per device: the device's baseline plus the running sum of deltas.
PEAK_SQL = """
WITH running AS (
  SELECT m.run_id, m.device,
         d.baseline_bytes + sum(m.delta_bytes) OVER (PARTITION BY m.run_id, m.device ORDER BY m.seq) AS live
  FROM memory_events m JOIN devices d USING (run_id, device))
SELECT run_id, device, max(live) AS peak, count(*) FILTER (WHERE live IS NOT NULL) AS events
FROM running GROUP BY run_id, device ORDER BY run_id, device
"""
# At each device's peak (its first moment at the maximum, as the report picks it): the KV bytes then live.
KV_AT_PEAK_SQL = """
WITH running AS (
  SELECT m.run_id, m.device, m.seq,
         d.baseline_bytes + sum(m.delta_bytes) OVER w AS live,
         sum(CASE WHEN m.category = 'kv' THEN m.delta_bytes ELSE 0 END) OVER w AS kv_live
  FROM memory_events m JOIN devices d USING (run_id, device)
  WINDOW w AS (PARTITION BY m.run_id, m.device ORDER BY m.seq))
SELECT run_id, device, kv_live FROM running
QUALIFY row_number() OVER (PARTITION BY run_id, device ORDER BY live DESC, seq) = 1
"""
# The KV log replayed in SQL: a storage counts from its first event (or its first after a `freed` of the
# same address: addresses are reused) until its `freed`; final = before the teardown (`end`) events.
KV_SQL = """
WITH ev AS (
  SELECT run_id, seq, phase, event, storage_bytes,
         lag(event) OVER (PARTITION BY run_id, addr ORDER BY seq) AS before
  FROM kv_events WHERE addr <> 0),
delta AS (
  SELECT run_id, seq, phase,
         CASE WHEN event = 'freed' THEN -storage_bytes
              WHEN event <> 'written' AND (before IS NULL OR before = 'freed') THEN storage_bytes
              ELSE 0 END AS kv_delta
  FROM ev),
live AS (SELECT run_id, phase, kv_delta, sum(kv_delta) OVER (PARTITION BY run_id ORDER BY seq) AS kv_live
         FROM delta)
SELECT run_id, max(kv_live) AS kv_peak, sum(kv_delta) FILTER (WHERE phase <> 'end') AS kv_final
FROM live GROUP BY run_id ORDER BY run_id
"""


class _BuiltinsOnly(pickle.Unpickler):
    """The test's own reader of the snapshot: builtin containers only, any global refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} refused")


def _memory_events_in_trace(path: Path) -> dict[str, int]:
    """`[memory]` events per device, counted from the raw Chrome trace JSON."""
    events = json.loads(gzip.decompress(path.read_bytes()))["traceEvents"]
    counts: dict[str, int] = {}
    for ev in events:
        if ev.get("name") == "[memory]":
            args = ev["args"]
            device = "cpu" if args["Device Type"] == 0 else f"cuda:{args['Device Id']}"
            counts[device] = counts.get(device, 0) + 1
    return counts


def _snapshot_alloc_free_entries(path: Path) -> int:
    snapshot = _BuiltinsOnly(io.BytesIO(path.read_bytes())).load()
    actions = ("alloc", "free_completed", "free")
    return sum(1 for trace in snapshot["device_traces"] for e in trace if e["action"] in actions)


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """The three sample runs, the trace and the snapshot exported once; run_id of each."""
    work = tmp_path_factory.mktemp("export")
    for name in RUNS:
        shutil.copytree(SAMPLES / name, work / "runs" / name)
    shutil.copy(TRACE, work / TRACE.name)
    shutil.copy(SNAPSHOT, work / SNAPSHOT.name)
    out = work / "tables"
    argv = ["export", str(work / "runs"), str(work / TRACE.name), str(work / SNAPSHOT.name), "-o", str(out)]
    assert main([*argv, "--json", "-q"]) == 0
    ids = {name: f"{(work / 'runs').as_posix()}/{name}" for name in RUNS}
    ids["trace"] = (work / TRACE.name).as_posix()
    ids["snapshot"] = (work / SNAPSHOT.name).as_posix()
    return out, ids


def test_row_counts_equal_the_sources_event_counts(
    exported: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, ids = exported
    rows = _cli_json(
        capsys, "query", str(out), "--json",
        "SELECT run_id, device, count(*) AS n FROM memory_events GROUP BY ALL ORDER BY ALL",
    )  # fmt: skip
    memory = {(r["run_id"], r["device"]): r["n"] for r in rows}
    kv_rows = _cli_json(
        capsys, "query", str(out), "--json", "SELECT run_id, count(*) AS n FROM kv_events GROUP BY 1"
    )
    kv = {r["run_id"]: r["n"] for r in kv_rows}
    sample_rows = _cli_json(
        capsys, "query", str(out), "--json", "SELECT run_id, count(*) AS n FROM samples GROUP BY 1"
    )
    samples = {r["run_id"]: r["n"] for r in sample_rows}
    for name in RUNS:
        run = SAMPLES / name
        assert kv[ids[name]] == len((run / "kv_events.jsonl").read_text().splitlines())
        assert samples[ids[name]] == len((run / "memory_samples.jsonl").read_text().splitlines())
        (trace,) = sorted((run / "profiler").glob("*.pt.trace.json.gz"))
        for device, n in _memory_events_in_trace(trace).items():
            assert memory[(ids[name], device)] == n
    for device, n in _memory_events_in_trace(TRACE).items():
        assert memory[(ids["trace"], device)] == n
    assert memory[(ids["snapshot"], "cuda:0")] == _snapshot_alloc_free_entries(SNAPSHOT) > 0
    runs = _cli_json(
        capsys, "query", str(out), "--json", "SELECT run_id, source_kind FROM runs ORDER BY run_id"
    )
    assert {r["run_id"]: r["source_kind"] for r in runs} == {
        **{ids[name]: "run" for name in RUNS},
        ids["trace"]: "chrome_trace",
        ids["snapshot"]: "snapshot",
    }


def test_query_sums_equal_the_report(
    exported: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, ids = exported
    peaks = {
        (r["run_id"], r["device"]): r["peak"]
        for r in _cli_json(capsys, "query", str(out), PEAK_SQL, "--json")
    }
    kv = {r["run_id"]: r for r in _cli_json(capsys, "query", str(out), KV_SQL, "--json")}
    kv_at_peak = {
        (r["run_id"], r["device"]): r["kv_live"]
        for r in _cli_json(capsys, "query", str(out), KV_AT_PEAK_SQL, "--json")
    }
    for key, path in [*((name, SAMPLES / name) for name in RUNS), ("trace", TRACE), ("snapshot", SNAPSHOT)]:
        report = _cli_json(capsys, "report", str(path), "--json", "--no-export", "-q")
        for device in report["devices"]:
            assert peaks[(ids[key], device["device"])] == device["peak_allocated_bytes"], (key, device)
            kv_then = kv_at_peak.get((ids[key], device["device"]), 0)
            assert kv_then == device["categories_at_peak"]["kv"], (key, device)
        if key in RUNS:
            assert kv[ids[key]]["kv_peak"] == report["kv"]["peak_bytes"]
            assert kv[ids[key]]["kv_final"] == report["kv"]["final_bytes"]
    # And the KV arithmetic, independent of any code: layers x 2 x kv_heads x head_dim x tokens x batch x 4.
    manifest = json.loads((SAMPLES / "dynamic_b2" / "manifest.json").read_text())["model"]
    first = json.loads((SAMPLES / "dynamic_b2" / "kv_events.jsonl").read_text().splitlines()[0])
    per_token = manifest["num_layers"] * 2 * manifest["num_kv_heads"] * manifest["head_dim"] * 4
    assert kv[ids["dynamic_b2"]]["kv_final"] == per_token * (first["shape"][2] + NEW_TOKENS - 1) * BATCH


def test_freed_rows_carry_their_storages_device(
    exported: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic sample run, whose KV log's `freed` lines name only the storage (no device)
    out, ids = exported
    lines = [json.loads(x) for x in (SAMPLES / "dynamic_b2" / "kv_events.jsonl").read_text().splitlines()]
    freed = [e for e in lines if e["event"] == "freed"]
    assert freed and all("device" not in e for e in freed)
    # WHEN its kv_events rows are joined to its devices on `device`
    sql = (
        "SELECT k.event, count(*) AS n FROM kv_events k JOIN devices d USING (run_id, device) "
        f"WHERE k.run_id = '{ids['dynamic_b2']}' GROUP BY k.event"
    )
    joined = {r["event"]: r["n"] for r in _cli_json(capsys, "query", str(out), sql, "--json")}
    # THEN every freed row is kept: it carries the device of the storage it frees
    assert joined["freed"] == len(freed)
    assert sum(joined.values()) == len(lines)


def test_pyarrow_reads_the_same_answers_as_duckdb(
    exported: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, _ = exported
    peaks = {(r["run_id"], r["device"]): r for r in _cli_json(capsys, "query", str(out), PEAK_SQL, "--json")}
    events = pq.read_table(out / "memory_events").to_pydict()
    devices = pq.read_table(out / "devices").to_pylist()
    assert pq.read_schema(next((out / "memory_events").glob("*.parquet"))).metadata[b"kvtrace.schema_version"]
    run_ids = np.array(events["run_id"])
    device_names = np.array(events["device"])
    deltas = np.array(events["delta_bytes"], dtype=np.int64)
    seq = np.array(events["seq"], dtype=np.int64)
    checked = 0
    for dev in devices:
        mask = (run_ids == dev["run_id"]) & (device_names == dev["device"])
        if not mask.any():
            continue
        order = np.argsort(seq[mask], kind="stable")
        live = dev["baseline_bytes"] + np.cumsum(deltas[mask][order])
        duck = peaks[(dev["run_id"], dev["device"])]
        assert int(live.max()) == duck["peak"]
        assert int(mask.sum()) == duck["events"]
        checked += 1
    assert checked == len(peaks) >= 6
    kv = pq.read_table(out / "kv_events").to_pydict()
    totals = _cli_json(
        capsys, "query", str(out), "--json", "SELECT sum(storage_bytes) AS s, count(*) AS n FROM kv_events"
    )
    assert totals == [{"s": sum(kv["storage_bytes"]), "n": len(kv["run_id"])}]


def test_csv_and_text_output(
    exported: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, ids = exported
    capsys.readouterr()
    sql = "SELECT run_id, count(*) AS n FROM kv_events GROUP BY 1 ORDER BY 1"
    assert main(["query", str(out), sql, "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "run_id,n"
    static_events = len((SAMPLES / "static_b2" / "kv_events.jsonl").read_text().splitlines())
    assert f"{ids['static_b2']},{static_events}" in lines and len(lines) == 4
    assert main(["query", str(out), sql]) == 0
    text = capsys.readouterr().out
    assert "(3 rows)" in text and str(static_events) in text


def test_columns_of_the_same_name_each_keep_their_value(
    exported: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    out, ids = exported
    capsys.readouterr()
    # GIVEN a query whose columns share a name (they used to overwrite each other: the table showed the
    # second value twice, the CSV row lost a field under a 3-name header, the JSON dropped a key)
    sql = "SELECT 1 AS a, 2 AS a, 3 AS a_1, 4 AS a, 5 AS b"
    names = ["a", "a_1", "a_1_1", "a_2", "b"]  # DuckDB's own: COPY (...) TO 'x.csv' writes this header
    # WHEN it is printed as JSON, CSV and a table THEN every column keeps its value, under a name of its own
    assert main(["query", str(out), sql, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [dict(zip(names, [1, 2, 3, 4, 5], strict=True))]
    assert main(["query", str(out), sql, "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == [",".join(names), "1,2,3,4,5"]
    assert main(["query", str(out), sql]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == names and table[2].split() == ["1", "2", "3", "4", "5"]
    # AND a join of two tables that share column names: the KV log's seq beside the allocator's, as the same
    # query with aliases gives them; the KV log's seqs are the file's own (1, 2, ...)
    join = (
        "SELECT k.seq, m.seq FROM kv_events k JOIN memory_events m "
        "ON k.run_id = m.run_id AND k.addr = m.addr AND m.delta_bytes > 0 "
        f"WHERE k.run_id = '{ids['static_b2']}' ORDER BY k.seq, m.seq LIMIT 3"
    )
    aliased = join.replace("k.seq, m.seq FROM", "k.seq AS kv_seq, m.seq AS mem_seq FROM")
    assert main(["query", str(out), aliased, "--json"]) == 0
    expected = [(row["kv_seq"], row["mem_seq"]) for row in json.loads(capsys.readouterr().out)]
    log = [json.loads(line) for line in (SAMPLES / "static_b2" / "kv_events.jsonl").read_text().splitlines()]
    assert [kv for kv, _ in expected] == sorted(e["seq"] for e in log if e.get("addr"))[:3]
    assert all(kv != mem for kv, mem in expected)  # the two columns differ: a lost one shows
    assert main(["query", str(out), join, "--json"]) == 0
    assert [(row["seq"], row["seq_1"]) for row in json.loads(capsys.readouterr().out)] == expected
    assert main(["query", str(out), join, "--csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["seq,seq_1"] + [f"{kv},{mem}" for kv, mem in expected]


@pytest.mark.slow
def test_export_of_a_thousand_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN 1,000 copies of one small run (its KV log and samples; no profiler trace, to stay quick)
    source = SAMPLES / "static_b2"
    kv_lines = len((source / "kv_events.jsonl").read_text().splitlines())
    for i in range(1000):
        run = tmp_path / "fleet" / f"night-{i // 100}" / f"run-{i:04d}"
        run.mkdir(parents=True)
        for name in ("manifest.json", "kv_events.jsonl", "memory_samples.jsonl", "weights.jsonl"):
            shutil.copy(source / name, run / name)
    # WHEN the folder is exported THEN every run is one row and every KV event is there, in one part
    summary = _cli_json(
        capsys, "export", str(tmp_path / "fleet"), "-o", str(tmp_path / "out"), "--json", "-q"
    )
    assert summary["exported"] == 1000 and summary["skipped"] == []
    assert summary["rows"]["runs"] == 1000
    assert summary["rows"]["kv_events"] == 1000 * kv_lines
    assert sorted(p.name for p in (tmp_path / "out" / "kv_events").iterdir()) == ["part-00000.parquet"]
    rows = _cli_json(
        capsys, "query", str(tmp_path / "out"), "--json",
        "SELECT count(DISTINCT run_id) AS runs, count(*) AS kv FROM kv_events",
    )  # fmt: skip
    assert rows == [{"runs": 1000, "kv": 1000 * kv_lines}]
    # Row groups were written as they filled, not one per run.
    assert pq.ParquetFile(tmp_path / "out" / "kv_events" / "part-00000.parquet").num_row_groups <= 2


VLLM_RUNS = sorted(p.parent for p in SAMPLES.glob("*/engine_steps.jsonl"))


def check_vllm_run(run: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A recorded vLLM run: engine rows counted from its files, engine figures equal to report --json."""
    assert main(["export", str(run), "-o", str(out), "-q"]) == 0
    steps = (run / "engine_steps.jsonl").read_text().splitlines()
    requests = [json.loads(line) for line in (run / "engine_requests.jsonl").read_text().splitlines()]
    sql = (
        "SELECT count(*) AS steps, max(blocks_used) AS peak_blocks, sum(len(preempted)) AS preemptions,"
        " sum(prefix_evicted_blocks) AS prefix_evicted,"
        " (SELECT count(*) FROM engine_requests) AS request_events,"
        " (SELECT sum(dropped_tokens) FROM engine_requests WHERE event = 'preempted') AS preempted_tokens,"
        " any_value(r.kv_cache_bytes) AS kv_cache_bytes FROM engine_steps JOIN runs r USING (run_id)"
    )
    (row,) = _cli_json(capsys, "query", str(out), "--json", sql)
    engine = _cli_json(capsys, "report", str(run), "--json", "--no-export", "-q")["engine"]
    assert row["steps"] == len(steps) and row["request_events"] == len(requests)
    assert (
        row["preemptions"] == sum(1 for r in requests if r["event"] == "preempted") == engine["preemptions"]
    )
    assert row["peak_blocks"] == engine["peak_blocks_used"]
    assert row["prefix_evicted"] == engine["prefix_cache_evicted_blocks"]
    assert (row["preempted_tokens"] or 0) == engine["preempted_tokens"]
    assert row["kv_cache_bytes"] == engine["kv_cache_bytes"]


@pytest.mark.skipif(not VLLM_RUNS, reason="no recorded vLLM sample run in sample_traces/ yet")
@pytest.mark.parametrize("run", VLLM_RUNS, ids=[p.name for p in VLLM_RUNS])
def test_vllm_sample_runs(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    check_vllm_run(run, tmp_path / "out", capsys)


# The README's peak query, as a user copies it
README_PEAK_SQL = """SELECT d.run_id, d.device,
         d.baseline_bytes + greatest(0, coalesce(max(m.running), 0)) AS peak
  FROM devices d LEFT JOIN (SELECT run_id, device, sum(delta_bytes) OVER (
         PARTITION BY run_id, device ORDER BY seq) AS running FROM memory_events) m USING (run_id, device)
  GROUP BY d.run_id, d.device, d.baseline_bytes ORDER BY d.run_id, d.device"""
REFUSED_RUNS = [
    p.parent
    for p in sorted(SAMPLES.glob("*/engine.json"))
    if json.loads(p.read_text()).get("status") == "refused_start"
]


@pytest.mark.skipif(not REFUSED_RUNS, reason="no refused vLLM start in sample_traces/")
@pytest.mark.parametrize("run", REFUSED_RUNS, ids=[p.name for p in REFUSED_RUNS])
def test_a_refused_start_exports_no_measured_peak(
    run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a vLLM start refused for lack of KV memory (no pool, no step), exported
    out = tmp_path / "out"
    assert main(["export", str(run), "-o", str(out), "-q"]) == 0
    # WHEN the README's peak query asks its devices' peaks
    peaks = {r["device"]: r["peak"] for r in _cli_json(capsys, "query", str(out), README_PEAK_SQL, "--json")}
    # THEN each is what the report says: unknown (null), not a measured 0
    report = _cli_json(capsys, "report", str(run), "--json", "--no-export", "-q")
    assert peaks == {d["device"]: d["peak_allocated_bytes"] for d in report["devices"]}
    assert set(peaks.values()) == {None}


def test_a_distributed_trace_names_its_rank(tmp_path: Path) -> None:
    trace = REAL / "chrome" / "rank0.json.gz"
    raw = json.loads(gzip.decompress(trace.read_bytes()))
    info, gpu = raw["distributedInfo"], raw["deviceProperties"][0]
    assert main(["export", str(trace), "-o", str(tmp_path / "out"), "-q"]) == 0
    (run,) = pq.read_table(tmp_path / "out" / "runs").to_pylist()
    assert (run["rank"], run["world_size"], run["backend"]) == (
        info["rank"],
        info["world_size"],
        info["backend"],
    )
    assert run["group_id"] == (REAL / "chrome").as_posix()
    assert (run["device_name"], run["total_memory_bytes"]) == (gpu["name"], gpu["totalGlobalMem"])


@pytest.mark.slow
def test_a_recorded_run_group_exports_rank_by_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN Meta's reference Llama 3 recorded on 2 gloo ranks (fairscale model parallel): a run group
    import ranks_worker as worker

    group, facts_dir = tmp_path / "group", tmp_path / "facts"
    assert worker.launch("reference", group, facts_dir, 2) == [0, 0]
    facts = {r: json.loads((facts_dir / f"rank-{r}.json").read_text()) for r in range(2)}
    # WHEN the group is exported THEN each rank is a row of one group, with its own KV
    out = tmp_path / "out"
    assert main(["export", str(group), "-o", str(out), "-q"]) == 0
    sql = (
        "SELECT r.rank, r.world_size, r.backend, r.group_id, k.kv_final FROM runs r"
        f" JOIN ({KV_SQL}) k USING (run_id) ORDER BY r.rank"
    )
    rows = _cli_json(capsys, "query", str(out), "--json", sql)
    assert [(r["rank"], r["world_size"], r["backend"], r["group_id"]) for r in rows] == [
        (rank, 2, "gloo", group.as_posix()) for rank in range(2)
    ]
    assert [r["kv_final"] for r in rows] == [facts[0]["kv_bytes"], facts[1]["kv_bytes"]]
    report = _cli_json(capsys, "report", str(group), "--json", "--no-export", "-q")
    assert sum(r["kv_final"] for r in rows) == report["kv"]["final_bytes"]
    for rank in range(2):
        lines = (group / f"rank-{rank}" / "kv_events.jsonl").read_text().splitlines()
        (count,) = _cli_json(
            capsys, "query", str(out), "--json",
            f"SELECT count(*) AS n FROM kv_events JOIN runs USING (run_id) WHERE rank = {rank}",
        )  # fmt: skip
        assert count["n"] == len(lines)


def test_a_trace_row_describes_its_gpu(tmp_path: Path) -> None:
    # GIVEN a trace with memory events on the CPU and on one GPU, and four GPUs in deviceProperties
    raw = json.loads(gzip.decompress(TRACE.read_bytes()))
    gpu_ids = {
        e["args"]["Device Id"]
        for e in raw["traceEvents"]
        if e.get("name") == "[memory]" and e["args"]["Device Type"] == 1
    }
    (gpu_id,) = gpu_ids
    (gpu,) = [entry for entry in raw["deviceProperties"] if entry["id"] == gpu_id]

    # WHEN exported
    assert main(["export", str(TRACE), "-o", str(tmp_path / "out"), "-q"]) == 0
    (run,) = pq.read_table(tmp_path / "out" / "runs").to_pylist()

    # THEN its row describes that GPU: type, index, name and memory all of one device
    described = (run["device_type"], run["device_index"], run["device_name"], run["total_memory_bytes"])
    assert described == ("cuda", gpu_id, gpu["name"], gpu["totalGlobalMem"])


def test_exports_into_one_folder_take_turns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A second export into a folder another export is writing waits for it, then adds the next part:
    both would otherwise number their part alike and remove each other's unfinished files."""
    import threading

    from kvtrace.run_lock import RunLock

    out = tmp_path / "tables"
    assert main(["export", str(SAMPLES / "dynamic_b2"), "-o", str(out), "-q"]) == 0
    held = RunLock(out)
    held.acquire()  # as an export in progress holds it
    codes: list[int] = []
    second = threading.Thread(
        target=lambda: codes.append(main(["export", str(SNAPSHOT), "-o", str(out), "-q"]))
    )
    second.start()
    second.join(timeout=1.0)
    try:
        assert second.is_alive() and not codes  # waiting for the holder, nothing written meanwhile
        assert sorted(p.name for p in (out / "runs").iterdir()) == ["part-00000.parquet"]
    finally:
        held.release()
    second.join(timeout=60)
    assert codes == [0]
    runs = _cli_json(capsys, "query", str(out), "SELECT run_id FROM runs ORDER BY run_id", "--json")
    assert [row["run_id"] for row in runs] == sorted(
        [f"{(SAMPLES / 'dynamic_b2').as_posix()}", SNAPSHOT.as_posix()]
    )
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]


def test_a_run_exported_while_recording_is_named_then_exported_again_once_it_ends(
    tiny_model: Any, tiny_size: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export of a run still being recorded warns, naming the run and the recording's pid; the next
    export, once the run has ended, takes it again and replaces its partial rows (a run beside it in the
    same part keeps its own), and one after that skips both."""
    import os

    import torch

    import kvtrace

    runs = tmp_path / "runs"
    shutil.copytree(SAMPLES / "static_b2", runs / "static_b2")
    run, out = runs / "live", tmp_path / "tables"
    live_id, other_id = f"{runs.as_posix()}/live", f"{runs.as_posix()}/static_b2"
    other_lines = len((runs / "static_b2" / "kv_events.jsonl").read_text().splitlines())
    prompt, new_tokens = 5, 4
    ids = torch.randint(3, 1000, (BATCH, prompt))
    # A dynamic cache of L layers holds 2L storages (K, V): created at prefill, then each of the
    # new_tokens - 1 decode forwards grows every storage into a new one and frees the old (2 lines each);
    # the block's end frees the 2L last.
    storages = 2 * tiny_size.num_layers
    while_recording = storages + (new_tokens - 1) * 2 * storages
    ended = while_recording + storages
    export = ["export", str(runs), "-o", str(out), "--json", "-q"]
    count_sql = "SELECT run_id, count(*) AS n FROM {} GROUP BY 1 ORDER BY 1"
    # GIVEN the run exported while its block is still open (its lock held by this process)
    with kvtrace.record(run, model=tiny_model, profiler=False) as recording:
        tiny_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        recording._flush()  # what the writer thread does every 0.1 s
        capsys.readouterr()
        assert main(export) == 0
        during = capsys.readouterr()
    first = json.loads(during.out)
    # THEN it is exported as it stood, with a warning naming it and the pid recording it
    assert (first["part"], first["exported"]) == (0, 2)
    assert first["rows"]["kv_events"] == while_recording + other_lines
    assert first["recording"] == [{"run_id": live_id, "pid": os.getpid()}]
    assert during.err.splitlines() == [
        f"kvtrace export: warning: {live_id} is still being recorded by pid {os.getpid()}: its tables hold "
        f"what it had written ({while_recording} KV events so far); export again once it ends to replace them"
    ]
    tables = ("devices", "kv_events", "memory_events", "samples")
    before = {t: _cli_json(capsys, "query", str(out), "--json", count_sql.format(t)) for t in tables}
    # WHEN the run has ended and the folder is exported again
    capsys.readouterr()
    assert main(export) == 0
    after = capsys.readouterr()
    second = json.loads(after.out)
    # THEN the run is exported again, saying why, and the part that held it is replaced whole
    assert (second["part"], second["exported"], second["already_exported"]) == (1, 1, 1)
    assert second["reexported"] == [{"run_id": live_id, "replaced_part": 0}] and second["recording"] == []
    assert second["rows"]["kv_events"] == ended
    assert after.err.splitlines() == [
        f"kvtrace export: note: {live_id}: it changed since part 0 took it while pid {os.getpid()} was "
        "recording it: exported again, its rows there replaced"
    ]
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["part-00001.parquet"]
    rows = _cli_json(
        capsys, "query", str(out), "--json",
        "SELECT r.run_id, r.ended_status, r.recording_pid, r.kv_events, count(k.seq) AS kv_rows FROM runs r "
        "LEFT JOIN kv_events k USING (run_id) GROUP BY ALL ORDER BY r.run_id",
    )  # fmt: skip
    assert [tuple(r.values()) for r in rows] == [
        (live_id, "ok", None, ended, ended),
        (other_id, "ok", None, other_lines, other_lines),
    ]
    # AND the run beside it kept every row it had in the part replaced
    for table, counted in before.items():
        now = _cli_json(capsys, "query", str(out), "--json", count_sql.format(table))
        kept = [r for r in counted if r["run_id"] == other_id]
        assert kept and [r for r in now if r["run_id"] == other_id] == kept, table
    # AND a third export finds both unchanged: nothing added
    third = _cli_json(capsys, *export)
    assert (third["part"], third["exported"], third["already_exported"]) == (None, 0, 2)
    assert third["reexported"] == third["recording"] == []


def test_samples_table_keeps_every_field_of_the_samples_log(
    tiny_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each sample's step start (`started_ns`), the prefill's prompt and length, and the host figures go
    into the `samples` table as memory_samples.jsonl holds them: a per-step duration in SQL needs
    `started_ns`, which the table used to drop."""
    from tests.tiny import record_generate

    prompt = 5
    run, out = tmp_path / "run", tmp_path / "out"
    record_generate(tiny_model, run, 1, prompt, 4, profiler=False)
    logged = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    assert main(["export", str(run), "-o", str(out)]) == 0
    rows = sorted(pq.read_table(out / "samples").to_pylist(), key=lambda r: (r["t_ns"], r["phase"]))
    logged.sort(key=lambda r: (r["t_ns"], r["phase"]))
    fields = ("started_ns", "prompt_end", "max_length", "max_new_tokens", "cpu_percent", "rss_bytes")
    fields += ("raised",)
    assert [{k: r[k] for k in fields} for r in rows] == [{k: s.get(k) for k in fields} for s in logged]
    steps = [r for r in rows if r["phase"] in ("prefill", "decode")]
    assert len(steps) == 4 and all(r["started_ns"] is not None for r in steps)
    assert [r["prompt_end"] for r in steps] == [prompt, None, None, None]
    assert any(r["cpu_percent"] is not None for r in rows)
    capsys.readouterr()
    sql = "SELECT count(*) AS n FROM samples WHERE t_ns >= started_ns"
    assert main(["query", str(out), "--json", sql]) == 0
    assert json.loads(capsys.readouterr().out) == [{"n": len(steps)}]
