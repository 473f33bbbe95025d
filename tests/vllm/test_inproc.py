"""In-process vLLM: the recorded pool, steps, requests and preemptions equal vLLM's own figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from kvtrace import format as fmt
from kvtrace.run_reader import read_run
from tests.vllm.workload import (
    BLOCK_SIZE,
    NEW_TOKENS,
    POOL_BYTES,
    PROMPT_TOKENS,
    REQUESTS,
    SIZE,
    blocks_held_by_requests,
    make_llm,
    metric,
    recorded_files,
    run_workload,
)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    llm = make_llm(tiny_model_dir)
    core = llm.llm_engine.engine_core.engine_core
    before = {
        "step_fn": core.__dict__["step_fn"],
        "scheduler": set(vars(core.scheduler)),
        "pool": set(vars(core.scheduler.kv_cache_manager.block_pool)),
    }
    run_dir = tmp_path_factory.mktemp("vllm-run") / "run"
    with kvtrace.record(run_dir, model=llm, profiler=False):
        outputs = run_workload(llm)
    runner = core.model_executor.driver_worker.worker.model_runner
    return {
        "llm": llm,
        "core": core,
        "before": before,
        **recorded_files(run_dir),
        "outputs": outputs,
        "kv_tensors": list(runner.kv_caches),
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "preemptions": metric(llm, "vllm:num_preemptions"),
        "request_preemptions": metric(llm, "vllm:request_num_preemptions"),
    }


def test_pool_equals_vllms_own(recorded: dict[str, Any]) -> None:
    engine = recorded["engine"]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in recorded["kv_tensors"]}
    # GIVEN vLLM's figures: its block count, and the model runner's KV tensors (views of one storage)
    assert len(storages) == 1
    # THEN the recorded pool is that storage, counted once, and the arithmetic of the model's KV
    assert engine["status"] == "ok" and engine["process"] == "inproc"
    assert engine["num_blocks"] == recorded["num_gpu_blocks"] == POOL_BYTES // (BLOCK_SIZE * 2048)
    assert engine["block_size"] == BLOCK_SIZE
    assert engine["kv_cache_bytes"] == sum(storages.values()) == POOL_BYTES
    head_dim = SIZE.hidden_size // SIZE.num_heads
    assert engine["bytes_per_block"] == SIZE.num_layers * 2 * SIZE.num_kv_heads * head_dim * 2 * BLOCK_SIZE
    assert [layer["layer"] for layer in engine["layers"]] == list(range(SIZE.num_layers))
    assert {layer["storage_addr"] for layer in engine["layers"]} == set(storages)
    assert sorted(layer["view_offset"] for layer in engine["layers"]) == [
        i * POOL_BYTES // SIZE.num_layers for i in range(SIZE.num_layers)
    ]
    assert engine["model"]["num_kv_heads"] == SIZE.num_kv_heads and engine["kv_dtype"] == "bfloat16"


def test_weights_are_the_checkpoints_and_vllms_buffers_apart(
    recorded: dict[str, Any], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import math

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvtrace.cli import main

    # GIVEN the checkpoint's parameter count, from its config by transformers on the meta device
    config = AutoConfig.from_pretrained(tiny_model_dir)
    with torch.device("meta"):
        checkpoint_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    hidden, vocab, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    head_dim = hidden // config.num_attention_heads
    # vLLM pads the vocabulary to a multiple of 64 rows: the embedding it holds (tied: the lm_head too)
    padded_rows = math.ceil(vocab / 64) * 64 - vocab
    held_params = checkpoint_params + padded_rows * hidden * (1 if config.tie_word_embeddings else 2)
    # its own buffers: the rotary cos/sin cache (max positions x head_dim), 4 float32 scales per attention,
    # and on CPU 0 to 2 packed copies of the embedding matrix (embedding and tied lm_head) beside it
    rotary = config.max_position_embeddings * head_dim * 2
    scales = layers * 4 * 4
    embedding_copy = (vocab + padded_rows) * hidden * 2
    engine = recorded["engine"]
    # THEN engine.json counts the checkpoint's parameters, the weights held in bfloat16 (on vLLM's CPU build
    # the linear layers' are in their packed copies, not in any parameter), the buffers apart
    assert engine["model"]["num_params"] == checkpoint_params
    assert engine["memory_profile"]["weights_bytes"] == held_params * 2
    buffers = engine["memory_profile"]["buffers_bytes"]
    assert buffers - rotary - scales in (0, embedding_copy, 2 * embedding_copy)
    # AND the report gives the parameters, and names both figures where it says what the trace missed
    assert main(["report", str(recorded["dir"]), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["geometry"]["parameters"] == checkpoint_params
    notes = " ".join(report["notes"])
    assert f"the model's weights ({held_params * 2 / 2**20:.2f} MiB" in notes
    assert f"vLLM's own buffers ({buffers / 2**20:.2f} MiB" in notes


def test_the_runs_model_class_reaches_the_report_and_export(
    recorded: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN the class vLLM loaded (the checkpoint's architectures); the manifest of a vLLM run has no model
    hf_config = recorded["llm"].llm_engine.vllm_config.model_config.hf_config
    (architecture,) = hf_config.architectures
    assert json.loads((recorded["dir"] / fmt.MANIFEST).read_text()).get("model") is None
    # WHEN the run is reported and exported THEN its geometry and runs row name it (model_class was empty)
    assert main(["report", str(recorded["dir"]), "--json", "--no-export", "-q"]) == 0
    geometry = json.loads(capsys.readouterr().out)["geometry"]
    named = (geometry["class"], geometry["model_type"])
    assert named == (architecture, hf_config.model_type) == ("LlamaForCausalLM", "llama")
    assert geometry["num_kv_heads"] == SIZE.num_kv_heads and geometry["num_layers"] == SIZE.num_layers
    out = tmp_path / "tables"
    assert main(["export", str(recorded["dir"]), "-o", str(out), "-q"]) == 0
    import pyarrow.parquet as pq

    (row,) = pq.read_table(out / "runs").to_pylist()
    assert (row["model_class"], row["num_kv_heads"], row["head_dim"]) == (
        architecture,
        SIZE.num_kv_heads,
        SIZE.hidden_size // SIZE.num_heads,
    )


def test_a_multi_query_falcon_has_the_one_kv_head_vllm_caches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main
    from tests.vllm.workload import FALCON_SIZE, run_script

    # GIVEN Falcon 7B's layout, recorded: 4 query heads of 64 share one KV head (the config's num_kv_heads
    # says 4); vLLM caches that one head, in blocks of layers x K and V x 1 x 64 x 32 tokens x 2 B
    model_dir, run_dir = tmp_path / "falcon", tmp_path / "run"
    vllm = run_script("falcon_record", str(model_dir), str(run_dir), kvtrace_dir=None, multiprocess=False)
    layers = FALCON_SIZE["num_hidden_layers"]
    head_dim = FALCON_SIZE["hidden_size"] // FALCON_SIZE["num_attention_heads"]
    per_token = layers * 2 * 1 * head_dim * 2  # 512 B
    assert vllm["spec_kv_heads"] == [1]
    assert vllm["tensor_shapes"] == [[vllm["num_blocks"], 1, BLOCK_SIZE, 2 * head_dim]] * layers  # CPU LBHNC
    # THEN the manifest and the report count one KV head, and their arithmetic is the pool's (was 4: 2,048 B)
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    assert engine["model"]["num_kv_heads"] == 1
    assert engine["bytes_per_block"] == per_token * BLOCK_SIZE == 16_384
    assert main(["report", str(run_dir), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["geometry"]["num_kv_heads"] == 1
    assert report["kv"]["bytes_per_token_expected"] == report["kv"]["bytes_per_token_measured"] == per_token
    # AND a plan from the run sizes vLLM's blocks and counts its pool's (was 4 heads: 65,536 B, 16 blocks)
    assert main(["plan", "--from-run", str(run_dir), "--engine", "vllm", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["bytes_per_block"] == per_token * BLOCK_SIZE
    assert plan["num_blocks"] == vllm["num_blocks"] == POOL_BYTES // (per_token * BLOCK_SIZE)


def test_falcons_new_decoder_records_its_num_kv_heads(tmp_path: Path) -> None:
    from transformers import FalconConfig
    from vllm.config import ModelConfig, VllmConfig

    from kvtrace.integrations.vllm import model_facts
    from tests.vllm.workload import FALCON_SIZE

    # GIVEN Falcon 40B's new decoder: 4 query heads over `num_kv_heads` 2, and no `num_key_value_heads`
    # (engine.json's model, also written for a refused start, comes from the config alone)
    new_decoder = {"new_decoder_architecture": True, "num_kv_heads": 2, "alibi": False}
    FalconConfig(**FALCON_SIZE, **new_decoder).save_pretrained(tmp_path)
    model_config = ModelConfig(model=str(tmp_path), skip_tokenizer_init=True, dtype="bfloat16")
    # THEN the recorded KV heads are the 2 vLLM caches (were the 4 query heads)
    assert model_facts(VllmConfig(model_config=model_config))["num_kv_heads"] == 2


def test_preemptions_equal_vllms_counter(recorded: dict[str, Any]) -> None:
    preempted = [e for e in recorded["requests"] if e["event"] == "preempted"]
    # GIVEN a pool that cannot hold every request THEN vLLM preempted, and kvtrace saw each one
    assert recorded["preemptions"] > 0
    assert len(preempted) == recorded["preemptions"]
    assert sum(len(s["preempted"]) for s in recorded["steps"]) == recorded["preemptions"]
    # per request, they add up to vLLM's per-request histogram
    assert recorded["request_preemptions"] == len(preempted)
    for event in preempted:
        assert event["dropped_blocks"] > 0
        assert event["dropped_tokens"] > 0 and event["blocks"] == 0
        assert (event["dropped_tokens"] - 1) // BLOCK_SIZE < event["dropped_blocks"]


def test_every_preempted_request_resumes_and_finishes(recorded: dict[str, Any]) -> None:
    by_request: dict[str, list[str]] = {}
    for event in recorded["requests"]:
        by_request.setdefault(event["request_id"], []).append(event["event"])
    assert len(by_request) == REQUESTS
    for events in by_request.values():
        assert events[:2] == ["waiting", "scheduled"] and events[-1] == "finished"
        assert events.count("waiting") == 1
        assert events.count("preempted") == events.count("resumed")
    # each ran to its max_tokens: vLLM's finish reason "length", as its outputs say
    assert {o.outputs[0].finish_reason for o in recorded["outputs"]} == {"length"}
    assert {e.get("finish_reason") for e in recorded["requests"] if e["event"] == "finished"} == {"length"}
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in recorded["outputs"])


def test_scheduled_tokens_are_the_work_plus_recompute(recorded: dict[str, Any]) -> None:
    # Each request computes its prompt and all but its last sampled token once; a resumed request
    # recomputes what it lost minus the prefix-cache hits (recomputed_tokens).
    recomputed = sum(e.get("recomputed_tokens", 0) for e in recorded["requests"] if e["event"] == "resumed")
    work = REQUESTS * (PROMPT_TOKENS + NEW_TOKENS - 1)
    assert sum(s["tokens_scheduled"] for s in recorded["steps"]) == work + recomputed


def test_blocks_used_is_what_the_requests_hold(recorded: dict[str, Any]) -> None:
    # Replaying the request events gives the blocks held after each step; prompts share no prefix, so no
    # block is counted twice.
    steps = recorded["steps"]
    assert [s["blocks_used"] for s in steps] == blocks_held_by_requests(steps, recorded["requests"])
    for step in steps:
        assert step["blocks_used"] + step["blocks_free"] + step["blocks_reserved"] == step["blocks_total"]
    assert max(s["blocks_used"] for s in recorded["steps"]) <= recorded["num_gpu_blocks"] - 1


def test_kv_log_counts_the_pool_once(recorded: dict[str, Any]) -> None:
    from analyzers.kv_log import analyze_kv_log

    run = read_run(recorded["dir"])
    created = [e for e in run.kv_events if e.event == "created"]
    assert len(created) == 2 * SIZE.num_layers
    assert {e.storage_bytes for e in created} == {POOL_BYTES}
    assert analyze_kv_log(run.kv_events).peak_bytes == POOL_BYTES
    manifest = run.manifest
    assert manifest["ended"]["status"] == "ok"
    assert manifest["engine"]["preemptions"] == recorded["preemptions"]
    step_samples = [s for s in run.memory_samples if s["phase"] != "host"]  # host figures: writer thread
    assert manifest["engine"]["engine_steps"] == len(recorded["steps"]) == len(step_samples) - 2
    # every line the request log holds, counted as the steps are: a copy cut short is refused by it
    assert manifest["engine"]["engine_requests"] == len(recorded["requests"])


def test_a_request_log_cut_after_the_run_is_refused_naming_both_counts(
    recorded: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from kvtrace.cli import main

    # GIVEN a copy of the run whose request log lost its second half of lines (a partial copy)
    run = Path(shutil.copytree(recorded["dir"], tmp_path / "run"))
    log = run / fmt.ENGINE_REQUESTS
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == len(recorded["requests"]) > 1
    log.write_text("".join(lines[: len(lines) // 2]))  # kept below
    # THEN diagnose refuses it in one line naming the file and both counts
    assert main(["diagnose", str(run)]) == 2
    err = capsys.readouterr().err
    kept = len(lines) // 2
    said = (
        f"{log}: damaged after the run ended: {kept} complete lines of the {len(lines)} the manifest counts"
    )
    assert err == f"kvtrace diagnose: error: {said}\n"


def test_hooks_are_undone(recorded: dict[str, Any]) -> None:
    core, before = recorded["core"], recorded["before"]
    assert core.__dict__["step_fn"] == before["step_fn"]
    assert set(vars(core.scheduler)) == before["scheduler"]
    assert set(vars(core.scheduler.kv_cache_manager.block_pool)) == before["pool"]


def test_engine_steps_are_profiler_ranges(recorded: dict[str, Any], tmp_path: Path) -> None:
    import gzip

    from tests.vllm.workload import prompts, sampling

    llm = recorded["llm"]
    llm.reset_prefix_cache()
    run_dir = tmp_path / "profiled"
    with kvtrace.record(run_dir, model=llm, profiler=True):
        llm.generate(prompts(2, 8), sampling(3), use_tqdm=False)
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 3
    traces = read_run(run_dir).profiler_traces()
    assert traces
    raw = traces[0].read_bytes()
    text = (gzip.decompress(raw) if traces[0].suffix == ".gz" else raw).decode()
    names = {e.get("name") for e in json.loads(text)["traceEvents"]}
    assert {f"kvtrace/engine step {s['step']}" for s in steps} <= names
    # The pool is logged once, at the start, before the trace's first event: the trace lies inside the run
    # all the same (its manifest's start and end), and no note may say it is off the run's clock
    from analyzers.report import load_source

    assert "trace_clock_note" not in load_source(run_dir).meta


def test_a_request_done_in_its_first_step_is_seen(recorded: dict[str, Any], tmp_path: Path) -> None:
    from tests.vllm.workload import prompts, sampling

    llm = recorded["llm"]
    llm.reset_prefix_cache()
    with kvtrace.record(tmp_path / "one", model=llm, profiler=False):
        llm.generate(prompts(2, 40), sampling(1), use_tqdm=False)
    events = _jsonl(tmp_path / "one" / fmt.ENGINE_REQUESTS)
    # one step: prefill 40 tokens (2 blocks of 32), sample the only token, free the blocks
    assert [(e["event"], e["blocks"], e["tokens"]) for e in events] == [
        ("waiting", 0, 0),
        ("waiting", 0, 0),
        ("scheduled", 2, 40),
        ("scheduled", 2, 40),
        ("finished", 0, 0),
        ("finished", 0, 0),
    ]
    # taken in before the first step (step 0), then scheduled and finished in it
    assert [e["step"] for e in events] == [0, 0, 1, 1, 1, 1]
    assert all(e["prompt_tokens"] == 40 for e in events)


def _record_with_vllms_pool(
    llm: Any, core: Any, run_dir: Path, requests: list[Any], params: Any
) -> list[int]:
    """Record `llm.generate(requests, params)`, and return the blocks vLLM's own pool had handed out as each
    step's output reached the scheduler (`Scheduler.update_from_output`, which kvtrace does not hook): all
    the blocks the step computed with, before finished requests free theirs."""
    scheduler = core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    update = scheduler.update_from_output
    held: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        held.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())  # less vLLM's null block
        return update(*args, **kwargs)

    scheduler.update_from_output = counted
    try:
        with kvtrace.record(run_dir, model=llm, profiler=False):
            llm.generate(requests, params, use_tqdm=False)
    finally:
        del scheduler.update_from_output
    return held


@pytest.mark.parametrize(
    ("count", "prompt", "new_tokens"),
    [
        # GIVEN max_tokens=1: each request takes its blocks and frees them in its one step
        (3, 100, 1),
        # GIVEN requests whose last step crosses into a third block (40 + 26 - 1 = 65 tokens of KV)
        (3, 40, 26),
    ],
)
def test_the_peak_counts_blocks_freed_in_the_step_that_used_them(
    recorded: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    count: int,
    prompt: int,
    new_tokens: int,
) -> None:
    from kvtrace.cli import main
    from tests.vllm.workload import prompts, sampling

    llm = recorded["llm"]
    llm.reset_prefix_cache()
    run_dir = tmp_path / "run"
    held = _record_with_vllms_pool(
        llm, recorded["core"], run_dir, prompts(count, prompt), sampling(new_tokens)
    )
    # a request never holds more than cdiv(prompt + output - 1, block) blocks, and holds them in its last
    # step: the prompts share no prefix, so all three hold theirs at once (3 x 4 = 12 and 3 x 3 = 9 of 15)
    peak = count * -(-(prompt + new_tokens - 1) // BLOCK_SIZE)
    assert max(held) == held[-1] == peak <= recorded["num_gpu_blocks"] - 1
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    # THEN each step's blocks in use are vLLM's as the step ran; after it, the finished ones freed theirs
    assert [s["blocks_used_in_step"] for s in steps] == held
    assert steps[-1]["blocks_used"] == 0
    # AND the report and the diagnosis say that peak, at the last step (were 0 and 6: the steps' ends)
    assert main(["report", str(run_dir), "--json", "--no-export", "-q"]) == 0
    engine = json.loads(capsys.readouterr().out)["engine"]
    assert (engine["peak_blocks_used"], engine["peak_step"]) == (peak, steps[-1]["step"])
    assert main(["diagnose", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["peak_blocks_used"] == peak


def test_the_pool_chart_draws_what_the_steps_held_while_they_ran(
    recorded: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from analyzers.tb_plugin.run_store import RunStore
    from kvtrace.cli import main
    from tests.plotly_figures import decoded, page_figure
    from tests.vllm.workload import prompts, sampling

    llm = recorded["llm"]
    llm.reset_prefix_cache()
    # GIVEN 3 max_tokens=1 requests of 100 tokens: each takes cdiv(100, 32) = 4 blocks and frees them in the
    # one step that used them, so no step ends with a block in use
    run_dir = tmp_path / "runs" / "one-token"
    held = _record_with_vllms_pool(llm, recorded["core"], run_dir, prompts(3, 100), sampling(1))
    peak, usable = 3 * -(-100 // BLOCK_SIZE), recorded["num_gpu_blocks"] - 1
    assert max(held) == peak == 12 and usable == 15
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    assert {s["blocks_used"] for s in steps} == {0}

    # WHEN the report draws its HTML page and says its text
    page = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--no-export", "-q", "-o", str(page)]) == 0
    assert main(["report", str(run_dir), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out
    traces = page_figure(page.read_text(), "kvtrace-engine-pool")[0]
    by_name = {trace["name"]: trace for trace in traces}

    # THEN the pool's curve is what vLLM's pool held as each step ran, its top the report's peak (it drew
    # the pool after each step: 0 throughout, under a table that said peak 12); its hover adds the after
    used = by_name["blocks used while the step ran"]
    assert used["x"] == [s["step"] for s in steps] and used["y"] == held and max(used["y"]) == peak
    assert used["customdata"] == [s["blocks_used"] for s in steps]
    assert "while it ran" in used["hovertemplate"]
    share = round(100 * peak / usable)
    said = f"{peak} of {usable} usable blocks used ({share}%, counted while each step ran)"
    said += f" at step {steps[-1]['step']}"
    assert f"<tr><th>peak</th><td>{said}</td></tr>" in page.read_text() and f"peak {said};" in text
    # AND each request's lane holds its 4 blocks through the step it finished in: the lanes add up to it
    lanes = by_name["blocks per request"]
    assert [sum(column) for column in zip(*lanes["z"], strict=True)] == held
    assert sorted(max(row) for row in lanes["z"]) == [4, 4, 4]
    # AND TensorBoard's KV Cache tab draws that same figure
    pool = RunStore(tmp_path / "runs").pool("one-token")
    assert decoded(pool["figure"]["data"]) == traces


def test_the_export_has_the_blocks_each_step_held_while_it_ran(
    recorded: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    import pyarrow.parquet as pq

    from kvtrace.cli import main
    from tests.vllm.workload import prompts, sampling

    # GIVEN a sample run as kvtrace wrote it before `blocks_used_in_step` (its steps less that field), in an
    # export DIR whose part was written by a kvtrace without that column (this part, less the column, with
    # its metadata)
    old = shutil.copytree(Path(__file__).parents[2] / "sample_traces" / "vllm_preempt", tmp_path / "old")
    old_steps = [
        {k: v for k, v in s.items() if k != "blocks_used_in_step"} for s in _jsonl(old / fmt.ENGINE_STEPS)
    ]
    (old / fmt.ENGINE_STEPS).write_text("".join(json.dumps(s) + "\n" for s in old_steps))
    out = tmp_path / "tables"
    assert main(["export", str(old), "-o", str(out), "-q"]) == 0
    (part,) = (out / "engine_steps").glob("part-*.parquet")
    table = pq.read_table(part)
    assert table.column("blocks_used_in_step").null_count == table.num_rows == len(old_steps)
    pq.write_table(
        table.drop_columns(["blocks_used_in_step"]).replace_schema_metadata(table.schema.metadata), part
    )
    # AND a run of 3 max_tokens=1 requests of 100 tokens (4 blocks each, freed in the step that used them)
    llm = recorded["llm"]
    llm.reset_prefix_cache()
    new = tmp_path / "new"
    held = _record_with_vllms_pool(llm, recorded["core"], new, prompts(3, 100), sampling(1))
    peak = 3 * -(-100 // BLOCK_SIZE)
    assert max(held) == peak == 12

    # WHEN it is exported into the same DIR, and queried
    assert main(["export", str(new), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    sql = "SELECT run_id, step, blocks_used, blocks_used_in_step FROM engine_steps ORDER BY run_id, step"
    assert main(["query", str(out), "--json", sql]) == 0
    rows = json.loads(capsys.readouterr().out)

    # THEN its rows carry what vLLM's pool held as each step ran, beside the pool after it (the table had
    # only `blocks_used`: 0 at every step); the old run's are null, not its `blocks_used`
    new_rows = [r for r in rows if r["run_id"] == new.as_posix()]
    assert [r["blocks_used_in_step"] for r in new_rows] == held
    assert {r["blocks_used"] for r in new_rows} == {0}
    old_rows = [r for r in rows if r["run_id"] == old.as_posix()]
    assert [r["blocks_used"] for r in old_rows] == [s["blocks_used"] for s in old_steps]
    assert {r["blocks_used_in_step"] for r in old_rows} == {None}
    # AND a query's peak per run is the report's peak_blocks_used
    peak_sql = "SELECT run_id, max(blocks_used_in_step) AS peak FROM engine_steps GROUP BY 1 ORDER BY 1"
    assert main(["query", str(out), "--json", peak_sql]) == 0
    peaks = {r["run_id"]: r["peak"] for r in json.loads(capsys.readouterr().out)}
    assert main(["report", str(new), "--json", "--no-export", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"]["peak_blocks_used"] == peaks[new.as_posix()] == peak
    assert peaks[old.as_posix()] is None


def test_a_request_aborted_before_it_was_scheduled_is_counted(
    recorded: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main
    from tests.vllm.workload import prompts, sampling

    llm = recorded["llm"]
    llm.reset_prefix_cache()
    engine = llm.llm_engine

    def successes() -> float:  # vLLM's count of requests that completed, over all its finish reasons
        return sum(m.value for m in llm.get_metrics() if m.name == "vllm:request_success")

    success_before = successes()
    finish_reasons: dict[str, str] = {}  # vLLM's own, from the outputs it returns
    run_dir = tmp_path / "aborted"
    with kvtrace.record(run_dir, model=llm, profiler=False):
        # GIVEN three requests of 40 prompt tokens; the second is aborted before any engine step
        ids = [engine.add_request(f"w{i}", prompt, sampling(4)) for i, prompt in enumerate(prompts(3, 40))]
        engine.abort_request(["w1"])
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finish_reasons[output.request_id] = output.outputs[0].finish_reason
    completed = successes() - success_before
    assert completed == 2 and finish_reasons == {"w0": "length", "w2": "length"}
    events = _jsonl(run_dir / fmt.ENGINE_REQUESTS)
    # THEN its lines are its taking in and its end, holding nothing, with vLLM's finish reason (had none)
    assert [
        (e["event"], e["blocks"], e.get("finish_reason")) for e in events if e["request_id"] == ids[1]
    ] == [("waiting", 0, None), ("finished", 0, "abort")]
    # AND the report counts it: 3 requests, 1 aborted (were 2 requests, none aborted)
    assert main(["report", str(run_dir), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)["engine"]
    assert report["requests"] == len(ids) == 3
    assert (report["finish_reasons"], report["requests_aborted"]) == ({"length": completed, "abort": 1}, 1)
    assert main(["report", str(run_dir), "--no-export", "-q"]) == 0
    assert "3 requests (2 completed, 1 aborted)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def aborted_run(recorded: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Four requests of 40 prompt tokens, two of them aborted (after their first decode; alone, with no engine
    step after the abort), recorded: the run, the ids add_request returned, vLLM's own finish reasons and the
    aborted requests' statuses."""
    from tests.vllm.workload import prompts, sampling

    llm = recorded["llm"]
    llm.reset_prefix_cache()
    engine, scheduler = llm.llm_engine, recorded["core"].scheduler
    run_dir = tmp_path_factory.mktemp("vllm-aborted") / "aborted"
    finish_reasons: dict[str, str] = {}  # vLLM's own, from the outputs it returns (by the ids we gave)

    def step() -> None:
        for output in engine.step():
            if output.finished:
                finish_reasons[output.request_id] = output.outputs[0].finish_reason

    with kvtrace.record(run_dir, model=llm, profiler=False):
        # three requests of 40 prompt tokens; the second is aborted after its prefill and one decode
        ids = [engine.add_request(f"a{i}", prompt, sampling(8)) for i, prompt in enumerate(prompts(3, 40))]
        step(), step()
        aborted = [scheduler.requests[ids[1]]]
        engine.abort_request(["a1"])
        while engine.has_unfinished_requests():
            step()
        # and a fourth is aborted while it runs alone: no engine step follows its abort
        ids.append(engine.add_request("a3", prompts(1, 40)[0], sampling(20)))
        step(), step()
        aborted.append(scheduler.requests[ids[3]])
        engine.abort_request(["a3"])
        assert not engine.has_unfinished_requests()
    return {
        "dir": run_dir,
        "ids": ids,
        "finish_reasons": finish_reasons,
        "aborted_statuses": [r.status for r in aborted],
    }


def test_an_aborted_request_is_logged_as_aborted(
    aborted_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vllm.v1.request import RequestStatus

    from kvtrace.cli import main

    # GIVEN three requests of 40 prompt tokens, the second aborted after its prefill and one decode, and a
    # fourth aborted while it ran alone (aborted_run)
    run_dir, ids, finish_reasons = aborted_run["dir"], aborted_run["ids"], aborted_run["finish_reasons"]
    # vLLM's own account: two ran to their length, two are FINISHED_ABORTED
    assert finish_reasons == {"a0": "length", "a2": "length"}
    assert aborted_run["aborted_statuses"] == [RequestStatus.FINISHED_ABORTED] * 2
    events = _jsonl(run_dir / fmt.ENGINE_REQUESTS)  # by vLLM's internal ids, which add_request returned
    finished = {e["request_id"]: e for e in events if e["event"] == "finished"}
    # THEN each request's last event is its one "finished" line, with vLLM's finish reason
    assert sorted(finished) == sorted(ids)
    assert {rid: e["finish_reason"] for rid, e in finished.items()} == {
        ids[0]: "length",
        ids[1]: "abort",
        ids[2]: "length",
        ids[3]: "abort",
    }
    for rid in ids:
        assert [e for e in events if e["request_id"] == rid][-1] is finished[rid]
    # the aborts came after step 2 and after the last step: logged with the step each request last ran in
    steps = _jsonl(run_dir / fmt.ENGINE_STEPS)
    assert finished[ids[1]]["step"] == 2 and finished[ids[3]]["step"] == steps[-1]["step"]
    assert finished[ids[1]]["output_tokens"] == 2  # sampled by its prefill and its one decode step
    # WHEN reported and exported THEN the count tells completed from aborted
    assert main(["report", str(run_dir), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)["engine"]
    assert report["requests"] == 4
    assert (report["finish_reasons"], report["requests_aborted"]) == ({"length": 2, "abort": 2}, 2)
    assert main(["report", str(run_dir), "--no-export", "-q"]) == 0
    assert "4 requests (2 completed, 2 aborted)" in capsys.readouterr().out
    out = tmp_path / "tables"
    assert main(["export", str(run_dir), "-o", str(out), "-q"]) == 0
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "engine_requests").to_pylist()
    assert sorted((r["request_id"], r["finish_reason"]) for r in rows if r["event"] == "finished") == sorted(
        (rid, e["finish_reason"]) for rid, e in finished.items()
    )
    assert {r["finish_reason"] for r in rows if r["event"] != "finished"} == {None}


def test_compare_has_a_row_for_the_requests_vllm_aborted(
    recorded: dict[str, Any], aborted_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import html
    import re

    from kvtrace.cli import main

    # GIVEN the run whose two requests vLLM aborted (abort_request), and the workload run, which aborted none:
    # the counts of `finished` lines with reason "abort" in each request log
    runs = [aborted_run["dir"], recorded["dir"]]
    logs = [_jsonl(run / fmt.ENGINE_REQUESTS) for run in runs]
    aborted = [sum(e["event"] == "finished" and e.get("finish_reason") == "abort" for e in lg) for lg in logs]
    assert aborted == [2, 0]
    # WHEN they are compared as JSON, as text and as a page
    assert main(["compare", *map(str, runs), "--json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    page = tmp_path / "compare.html"
    assert main(["compare", *map(str, runs), "-o", str(page)]) == 0
    text = capsys.readouterr().out
    # THEN each run's engine counts its aborted requests, as its log and the report do ("2 aborted")
    assert [run["engine"]["aborted_requests"] for run in compared["runs"]] == aborted
    assert [run["engine"]["failed_requests"] for run in compared["runs"]] == [0, 0]
    assert not any("aborted requests unknown" in note for run in compared["runs"] for note in run["notes"])
    # AND the text and the page have a row for them, beside the failed requests'
    row = next(line for line in text.splitlines() if line.startswith("engine aborted requests"))
    assert row.split()[3:] == [str(n) for n in aborted]
    cells = re.search(r"<tr><th>engine aborted requests</th>((?:<td>.*?</td>)*)</tr>", page.read_text())
    assert cells is not None
    on_page = [html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", cells.group(1))]
    assert on_page == [str(n) for n in aborted]
