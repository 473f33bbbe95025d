"""transformers' continuous batching (`generate_batch`) recorded as a paged pool, in vLLM's engine files.

A real `generate_batch` on a tiny random Llama 3 (2 layers, 2 KV heads, head_dim 16, float32) with a pool of
4-token blocks. Expected figures come from the KV arithmetic, from transformers' own
`PagedAttentionMemoryHandler` (spied on, not through kvtrace), and from the raw files, never from the code
under test."""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import cache as cb_cache

import kvtrace
from kvtrace.cli import main
from kvtrace.integrations.hf_paged import PagedAttentionHooks
from tests.cb_versions import SECTOR_POOL
from tests.engine_page import expected_pool_rows, pool_table
from tests.tiny import HEAD_DIM

pytestmark = SECTOR_POOL

LAYERS, KV_HEADS, PAGE, FLOAT32 = 2, 2, 4, 4
# One block: every layer's K and V for PAGE tokens.
BLOCK_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * PAGE * FLOAT32  # 2048
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14]]


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record(
    path: Path, model: torch.nn.Module, num_blocks: int, new_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs generate_batch under record(); returns its outputs and what transformers' memory handler said."""
    said: dict[str, Any] = {}
    handler = cb_cache.PagedAttentionMemoryHandler
    original = handler.infer_max_batch_tokens_and_num_sectors

    def spy(self: Any) -> tuple[int, int]:
        result = original(self)
        said.update(bytes_per_block=self.bytes_per_block, bytes_per_sector=self.bytes_per_sector)
        said["num_sectors"] = result[1]
        return result

    monkeypatch.setattr(handler, "infer_max_batch_tokens_and_num_sectors", spy)
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=num_blocks, page_size=PAGE, max_batch_tokens=64)
    with kvtrace.record(path, model=model, profiler=False):
        outputs = model.generate_batch(
            PROMPTS, generation_config=generation, continuous_batching_config=batching, progress_bar=False
        )
    return outputs, said


def test_pool_figures_steps_and_requests(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a pool of 32 blocks: every request fits from the start
    outputs, said = _record(tmp_path / "run", cb_model, num_blocks=32, new_tokens=8, monkeypatch=monkeypatch)
    run = tmp_path / "run"
    engine = json.loads((run / "engine.json").read_text())
    steps = _lines(run / "engine_steps.jsonl")
    requests = _lines(run / "engine_requests.jsonl")
    manifest = json.loads((run / "manifest.json").read_text())

    # THEN the pool is the flat tensor: data sectors plus transformers' two trash sectors
    pool_bytes = (said["num_sectors"] + 2) * said["bytes_per_sector"]
    assert said["bytes_per_block"] == BLOCK_BYTES == engine["bytes_per_block"]
    assert engine["kv_cache_bytes"] == pool_bytes == sum(s["bytes"] for s in engine["storage"])
    assert engine["num_blocks"] == pool_bytes // BLOCK_BYTES
    assert engine["usable_blocks"] == said["num_sectors"] * said["bytes_per_sector"] // BLOCK_BYTES >= 32
    assert engine["blocks_reserved"] == 2 * said["bytes_per_sector"] // BLOCK_BYTES
    assert engine["block_size"] == PAGE
    assert (engine["name"], engine["kv_dtype"]) == ("transformers-cb", "float32")
    assert manifest["engine"]["name"] == "transformers-cb"
    assert not any("PagedAttentionCache" in w for w in manifest["warnings"])

    # one engine step per forward; blocks rise from the prompts' blocks, then fall to none
    assert manifest["engine"]["engine_steps"] == len(steps) == 8  # a prefill, then 7 decodes
    used = [s["blocks_used"] for s in steps]
    assert used[0] == sum(math.ceil(len(p) / PAGE) for p in PROMPTS)  # 2 + 2 + 1
    # after each step: the last one finishes every request, so the most is after step 7, whose KV holds
    # the prompt and 6 generated tokens (step k writes the token step k-1 produced)
    held_after_step_7 = sum(math.ceil((len(p) + 6) / PAGE) for p in PROMPTS)
    assert max(used) == used[-2] == held_after_step_7 > used[0]
    assert used[-1] == 0 and steps[-1]["running"] == 0
    # while step 8 ran, its KV held the prompt and 7 generated tokens: the run's peak
    held_at_last_decode = sum(math.ceil((len(p) + 7) / PAGE) for p in PROMPTS)
    assert steps[-1]["blocks_used_in_step"] == held_at_last_decode > held_after_step_7
    for s in steps:
        assert s["blocks_used"] + s["blocks_free"] + s["blocks_reserved"] == s["blocks_total"]
        assert s["blocks_total"] == engine["num_blocks"]
    assert [s["phase"] for s in steps] == ["prefill"] + ["decode"] * 7

    # every request, with its prompt and its output tokens
    finished = {r["request_id"]: r for r in requests if r["event"] == "finished"}
    scheduled = {r["request_id"]: r for r in requests if r["event"] == "scheduled"}
    assert set(finished) == set(scheduled) == set(outputs)
    for request_id, output in outputs.items():
        assert scheduled[request_id]["prompt_tokens"] == len(output.prompt_ids)
        assert finished[request_id]["output_tokens"] == len(output.generated_tokens) == 8

    # the KV log names the one storage once per layer and kind
    created = [e for e in _lines(run / "kv_events.jsonl") if e["event"] == "created"]
    assert len(created) == LAYERS * 2
    assert {(e["addr"], e["storage_bytes"]) for e in created} == {(engine["storage"][0]["addr"], pool_bytes)}

    # WHEN the report reads it THEN the engine object is there and the KV peak is the pool
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    got = report["engine"]
    assert (got["name"], got["kv_cache_bytes"], got["num_blocks"]) == ("transformers-cb", pool_bytes, 34)
    assert got["peak_blocks_used"] == held_at_last_decode and got["preemptions"] == 0
    assert report["kv"]["peak_bytes"] == pool_bytes
    assert report["kv"]["bytes_per_token_measured"] == BLOCK_BYTES / PAGE

    # the HTML panel and the Parquet tables read the same files
    assert main(["report", str(run), "-o", str(tmp_path / "r.html"), "-q", "--no-export"]) == 0
    assert "transformers-cb" in (tmp_path / "r.html").read_text()
    capsys.readouterr()
    assert main(["export", str(run), "-o", str(tmp_path / "tables"), "--json", "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert (rows["engine_steps"], rows["engine_requests"]) == (len(steps), len(requests))


@pytest.mark.parametrize("new_tokens", [1, 8])
def test_the_peak_counts_blocks_freed_in_the_step_that_used_them(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    new_tokens: int,
) -> None:
    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor

    # GIVEN requests that all finish in one step (equal max_new_tokens; with 1, the step that prefills them)
    # AND the blocks the paged cache's block tables hold while each step's forward runs, read in it
    held: list[int] = []
    forward = ContinuousBatchProcessor._generation_step

    def counted(proc: Any, model: Any) -> None:
        tables = [t for a in proc.cache.cache_allocators.values() for t in a.block_table.values()]
        held.append(sum(len(t) for t in tables))  # one attention type: one allocator, whole-model blocks
        forward(proc, model)

    monkeypatch.setattr(ContinuousBatchProcessor, "_generation_step", counted)
    _record(tmp_path / "run", cb_model, num_blocks=32, new_tokens=new_tokens, monkeypatch=monkeypatch)
    run = tmp_path / "run"
    steps = _lines(run / "engine_steps.jsonl")
    # the last step's KV: each prompt and all but the last generated token (10 blocks for 8, 5 for 1)
    peak = sum(math.ceil((len(p) + new_tokens - 1) / PAGE) for p in PROMPTS)
    assert len(held) == len(steps) == new_tokens and max(held) == held[-1] == peak

    # THEN each step's line says what the pool held while it ran; after it, the finished ones freed theirs
    assert [s["blocks_used_in_step"] for s in steps] == held
    assert steps[-1]["blocks_used"] == 0
    # AND the report says that peak, at the last step (was 0 for max_new_tokens=1, and 9 for 8: the most
    # held after a step)
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    engine = json.loads(capsys.readouterr().out)["engine"]
    assert (engine["peak_blocks_used"], engine["peak_step"]) == (peak, steps[-1]["step"])


def test_a_small_pool_makes_the_scheduler_wait_and_offload(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN 8 usable blocks (32 tokens) for three requests that grow to 18, 17 and 15 tokens
    outputs, _ = _record(tmp_path / "run", cb_model, num_blocks=8, new_tokens=12, monkeypatch=monkeypatch)
    run = tmp_path / "run"
    steps = _lines(run / "engine_steps.jsonl")
    requests = _lines(run / "engine_requests.jsonl")
    usable = json.loads((run / "engine.json").read_text())["usable_blocks"]
    assert usable == 8

    # THEN the pool fills, requests wait, and the scheduler takes some out of the pool
    assert max(s["blocks_used"] for s in steps) == usable
    assert any(s["waiting"] > 0 for s in steps)
    preempted = [r for r in requests if r["event"] == "preempted"]
    assert preempted and sum(len(s["preempted"]) for s in steps) == len(preempted)
    for r in preempted:
        assert r["dropped_blocks"] == math.ceil(r["dropped_tokens"] / PAGE) > 0
        assert r["offloaded_to"] in ("cpu", "recompute")
        later = [e["event"] for e in requests if e["request_id"] == r["request_id"] and e["t_ns"] > r["t_ns"]]
        assert "resumed" in later and later[-1] == "finished"
    # a request reset to be recomputed recomputes the KV it dropped, as vLLM's are counted (the prompts share
    # no prefix): its last sampled token, never fed, had no KV to recompute (it was counted, one more)
    returns = []
    for r in preempted:
        after = [e for e in requests if e["request_id"] == r["request_id"] and e["t_ns"] > r["t_ns"]]
        if r["offloaded_to"] == "recompute" and after[0]["event"] == "resumed":
            returns.append((after[0]["recomputed_tokens"], r["dropped_tokens"]))
    assert returns and all(recomputed == dropped for recomputed, dropped in returns), returns
    # every request still completes, in full
    assert all(len(o.generated_tokens) == 12 for o in outputs.values())
    finished = [r for r in requests if r["event"] == "finished"]
    assert sorted(r["output_tokens"] for r in finished) == [12, 12, 12]

    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    got = json.loads(capsys.readouterr().out)["engine"]
    assert got["preemptions"] == len(preempted)
    assert got["preempted_tokens"] == sum(r["dropped_tokens"] for r in preempted)
    assert got["first_preemption_step"] == min(r["step"] for r in preempted)
    # AND the export keeps where each one went
    assert main(["export", str(run), "-o", str(tmp_path / "tables"), "-q"]) == 0
    capsys.readouterr()
    sql = "SELECT offloaded_to FROM engine_requests WHERE event = 'preempted' ORDER BY t_ns"
    assert main(["query", str(tmp_path / "tables"), "--json", sql]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["offloaded_to"] for row in rows] == [r["offloaded_to"] for r in preempted]

    # diagnose gives the requests' demand in blocks (the last sampled token gets no KV), not vLLM's knobs
    demand = sum(math.ceil((len(p) + 12 - 1) / PAGE) for p in PROMPTS)  # 5 + 4 + 4
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    assert (diagnosis["kind"], diagnosis["demand_blocks"]) == ("preemption", demand)
    assert "kv_cache_memory_bytes" not in diagnosis["sentence"]
    # AND a pool of that many usable blocks takes no request out
    _record(tmp_path / "sized", cb_model, num_blocks=demand, new_tokens=12, monkeypatch=monkeypatch)
    sized = _lines(tmp_path / "sized" / "engine_requests.jsonl")
    assert not [r for r in sized if r["event"] == "preempted"]


def test_a_budget_the_run_fits_prices_the_largest_pool_against_what_its_requests_needed(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN the small pool's run (8 usable blocks; its requests needed 5 + 4 + 4 at once: some were taken out)
    run = tmp_path / "run"
    _record(run, cb_model, num_blocks=8, new_tokens=12, monkeypatch=monkeypatch)
    demand = sum(math.ceil((len(p) + 12 - 1) / PAGE) for p in PROMPTS)
    from analyzers.planning.vllm_diagnose import diagnose_preemptions
    from analyzers.readers.engine_files import read_engine

    engine = read_engine(run)
    assert engine is not None
    recorded = diagnose_preemptions(engine).recorded_peak_demand_blocks
    assert 8 < recorded <= demand

    for room, holds in ((1 << 30, True), (1 << 10, False)):
        # WHEN diagnosed against a budget it fits: far over its peak, then just over it
        assert main(["diagnose", str(run), "--budget", "1GiB", "--json"]) == 0
        peak = json.loads(capsys.readouterr().out)["budget"]["peak_bytes"]
        budget = f"{peak + room}B"
        assert main(["diagnose", str(run), "--budget", budget, "--json"]) == 0
        priced = json.loads(capsys.readouterr().out)["budget"]
        assert main(["diagnose", str(run), "--budget", budget]) == 0
        text = capsys.readouterr().out.splitlines()

        # THEN the text gives the largest pool the budget holds and its knobs, as --json does (it gave one
        # line), and says whether that pool holds what the requests needed at once, not the 8 the run used
        assert priced["crossed"] is False
        (blocks,) = [r["setting"] for r in priced["remedies"] if r["knob"] == "num_blocks"]
        assert text[1].strip().startswith("the largest pool it holds is ")
        assert [line.strip() for line in text[2:4]] == [r["sentence"] for r in priced["remedies"]]
        # (said as the diagnosis says a pool's verdict: the demand is the worst case; the small pool is
        # short of the recorded schedule's too)
        pool = f"its {blocks:,} usable blocks"
        said = (
            f"{pool} hold the {demand} its requests needed at once: none would be taken out"
            if holds
            else f"{pool} are fewer than the {recorded} its requests needed together on the recorded "
            "schedule: some would likely still be taken out"
        )
        assert said in text[2], text
        assert (blocks >= demand) == holds


def test_the_page_of_a_small_pool_says_its_preemptions_as_the_text_does(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN 8 usable blocks for three requests that grow past them: the scheduler takes some out
    _record(tmp_path / "run", cb_model, num_blocks=8, new_tokens=12, monkeypatch=monkeypatch)
    run = tmp_path / "run"
    assert [r for r in _lines(run / "engine_requests.jsonl") if r["event"] == "preempted"]
    expected = expected_pool_rows(run)
    # WHEN the report is written as a page, and said as text
    page = tmp_path / "report.html"
    assert main(["report", str(run), "--no-export", "-q", "-o", str(page)]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out
    # THEN the page's pool table holds the raw files' figures (8 of 8 usable blocks, 100%; the first
    # preemption's step, the tokens dropped and recomputed), the ones the text report's lines give
    assert pool_table(page.read_text()) == expected
    assert expected["peak"].startswith("8 of 8 usable blocks used (100%, ")
    assert f"    peak {expected['peak']}; " in text and f"    preemptions: {expected['preemptions']}" in text


def test_the_hooks_are_gone_and_generate_is_recorded_as_before(
    tmp_path: Path, cb_model: torch.nn.Module
) -> None:
    # GIVEN a plain generate() after a recorded generate_batch: no engine files, KV from the Cache classes
    ids = torch.tensor([PROMPTS[0]])
    with kvtrace.record(tmp_path / "run", model=cb_model, profiler=False):
        cb_model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert "engine" not in manifest and not (run / "engine.json").exists()
    events = _lines(run / "kv_events.jsonl")
    assert events and all(e.get("source", "hf") == "hf" and e["cache"] != 3100 for e in events)
    # the dynamic cache's last storages hold the prompt and the 3 tokens written back (the 4th never is)
    final = {(e["layer"], e["kv"]): e["tokens"] for e in events if e["event"] != "freed"}
    assert set(final.values()) == {len(PROMPTS[0]) + 3}
    assert manifest["kv_events"] == len(events)


def test_the_readme_snippet_records_the_pool(
    tmp_path: Path, cb_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    snippets = [s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "generate_batch" in s]
    assert len(snippets) == 1
    monkeypatch.chdir(tmp_path)
    names = {
        "kvtrace": kvtrace,
        "model": cb_model,
        "prompts": PROMPTS,
        "generation": GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0),
        "batching": ContinuousBatchingConfig(num_blocks=16, page_size=PAGE, max_batch_tokens=64),
    }
    exec(snippets[0], names)  # the README's code, verbatim
    engine = json.loads((tmp_path / "runs" / "cb" / "engine.json").read_text())
    assert engine["bytes_per_block"] == BLOCK_BYTES and engine["kv_cache_bytes"] % BLOCK_BYTES == 0
    assert len(names["outputs"]) == len(PROMPTS)


def test_a_manager_started_inside_the_block(tmp_path: Path, cb_model: torch.nn.Module) -> None:
    generation = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=16, page_size=PAGE, max_batch_tokens=64)
    with kvtrace.record(tmp_path / "run", model=cb_model, profiler=False):
        manager = cb_model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        manager.start()
        manager.add_requests(inputs=PROMPTS[:2], max_new_tokens=5)
        finished = 0
        while finished < 2:
            result = manager.get_result(timeout=10)
            assert result is not None
            finished += result.is_finished()
        manager.stop(block=True)
    requests = _lines(tmp_path / "run" / "engine_requests.jsonl")
    done = {
        r["request_id"]: (r["prompt_tokens"], r["output_tokens"])
        for r in requests
        if r["event"] == "finished"
    }
    assert sorted(done.values()) == sorted((len(p), 5) for p in PROMPTS[:2])


def test_a_failure_in_kvtraces_bookkeeping_fails_no_request(
    tmp_path: Path, cb_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN bookkeeping that breaks at the third step
    original = PagedAttentionHooks._after_step

    def breaks(self: PagedAttentionHooks, proc: Any) -> None:
        if self.engine_steps == 2:
            raise RuntimeError("broken on purpose")
        original(self, proc)

    monkeypatch.setattr(PagedAttentionHooks, "_after_step", breaks)
    outputs, _ = _record(tmp_path / "run", cb_model, num_blocks=32, new_tokens=6, monkeypatch=monkeypatch)
    # THEN every request completes, the logs stop at that step, and the manifest says why
    assert sorted(len(o.generated_tokens) for o in outputs.values()) == [6, 6, 6]
    assert len(_lines(tmp_path / "run" / "engine_steps.jsonl")) == 2
    warnings = json.loads((tmp_path / "run" / "manifest.json").read_text())["warnings"]
    assert any("recording stopped at step 3 (RuntimeError: broken on purpose)" in w for w in warnings)


def test_prefix_sharing_hits_and_cached_blocks(tmp_path: Path, cb_model: torch.nn.Module) -> None:
    # GIVEN the same 9-token prompt three times, one request per batch: each finds its predecessor's blocks
    prompt = list(range(1, 10))
    generation = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(
        num_blocks=32, page_size=PAGE, max_batch_tokens=10, max_requests_per_batch=1
    )
    with kvtrace.record(tmp_path / "run", model=cb_model, profiler=False):
        cb_model.generate_batch(
            [prompt] * 3, generation_config=generation, continuous_batching_config=batching
        )
    steps = _lines(tmp_path / "run" / "engine_steps.jsonl")
    # THEN each later request hits its prompt's whole blocks (8 tokens; a match never covers the whole prompt)
    shared = (len(prompt) - 1) // PAGE * PAGE
    assert [s["prefix_hits"] for s in steps if s["prefix_queries"]] == [0, shared, shared]
    assert sum(s["prefix_queries"] for s in steps) == 3 * len(prompt)
    # between requests, the prompt's 2 full blocks stay cached for the next one (the blocks it hits)
    finished_rows = [s for s in steps if s["running"] == 0]
    assert finished_rows and all(s["blocks_cached"] == shared // PAGE for s in finished_rows)


def test_a_forward_that_raises_ends_the_block_with_a_manifest(
    tmp_path: Path, cb_model: torch.nn.Module
) -> None:
    # GIVEN the profiler on, and a forward hook that raises at the 3rd forward (the 3rd engine step)
    calls = [0]

    def raises(module: Any, args: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")

    handle = cb_model.model.layers[1].register_forward_pre_hook(raises)
    generation = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    try:
        # WHEN generate_batch fails its requests (transformers catches the error on its generation thread)
        with kvtrace.record(tmp_path / "run", model=cb_model, profiler=True):
            outputs = cb_model.generate_batch(
                PROMPTS, generation_config=generation, continuous_batching_config=batching, progress_bar=False
            )
    finally:
        handle.remove()
    # THEN the block ends as usual: the step's range was closed on its own thread, the run is complete
    assert len(outputs) == len(PROMPTS)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "ok"
    assert (
        "continuous batching: engine step 3 failed in its forward; the figures end there"
        in manifest["warnings"]
    )
    assert len(_lines(tmp_path / "run" / "engine_steps.jsonl")) == 2


def test_the_pool_is_freed_when_generate_batch_returns(tmp_path: Path, cb_model: torch.nn.Module) -> None:
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    with kvtrace.record(tmp_path / "run", model=cb_model, profiler=False):
        cb_model.generate_batch(PROMPTS, generation_config=generation, continuous_batching_config=batching)
        gc.collect()
        # THEN no pool outlives its generate_batch (kvtrace held the first one until the block ended)
        alive = [o for o in gc.get_objects() if isinstance(o, cb_cache.PagedAttentionCache)]
    assert alive == []
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert (
        manifest["engine"]["kv_cache_bytes"]
        == json.loads((tmp_path / "run" / "engine.json").read_text())["kv_cache_bytes"]
    )
    assert manifest["engine"]["engine_steps"] == len(_lines(tmp_path / "run" / "engine_steps.jsonl"))


def test_a_plain_generate_after_generate_batch_keeps_its_own_figures(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    ids = torch.tensor([PROMPTS[0], PROMPTS[0]])
    run = tmp_path / "run"
    with kvtrace.record(run, model=cb_model, profiler=False):
        cb_model.generate_batch(PROMPTS, generation_config=generation, continuous_batching_config=batching)
        cb_model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
    capsys.readouterr()
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    pool = next(e for e in _lines(run / "kv_events.jsonl") if e["cache"] == 3100)["storage_bytes"]
    # THEN the DynamicCache holds its own 2 rows x (6 + 3 - 1) tokens at the end; the pool, freed when
    # generate_batch returned (before generate()'s steps), holds nothing then and counts at the peak
    tokens = len(PROMPTS[0]) + 3 - 1
    per_token = LAYERS * 2 * KV_HEADS * HEAD_DIM * FLOAT32
    dynamic = 2 * tokens * per_token
    caches = {c["cache"]: c["final_bytes"] for c in kv["caches"]}
    assert caches == {1: dynamic, 3100: 0}
    assert kv["final_bytes"] == dynamic
    assert kv["peak_bytes"] == pool
    # the headline figures and the per-layer rows are those of the cache held at the end
    assert (kv["main_cache"], kv["batch"], kv["tokens_held"]) == (1, 2, tokens)
    assert kv["bytes_per_token_measured"] == per_token
    assert {layer["cache"] for layer in kv["per_layer"]} == {1}
    assert sum(layer["k_bytes"] + layer["v_bytes"] for layer in kv["per_layer"]) == dynamic


def test_a_second_generate_batch_is_a_warning(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    generation = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    run = tmp_path / "run"
    with kvtrace.record(run, model=cb_model, profiler=False):
        for _ in range(2):
            cb_model.generate_batch(
                PROMPTS, generation_config=generation, continuous_batching_config=batching
            )
    capsys.readouterr()
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    # THEN the report says that the figures leave the second batch out
    said = "a second continuous-batching pool (another generate_batch) is left out"
    assert any(said in note for note in json.loads(capsys.readouterr().out)["notes"])


def test_compare_names_the_engine(
    tmp_path: Path, cb_model: torch.nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    generation = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
    run = tmp_path / "run"
    with kvtrace.record(run, model=cb_model, profiler=False):
        cb_model.generate_batch(PROMPTS, generation_config=generation, continuous_batching_config=batching)
    capsys.readouterr()
    assert main(["compare", str(run), str(run)]) == 0
    text = capsys.readouterr().out
    assert "vLLM" not in text
    row = next(line.split() for line in text.splitlines() if line.split()[:1] == ["engine"])
    assert row == ["engine", "transformers-cb", "transformers-cb"]
    assert main(["compare", str(run), str(run), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [r["engine"]["name"] for r in runs] == ["transformers-cb", "transformers-cb"]


def test_a_request_offloaded_again_before_it_resumes_recomputes_what_it_prefills(
    tmp_path: Path, cb_model: torch.nn.Module
) -> None:
    # GIVEN five requests sharing a 40-token prefix in a pool of 9 blocks of 16 tokens: requests are taken
    # out of the pool (a soft reset: recomputed on their return), some twice before they return
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(5, 900, (40,), generator=generator).tolist()
    tails = torch.Generator().manual_seed(1)
    prompts = [prefix + torch.randint(5, 900, (n,), generator=tails).tolist() for n in (5, 9, 3, 12, 7)]
    generation = GenerationConfig(max_new_tokens=30, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(page_size=16, num_blocks=9, max_batch_tokens=64, use_cuda_graph=False)
    with kvtrace.record(tmp_path / "run", model=cb_model, profiler=False):
        cb_model.generate_batch(prompts, generation_config=generation, continuous_batching_config=batching)
    steps = {s["step"]: s for s in _lines(tmp_path / "run" / "engine_steps.jsonl")}
    requests = _lines(tmp_path / "run" / "engine_requests.jsonl")
    resumed = [r for r in requests if r["event"] == "resumed"]
    preempted = [r for r in requests if r["event"] == "preempted"]
    assert resumed and len(preempted) > len(resumed)  # some request went out twice before returning
    # THEN a returning request's recomputed tokens are what its step prefilled beyond the other running
    # requests' one token each (it was 0 for a request offloaded again mid-recompute)
    for event in resumed:
        step = steps[event["step"]]
        assert event["recomputed_tokens"] >= step["tokens_scheduled"] - step["running"], event


def test_a_pool_without_per_layer_views_is_not_said_to_be_vllms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # GIVEN a model of sliding and full layers (two attention types: no per-layer view of the pool)
    config = Qwen2Config(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=0,
        layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    generation = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(page_size=16, num_blocks=12, max_batch_tokens=64)
    with kvtrace.record(tmp_path / "run", model=model):
        model.generate_batch(
            [[5] * 20, [6] * 9], generation_config=generation, continuous_batching_config=batching
        )
    # THEN the report's note about the pool names transformers' engine, not vLLM
    assert main(["report", str(tmp_path / "run"), "--json", "--no-export", "-q"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert not any("vLLM" in note for note in notes), notes
    assert any(note.startswith("the transformers-cb KV pool") for note in notes), notes


def test_a_transformers_without_prefix_eviction_records_the_pool(
    tmp_path: Path, cb_model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN the PagedAttentionCache of a transformers that has no prefix-block eviction (5.17, the version on
    # the GPU machine: record() raised AttributeError there on entry, before any generate() could run)
    monkeypatch.delattr(cb_cache.PagedAttentionCache, "evict_cached_blocks")
    outputs, said = _record(tmp_path / "run", cb_model, num_blocks=32, new_tokens=8, monkeypatch=monkeypatch)
    # THEN every request ran and the pool is recorded as on a transformers that has it
    run = tmp_path / "run"
    engine = json.loads((run / "engine.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(outputs) == len(PROMPTS) and manifest["ended"]["status"] == "ok"
    assert engine["kv_cache_bytes"] == (said["num_sectors"] + 2) * said["bytes_per_sector"]
    assert manifest["engine"]["engine_steps"] == len(_lines(run / "engine_steps.jsonl")) == 8
    assert manifest["engine"]["prefix_evicted_blocks"] == 0
    # AND the block added no method the class did not have
    assert not hasattr(cb_cache.PagedAttentionCache, "evict_cached_blocks")


def test_plan_from_a_pool_run_without_its_engine_file_is_refused_naming_it(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a continuous-batching run copied without its engine.json (its manifest names the pool)
    run = tmp_path / "run"
    _record(run, cb_model, num_blocks=32, new_tokens=4, monkeypatch=monkeypatch)
    (run / "engine.json").unlink()
    # WHEN it is planned THEN the missing file is named, not the pool planned as a dynamic cache of its rows
    assert main(["plan", "--from-run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"kvtrace plan: error: {run / 'engine.json'}: missing, where the manifest says the run's KV was "
        "transformers-cb's pool: plan --from-run reads the pool from it\n"
    )
