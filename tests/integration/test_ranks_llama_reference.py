"""Meta's reference Llama 3 with fairscale model parallel 2 on gloo, in 2 processes: a run group.

Each rank holds half the KV heads in its preallocated `cache_k` / `cache_v`. Every figure checked here is
computed apart from kvtrace: from the arithmetic of the reference code's shapes, and from the rank's own
cache tensors (measured in the worker and written beside the run).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
import ranks_worker as worker

from analyzers.report import build_report, load_source
from kvtrace.cli import main
from kvtrace.format import GROUP_MARKER, is_run_dir, is_run_group

pytest.importorskip("fairscale.nn.model_parallel.initialize")
pytest.importorskip("llama_models.llama3.model")

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
# The reference code preallocates every layer's K and V for max_batch_size x max_seq_len, float32.
RANK_KV_BYTES = (
    worker.N_LAYERS * 2 * (worker.N_KV_HEADS // WORLD) * HEAD_DIM * worker.MAX_SEQ * worker.MAX_BATCH * 4
)


def _report(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:
    assert main(["report", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ranks")
    out, facts = root / "group", root / "facts"
    statuses = worker.launch("reference", out, facts, WORLD)
    logs = "".join((facts / f"rank-{r}.log").read_text()[-2000:] for r in range(WORLD))
    assert statuses == [0] * WORLD, logs
    return out, facts


def test_each_rank_records_its_own_run_with_its_rank_facts(group):
    out, _facts = group
    assert is_run_group(out) and not is_run_dir(out)
    assert sorted(p.name for p in out.iterdir()) == [GROUP_MARKER, "rank-0", "rank-1"]
    for rank in range(WORLD):
        manifest = json.loads((out / f"rank-{rank}" / "manifest.json").read_text())
        assert manifest["ended"]["status"] == "ok"
        assert (manifest["rank"], manifest["world_size"], manifest["local_rank"]) == (rank, WORLD, rank)
        assert manifest["backend"] == "gloo"
        assert manifest["hostname"] == socket.gethostname()


def test_rank_kv_bytes_equal_the_rank_cache_tensors_and_the_total_their_sum(group, capsys):
    out, facts_dir = group
    facts = {r: json.loads((facts_dir / f"rank-{r}.json").read_text()) for r in range(WORLD)}
    # The worker's own measurement of its tensors agrees with the arithmetic of half the KV heads.
    for rank_facts in facts.values():
        assert rank_facts["kv_bytes"] == RANK_KV_BYTES
        assert rank_facts["storages"] == 2 * worker.N_LAYERS
        local_shape = [worker.MAX_BATCH, worker.MAX_SEQ, worker.N_KV_HEADS // WORLD, HEAD_DIM]
        assert rank_facts["shapes"] == [local_shape] * 2 * worker.N_LAYERS

    # WHEN the group is reported
    data = _report(out, capsys)

    # THEN each rank's KV figures are that rank's own cache tensors ...
    assert data["source"]["kind"] == "run_group" and data["world_size"] == WORLD
    assert [r["rank"] for r in data["ranks"]] == list(range(WORLD))
    layer_bytes = RANK_KV_BYTES // worker.N_LAYERS // 2
    for entry in data["ranks"]:
        assert entry["world_size"] == WORLD and entry["device"] == "cpu" and entry["status"] == "ok"
        assert entry["kv"]["final_bytes"] == facts[entry["rank"]]["kv_bytes"]
        assert entry["kv"]["peak_bytes"] == facts[entry["rank"]]["kv_bytes"]  # preallocated: never more
        assert [(x["layer"], x["k_bytes"], x["v_bytes"]) for x in entry["kv"]["per_layer"]] == [
            (layer, layer_bytes, layer_bytes) for layer in range(worker.N_LAYERS)
        ]
        assert entry["peak_allocated_bytes"] >= entry["kv"]["final_bytes"]
        # its arithmetic counts the KV heads its buffers hold ([batch, seq, heads, head_dim]): half of them
        rank_per_token = worker.N_LAYERS * 2 * (worker.N_KV_HEADS // WORLD) * HEAD_DIM * 4
        assert entry["kv"]["bytes_per_token_expected"] == rank_per_token
        # measured: its buffers over their max_batch_size x max_seq_len slots, the same arithmetic
        assert entry["kv"]["bytes_per_token_measured"] == RANK_KV_BYTES / (worker.MAX_BATCH * worker.MAX_SEQ)
        assert entry["kv"]["bytes_per_token_measured"] == rank_per_token
    # ... and the group's figures are their sum.
    total = sum(f["kv_bytes"] for f in facts.values())
    assert data["kv"]["final_bytes"] == data["kv"]["peak_bytes"] == total == WORLD * RANK_KV_BYTES
    assert data["kv"]["bytes_per_token_expected"] == worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4
    # the ranks' buffers share their slots, each holding half the heads: a slot of the group holds them all
    slots = worker.MAX_BATCH * worker.MAX_SEQ
    assert (data["kv"]["capacity_rows"], data["kv"]["capacity_tokens"]) == (worker.MAX_BATCH, worker.MAX_SEQ)
    assert data["kv"]["bytes_per_token_measured"] == total / slots == data["kv"]["bytes_per_token_expected"]
    # a rank opened on its own gives the same arithmetic as inside the group
    alone = _report(out / "rank-1", capsys, "--no-export")
    assert alone["kv"]["bytes_per_token_expected"] == data["ranks"][1]["kv"]["bytes_per_token_expected"]
    assert [(x["k_bytes"], x["v_bytes"]) for x in data["kv"]["per_layer"]] == [
        (WORLD * layer_bytes, WORLD * layer_bytes)
    ] * worker.N_LAYERS
    assert data["peak_rank"] in range(WORLD)
    assert data["peak_allocated_bytes"] == data["ranks"][data["peak_rank"]]["peak_allocated_bytes"]
    assert data["oom_rank"] is None and data["failed_ranks"] == [] and data["missing_ranks"] == []
    assert [d["rank"] for d in data["devices"]] == list(range(WORLD))


def _whole_model_parameters() -> int:
    """The reference Llama's parameters in one process, from its code's shapes: the embedding and output
    (vocab x dim), per layer wq, wk, wv, wo, the SwiGLU's w1, w2, w3 (dim x hidden, hidden from 4 x dim:
    2/3 of it rounded up to multiple_of 256) and two RMSNorms, then the final norm."""
    hidden = 256 * ((int(2 * 4 * worker.DIM / 3) + 255) // 256)
    attention = 2 * worker.DIM * worker.N_HEADS * HEAD_DIM + 2 * worker.DIM * worker.N_KV_HEADS * HEAD_DIM
    layer = attention + 3 * worker.DIM * hidden + 2 * worker.DIM
    return 2 * worker.VOCAB * worker.DIM + worker.N_LAYERS * layer + worker.DIM


def test_geometry_counts_the_whole_models_parameters_beside_its_whole_heads(group, capsys):
    out, facts_dir = group
    facts = [json.loads((facts_dir / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    whole = _whole_model_parameters()
    assert whole == 155968
    # each rank holds half of every split layer and a copy of each norm (5 of dim): more than half the model
    assert [f["parameters"] for f in facts] == [(whole + (WORLD - 1) * 5 * worker.DIM) // WORLD] * WORLD
    # WHEN the group is reported, THEN its geometry is the whole model's, parameters as its heads ...
    data = _report(out, capsys, "--no-export")
    geometry = data["geometry"]
    assert (geometry["num_kv_heads"], geometry["parameters"]) == (worker.N_KV_HEADS, whole)
    # ... and each rank's manifest says what it holds itself
    for rank, rank_facts in enumerate(facts):
        model = json.loads((out / f"rank-{rank}" / "manifest.json").read_text())["model"]
        assert (model["parameters"], model["parameters_per_rank"]) == (whole, rank_facts["parameters"])


def test_group_html_diagnose_and_compare(group, capsys, tmp_path):
    out, _facts = group
    page = tmp_path / "group.html"
    assert main(["report", str(out), "-o", str(page)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"kvtrace report: {out} (run group, world size 2)"
    html = page.read_text()
    assert 'id="kvtrace-ranks"' in html
    assert all(f"rank {r} (cpu, ok)" in html for r in range(WORLD))  # one subplot per rank, shared x
    # sizes on the axes in the page's binary units, not plotly's decimal "20M"
    units = sum(html.count(f'"title":{{"text":"{unit}"}}') for unit in ("B", "KiB", "MiB", "GiB"))
    assert units == WORLD and '"title":{"text":"bytes"}' not in html
    # and each rank's KV log on an axis of its own, where it is not a flat line beside the weights
    assert sum(html.count(f'"title":{{"text":"KV ({unit})"}}') for unit in ("B", "KiB", "MiB")) == WORLD
    # as for a single run, each rank gets its KV counter trace and TensorBoard scalars
    assert all((out / f"rank-{r}" / "kv_counters.trace.json.gz").is_file() for r in range(WORLD))

    assert main(["diagnose", str(out), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    group_facts = diagnosis["run_group"]
    assert group_facts["reason"] == "peaked" and group_facts["rank"] == group_facts["peak_rank"]
    assert diagnosis["path"].endswith(f"rank-{group_facts['rank']}")

    # Two groups of the same world size compare by their totals, then rank by rank.
    twin = tmp_path / "twin"
    shutil.copytree(out, twin)
    assert main(["compare", str(out), str(twin), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    labels = ["group", "twin", "group/rank-0", "twin/rank-0", "group/rank-1", "twin/rank-1"]
    assert [r["label"] for r in runs] == labels
    assert [r["kv_final_bytes"] for r in runs] == [WORLD * RANK_KV_BYTES] * 2 + [RANK_KV_BYTES] * 4
    # step by step, the group's KV is the sum of its ranks'
    assert runs[0]["kv_by_step"] == {k: WORLD * v for k, v in runs[2]["kv_by_step"].items()}

    # A rank whose files are unreadable is named and left out; the others still report, and the exit is 2
    # with the rank's error on stderr, as export's for an unreadable input
    (twin / "rank-1" / "manifest.json").write_text('{"format": "kvtrace-run", "schema_')
    assert main(["report", str(twin), "--json"]) == 2
    said = capsys.readouterr()
    data = json.loads(said.out)
    assert [r["rank"] for r in data["ranks"]] == [0] and data["missing_ranks"] == [1]
    assert any(note.startswith("rank 1 left out:") and "corrupt manifest" in note for note in data["notes"])
    assert "rank 1 left out:" in said.err
    # ... and `diagnose` and `compare` say so too, in text (they used to show half a group silently)
    assert main(["diagnose", str(twin)]) == 2
    assert "note: rank 1 left out:" in capsys.readouterr().out
    assert main(["compare", str(out), str(twin)]) == 2
    assert "note: twin: rank 1 left out:" in capsys.readouterr().out


def test_a_rank_that_raises_leaves_the_group_readable(tmp_path, capsys):
    out, facts = tmp_path / "group", tmp_path / "facts"

    # GIVEN rank 1's allocation fails inside record() (after the last collective, so rank 0 finishes)
    statuses = worker.launch("reference-raise", out, facts, WORLD)
    assert statuses == [0, 3], (facts / "rank-1.log").read_text()[-2000:]
    error = (facts / "rank-1.error").read_text()

    # WHEN the group is reported, THEN it names the failed rank, and rank 0's run is whole
    data = _report(out, capsys)
    assert data["failed_ranks"] == [1]
    assert data["focus"] == {"rank": 1, "reason": "raised RuntimeError"}
    failed = data["ranks"][1]
    assert failed["status"] == "exception" and failed["ended"]["type"] == "RuntimeError"
    assert failed["ended"]["message"] == error[:2000]
    assert [r["kv"]["final_bytes"] for r in data["ranks"]] == [RANK_KV_BYTES, RANK_KV_BYTES]
    assert data["kv"]["final_bytes"] == WORLD * RANK_KV_BYTES

    assert main(["diagnose", str(out)]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "diagnosing rank 1, which raised RuntimeError" in first_line
    # The notebook API gives the group's report, and that rank's run as the source (the one input for callers
    # that take one, analyzers.report.load_source).
    source, report = build_report(out)
    assert source.path == str(out / "rank-1") and source.meta["run_group"]["reason"] == "raised RuntimeError"
    assert report.kv.final_bytes == WORLD * RANK_KV_BYTES
    assert report.group is not None and report.group.focus_rank == 1
    assert load_source(out).path == str(out / "rank-1")

    # AND without rank 0's run nor the marker it wrote (rank 0 may be the one that died), still a group
    shutil.rmtree(out / "rank-0")
    (out / GROUP_MARKER).unlink()
    assert is_run_group(out)
    data = _report(out, capsys)
    assert [r["rank"] for r in data["ranks"]] == [1] and data["missing_ranks"] == [0]
    assert data["kv"]["final_bytes"] == RANK_KV_BYTES
    assert any("rank 0" in note for note in data["notes"])


def test_a_rank_killed_mid_run_leaves_its_flushed_steps(tmp_path, capsys):
    out, facts = tmp_path / "group", tmp_path / "facts"

    # GIVEN rank 1 is SIGKILLed inside record(), after its last step: no exception, no teardown
    statuses = worker.launch("reference-kill", out, facts, WORLD)
    assert statuses == [0, -9], (facts / "rank-1.log").read_text()[-2000:]

    # THEN its run says it never finished, and holds every step it flushed
    data = _report(out, capsys)
    assert data["failed_ranks"] == [1] and data["ranks"][1]["status"] == "running"
    assert data["focus"] == {"rank": 1, "reason": "never finished (the process died)"}
    assert [r["kv"]["final_bytes"] for r in data["ranks"]] == [RANK_KV_BYTES, RANK_KV_BYTES]
    assert data["ranks"][1]["steps"] == data["ranks"][0]["steps"]
