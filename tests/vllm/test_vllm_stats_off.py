"""vLLM with its stats off (`disable_log_stats=True`, `vllm.LLM()`'s default) keeps no prefix-cache stats:
kvtrace counts the hits itself, as vLLM 0.32 does (`KVCacheManager.record_prefix_cache_stats` at each
admission from the waiting queue: all the request's tokens queried, the cached ones hit, a resumed request
apart), so that a recording with stats off says what vLLM's own counters say with them on. A step whose hits
cannot be counted logs them null, and `diagnose` says they are unknown rather than 0. Each run twice:
scheduled synchronously, and asynchronously (two batches in flight), where vLLM reports a step's admissions
with the next batch output it collects, a step later when the step only queued its batch.

Workload: tests/vllm/workload.py (4 layers x 2 KV heads of 64, bf16: 64 KiB a block of 32 tokens; a pool of
16 blocks, 15 usable). 8 requests whose first 64 tokens (2 blocks) are the same, 16 tokens of their own and
32 new tokens, prefix caching on: each needs cdiv(64 + 16 + 32 - 1, 32) = 4 blocks, 8 x 4 > 15: they preempt.
"""

from __future__ import annotations

import contextlib
import gc
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from analyzers.engine import engine_figures
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, diagnose_engine
from analyzers.readers.engine_files import read_engine
from tests.vllm.test_vllm_async_scheduling import _async_scheduling_on_cpu
from tests.vllm.workload import make_llm, metric, recorded_files, sampling

SHARED_TOKENS, OWN_TOKENS, NEW_TOKENS, USABLE = 64, 16, 32, 15
PREFIX_FIELDS = ("prefix_hits", "prefix_queries", "prefix_preempted_hits", "prefix_preempted_queries")


def _requests() -> list[Any]:
    from vllm.inputs import TokensPrompt

    shared = [(7 * j) % 990 + 5 for j in range(SHARED_TOKENS)]
    return [
        TokensPrompt(prompt_token_ids=shared + [(97 * i + j) % 990 + 5 for j in range(OWN_TOKENS)])
        for i in range(8)
    ]


def _record(model: Path, run_dir: Path, stats: bool, async_scheduling: bool) -> dict[str, Any]:
    """The workload recorded with vLLM's stats on or off; with them on, vLLM's own counters of the run."""
    with _async_scheduling_on_cpu() if async_scheduling else contextlib.nullcontext():
        llm = make_llm(
            model, enable_prefix_caching=True, disable_log_stats=not stats, async_scheduling=async_scheduling
        )
    core = llm.llm_engine.engine_core.engine_core
    assert (core.batch_queue is not None) is async_scheduling
    del core
    with kvtrace.record(run_dir, model=llm, profiler=False):
        llm.generate(_requests(), sampling(NEW_TOKENS), use_tqdm=False)
    figures = recorded_files(run_dir)
    if stats:
        figures["vllm"] = {
            "hits": metric(llm, "vllm:prefix_cache_hits"),
            "queries": metric(llm, "vllm:prefix_cache_queries"),
            "preemptions": metric(llm, "vllm:num_preemptions"),
        }
    del llm
    gc.collect()  # before the next engine starts, not while it runs
    return figures


@pytest.fixture(scope="module", params=["sync", "async"])
def runs(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """The workload with stats on and off, scheduled synchronously and asynchronously (two batches in
    flight: vLLM reports a step's stats with the batch it collects, which may be the step before's)."""
    gc.collect()  # an earlier module's engine, collected before this one starts
    folder = tmp_path_factory.mktemp(f"stats-{request.param}")
    on_async = request.param == "async"
    return {
        "on": _record(tiny_model_dir, folder / "on", stats=True, async_scheduling=on_async),
        "off": _record(tiny_model_dir, folder / "off", stats=False, async_scheduling=on_async),
    }


def _totals(steps: list[dict[str, Any]]) -> dict[str, int]:
    return {name: sum(step[name] for step in steps) for name in PREFIX_FIELDS}


def _diagnose(run_dir: Path) -> PreemptionDiagnosis:
    engine = read_engine(run_dir)
    assert engine is not None
    diagnosis = diagnose_engine(engine)
    assert isinstance(diagnosis, PreemptionDiagnosis)
    return diagnosis


def test_stats_off_counts_the_hits_vllm_counts_with_stats_on(runs: dict[str, dict[str, Any]]) -> None:
    on, off = runs["on"], runs["off"]
    # GIVEN the same run with vLLM's stats on and off: the same schedule, step for step
    assert [s["tokens_scheduled"] for s in off["steps"]] == [s["tokens_scheduled"] for s in on["steps"]]
    assert on["vllm"]["preemptions"] > 0
    # THEN with them on, kvtrace's lines say vLLM's counters: 7 requests find the 2 shared blocks (64
    # tokens), every one of the 8 queries its 80 prompt tokens
    vllm = on["vllm"]
    assert _totals(on["steps"])["prefix_hits"] == vllm["hits"] == 7 * SHARED_TOKENS
    assert _totals(on["steps"])["prefix_queries"] == vllm["queries"] == 8 * (SHARED_TOKENS + OWN_TOKENS)
    # AND vLLM reports them with the batch output it collects: in the step that took the requests in, or,
    # scheduled asynchronously, the next (the first step only queues its batch)
    on_async = on["engine"]["config"]["async_scheduling"]
    assert on_async is off["engine"]["config"]["async_scheduling"]
    took_in = min(e["step"] for e in off["requests"] if e["event"] == "scheduled")
    reported = min(s["step"] for s in on["steps"] if s["prefix_queries"])
    assert reported == took_in + (1 if on_async else 0)
    # AND with them off, kvtrace's own count says the same, step for step, the resumed requests' too
    for name in PREFIX_FIELDS:
        assert [s[name] for s in off["steps"]] == [s[name] for s in on["steps"]], name
    assert _totals(off["steps"])["prefix_hits"] == vllm["hits"]
    assert _totals(off["steps"])["prefix_queries"] == vllm["queries"]
    resumed = sum(1 for e in off["requests"] if e["event"] == "resumed")
    assert resumed > 0 and _totals(off["steps"])["prefix_preempted_queries"] > 0


def test_stats_off_diagnoses_and_reports_as_stats_on(runs: dict[str, dict[str, Any]]) -> None:
    on = _diagnose(runs["on"]["dir"])
    off = _diagnose(runs["off"]["dir"])
    # THEN the max_num_seqs found counting each shared block once per request (15 // 4 = 3) is said a lower
    # bound ([?]), and the shared tokens are said, as with vLLM's stats on
    per_request = -(-(SHARED_TOKENS + OWN_TOKENS + NEW_TOKENS - 1) // 32)
    assert off.max_num_seqs_without_preemption == on.max_num_seqs_without_preemption == USABLE // per_request
    assert off.max_num_seqs_lower_bound and on.max_num_seqs_lower_bound
    (seqs,) = [r for r in off.remedies if r.knob == "max_num_seqs"]
    assert seqs.fits is None
    shared_note = f"requests shared {7 * SHARED_TOKENS:,} prefix-cached tokens"
    assert any(note.startswith(shared_note) for note in off.notes)
    assert off.notes == on.notes and off.remedies == on.remedies
    # AND the report's figures (compare's and export's) carry the hits
    figures = engine_figures(_engine(runs["off"]["dir"]))
    assert figures.prefix_hit_tokens == 7 * SHARED_TOKENS
    assert figures.prefix_query_tokens == 8 * (SHARED_TOKENS + OWN_TOKENS)


def _engine(run_dir: Path) -> Any:
    engine = read_engine(run_dir)
    assert engine is not None
    return engine


def test_hits_that_could_not_be_counted_are_unknown_not_zero(
    runs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    # GIVEN the stats-off run with its steps' hits logged null (what kvtrace writes where it cannot count
    # them: a KV connector, a streaming session)
    import shutil

    run_dir = tmp_path / "unknown"
    shutil.copytree(runs["off"]["dir"], run_dir)
    steps = [{**step, **dict.fromkeys(PREFIX_FIELDS)} for step in runs["off"]["steps"]]
    (run_dir / "engine_steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    # THEN the figures say unknown, and diagnose says so: max_num_seqs a lower bound, not [fits]
    figures = engine_figures(_engine(run_dir))
    assert figures.prefix_hit_tokens is None and figures.prefix_query_tokens is None
    diagnosis = _diagnose(run_dir)
    assert diagnosis.max_num_seqs_lower_bound
    (seqs,) = [r for r in diagnosis.remedies if r.knob == "max_num_seqs"]
    assert seqs.fits is None
    assert any("prefix-cache hits are unknown" in note for note in diagnosis.notes)
    assert not any("prefix-cached tokens" in note for note in diagnosis.notes)


def _as_recorded_before(source: Path, run_dir: Path, hits: dict[str, Any] | None) -> Path:
    """A copy of a run as kvtrace wrote it before engine.json said who counts the hits (`prefix_stats`), its
    steps' prefix fields set to `hits` (0 each: what it logged with vLLM's stats off)."""
    import shutil

    shutil.copytree(source, run_dir)
    info = json.loads((run_dir / "engine.json").read_text())
    del info["prefix_stats"]
    (run_dir / "engine.json").write_text(json.dumps(info))
    if hits is not None:
        lines = (run_dir / "engine_steps.jsonl").read_text().splitlines()
        steps = [{**json.loads(line), **hits} for line in lines]
        (run_dir / "engine_steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    return run_dir


def test_runs_say_who_counted_their_hits(runs: dict[str, dict[str, Any]]) -> None:
    assert _engine(runs["on"]["dir"]).info.prefix_stats == "vllm"
    assert _engine(runs["off"]["dir"]).info.prefix_stats == "kvtrace"


def test_a_run_recorded_before_kvtrace_counted_hits_with_stats_off_says_them_unknown(
    runs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    # GIVEN the stats-off run as the version before this one wrote it: 0 hits of 0 queries in every step
    old = _as_recorded_before(runs["off"]["dir"], tmp_path / "old", dict.fromkeys(PREFIX_FIELDS, 0))
    # THEN its hits are unknown, not 0: vLLM queries every request it admits with its stats on
    assert engine_figures(_engine(old)).prefix_hit_tokens is None
    diagnosis = _diagnose(old)
    (seqs,) = [r for r in diagnosis.remedies if r.knob == "max_num_seqs"]
    assert seqs.fits is None and diagnosis.max_num_seqs_lower_bound
    assert any("prefix-cache hits are unknown" in note for note in diagnosis.notes)
    # AND the export's engine_steps say them null, as the report does
    import pyarrow.parquet as pq

    from kvtrace.cli import main

    assert main(["export", str(old), "-o", str(tmp_path / "export"), "-q"]) == 0
    exported = pq.read_table(tmp_path / "export" / "engine_steps").to_pylist()
    assert len(exported) == len(runs["off"]["steps"])
    assert all(row[name] is None for row in exported for name in PREFIX_FIELDS)
    # AND a run of the same version with vLLM's stats on keeps its hits (its steps queried)
    kept = _as_recorded_before(runs["on"]["dir"], tmp_path / "on", None)
    assert engine_figures(_engine(kept)).prefix_hit_tokens == 7 * SHARED_TOKENS


def test_parallel_samples_hits_are_counted_as_vllm_counts_them(tiny_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN parallel sampling (n=3) on 2 prompts of 80 tokens, prefix caching on, in a pool that holds them
    from vllm import SamplingParams

    prompts = _requests()[:2]
    params = SamplingParams(n=3, max_tokens=8, ignore_eos=True, detokenize=False, temperature=1.0, seed=1)
    totals = {}
    for stats in (True, False):
        gc.collect()
        llm = make_llm(tiny_model_dir, enable_prefix_caching=True, disable_log_stats=not stats)
        with kvtrace.record(tmp_path / str(stats), model=llm, profiler=False):
            llm.generate(prompts, params, use_tqdm=False)
        totals[stats] = _totals(recorded_files(tmp_path / str(stats))["steps"])
        if stats:
            vllm_hits = metric(llm, "vllm:prefix_cache_hits")
            vllm_queries = metric(llm, "vllm:prefix_cache_queries")
        del llm
        gc.collect()
    # THEN every sample but the first finds the 2 full blocks (64 tokens) the prompts share: 5 x 64 hits of
    # 6 x 80 queries, vLLM's counters with stats on, and kvtrace's with them off
    assert totals[True]["prefix_hits"] == vllm_hits == 5 * SHARED_TOKENS
    assert totals[True]["prefix_queries"] == vllm_queries == 6 * (SHARED_TOKENS + OWN_TOKENS)
    assert totals[False] == totals[True]
