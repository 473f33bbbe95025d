"""The engine files read back into figures: every expected number is worked out by hand from
tests/engine_files.py (see its docstring for the scenario)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyzers.engine import engine_figures, held_at
from analyzers.planning.vllm_diagnose import diagnose_engine, diagnose_preemptions
from analyzers.readers.engine_files import read_engine
from analyzers.render.engine import engine_text_lines, engine_to_json
from analyzers.render.vllm_diagnosis import vllm_diagnosis_to_json, vllm_diagnosis_to_text
from kvtrace.errors import KvtraceError
from tests.engine_files import ENGINE_JSON, REQUESTS, STEPS, _req, write_engine_run


def test_no_engine_json_is_not_an_engine_run(tmp_path: Path) -> None:
    assert read_engine(tmp_path) is None


def test_figures_of_the_hand_made_run(tmp_path: Path) -> None:
    run = read_engine(write_engine_run(tmp_path / "run"))
    assert run is not None
    fig = engine_figures(run)
    assert (fig.num_blocks, fig.block_size, fig.bytes_per_block, fig.kv_cache_bytes) == (5, 4, 128, 640)
    assert fig.steps == 5
    assert (fig.peak_blocks_used, fig.peak_step) == (4, 1)  # both prefills fill the 4 usable blocks
    assert fig.preemptions == 1 and fig.preemptions_by_request == {"B": 1}
    assert (fig.preempted_tokens, fig.preempted_blocks, fig.recomputed_tokens) == (7, 2, 8)
    assert fig.prefix_cache_evicted_blocks == 1 + 2
    assert fig.requests == 2 and fig.first_preemption_step == 4
    data = engine_to_json(fig)
    for key in (
        "name",
        "version",
        "num_blocks",
        "block_size",
        "kv_cache_bytes",
        "peak_blocks_used",
        "preemptions",
        "preempted_tokens",
        "prefix_cache_evicted_blocks",
    ):
        assert key in data
    assert data["name"] == "vllm" and data["version"] == "0.32.0"
    text = "\n".join(engine_text_lines(fig))
    assert "5 blocks of 4 tokens" in text and "640 B" in text and "preemptions: 1" in text


def test_the_peak_is_what_the_requests_held_while_a_step_ran(tmp_path: Path) -> None:
    # GIVEN max_tokens=1 requests: two of 6 tokens (2 blocks each) in step 1, one in step 2, each freeing
    # its blocks in the step that used them, so no step ends with a block in use
    steps = [
        {**STEPS[0], "blocks_used": 0, "blocks_free": 4, "blocks_used_in_step": 2 * 2},
        {**STEPS[1], "blocks_used": 0, "blocks_free": 4, "blocks_used_in_step": 2},
    ]
    run = read_engine(write_engine_run(tmp_path / "run", steps=steps, requests=[]))
    assert run is not None
    # THEN the peak is step 1's 4 blocks (was 0: the steps' ends)
    assert (engine_figures(run).peak_blocks_used, engine_figures(run).peak_step) == (4, 1)
    # AND a run recorded before kvtrace wrote `blocks_used_in_step` reads as it did: the steps' ends
    old = [{k: v for k, v in row.items() if k != "blocks_used_in_step"} for row in steps]
    run = read_engine(write_engine_run(tmp_path / "old", steps=old, requests=[]))
    assert run is not None and engine_figures(run).peak_blocks_used == 0


def test_a_request_aborted_before_it_was_scheduled_counts_at_what_it_would_need(tmp_path: Path) -> None:
    # GIVEN the hand-made run and a request C of 12 prompt tokens, max_tokens 2, aborted while it waited:
    # taken in (its `waiting` line), then its end, never holding a block
    taken_in = _req(0, "C", "waiting", 0, 0, 12, 0, max_tokens=2)
    aborted = _req(2, "C", "finished", 0, 0, 12, 0, finish_reason="abort")
    run = read_engine(write_engine_run(tmp_path / "run", requests=[taken_in, *REQUESTS, aborted]))
    assert run is not None
    fig = engine_figures(run)
    # THEN it is a request of the run, and an aborted one
    assert (fig.requests, fig.requests_aborted) == (3, 1)
    # AND a larger pool admits it: it needs its 12 + 2 - 1 = 13 tokens of KV, cdiv(13, 4) = 4 blocks (was
    # left out: a pool "avoiding every preemption" admitted it and preempted), so the 2 that run together at
    # most need 4 + 3 = 7 (was 6)
    d = diagnose_preemptions(run)
    assert d.final_demand_blocks == {"A": 3, "B": 2, "C": 4} and d.demand_bound_blocks == 7
    assert (d.requests, d.blocks_needed) == (3, 8)
    # it never held a block: the demand on the recorded schedule is A's and B's alone
    assert (d.recorded_peak_demand_blocks, d.recorded_peak_demand_step) == (5, 4)
    assert d.remedies[0].fits is True


def test_a_request_aborted_before_it_was_scheduled_without_its_length_leaves_no_remedy_said_to_fit(
    tmp_path: Path,
) -> None:
    # GIVEN the same request C as kvtrace logged it before `waiting`: its one line is its end, so how long it
    # would grow once admitted is unknown
    aborted = _req(2, "C", "finished", 0, 0, 12, 0, finish_reason="abort")
    run = read_engine(write_engine_run(tmp_path / "run", requests=[*REQUESTS, aborted]))
    assert run is not None
    # THEN it counts at its prompt at least: cdiv(12, 4) = 3 blocks
    d = diagnose_preemptions(run)
    assert d.final_demand_blocks == {"A": 3, "B": 2, "C": 3} and d.demand_bound_blocks == 6
    # AND no remedy is said to fit (the pool of 7 was [fits]): each that would is unknown, saying why
    assert [r.fits for r in d.remedies if r.fits is not False] and not [r for r in d.remedies if r.fits]
    assert "1 request(s) aborted before they were scheduled are counted at their prompts only" in (
        d.remedies[0].sentence
    )


def test_preemptions_counted_from_steps_without_a_request_log(tmp_path: Path) -> None:
    run = read_engine(write_engine_run(tmp_path / "run", requests=[]))
    assert run is not None
    fig = engine_figures(run)
    assert fig.preemptions == 1 and fig.first_preemption_step == 4 and fig.preempted_tokens == 0


def test_the_pool_at_the_first_preemption(tmp_path: Path) -> None:
    run = read_engine(write_engine_run(tmp_path / "run"))
    assert run is not None
    held = held_at(run, 4)
    # A: 2 blocks since its prefill of 6 tokens, then decode steps 2 and 3 wrote 2 more: 8 tokens at the
    # start of step 4 (its next event logs 9 after step 4); B: the 2 blocks and 7 tokens it lost.
    rows = [(h.request_id, h.blocks, h.tokens, h.output_tokens, h.as_of_step) for h in held]
    assert rows == [("A", 2, 8, 3, 4), ("B", 2, 7, 3, 4)]
    # at step 2 both were logged after step 1, the step just before: exact as the step began
    rows = [(h.request_id, h.blocks, h.tokens, h.output_tokens, h.as_of_step) for h in held_at(run, 2)]
    assert rows == [("A", 2, 6, 1, 2), ("B", 2, 5, 1, 2)]


def test_tokens_stay_as_logged_without_a_later_event(tmp_path: Path) -> None:
    # A's only event is its prefill: nothing later tells how far it decoded
    requests = [r for r in REQUESTS if r["request_id"] != "A" or r["event"] == "scheduled"]
    run = read_engine(write_engine_run(tmp_path / "run", requests=requests))
    assert run is not None
    rows = [(h.request_id, h.tokens, h.as_of_step) for h in held_at(run, 4)]
    assert rows == [("A", 6, 1), ("B", 7, 4)]


def test_preemption_diagnosis_by_hand(tmp_path: Path) -> None:
    run = read_engine(write_engine_run(tmp_path / "run"))
    assert run is not None
    d = diagnose_preemptions(run)
    assert d.usable_blocks == 4  # 5 less the null block
    # A: prompt 6 + 4 output - 1 = 9 tokens = 3 blocks of 4; B: 5 + 4 - 1 = 8 tokens = 2 blocks, the 8 its
    # "resumed" event holds in its 2 blocks (was 3: that event read at prompt + output = 9 tokens)
    assert d.final_demand_blocks == {"A": 3, "B": 2}
    assert d.demand_bound_blocks == 5 and d.blocks_needed == 6
    assert d.kv_cache_memory_bytes_needed == 6 * 128 and d.extra_blocks == 1 and d.extra_bytes == 128
    # on the recorded schedule: step 4 has A at 10 tokens (3 blocks) and B at 8 tokens (2 blocks)
    assert (d.recorded_peak_demand_blocks, d.recorded_peak_demand_step) == (5, 4)
    assert d.max_num_seqs_without_preemption == 1  # 3 + 2 > 4 usable
    assert d.fp8_blocks == 10  # bf16 -> fp8: twice the blocks in the same 640 B
    knobs = {r.knob: (r.setting, r.fits) for r in d.remedies}
    # more GPUs: 2 ranks replicate the 1 KV head (a block stays 128 B, 5 in 640 B: 4 usable < 5); 2 stages
    # hold 1 layer each (64 B a block, 10 in 640 B: 9 usable >= 5)
    assert knobs == {
        "kv_cache_memory_bytes": (768, True),
        "max_num_seqs": (1, True),
        "kv_cache_dtype": ("fp8", True),
        "tensor_parallel_size": (None, False),
        "pipeline_parallel_size": (2, True),
    }
    text = vllm_diagnosis_to_text(d)
    assert "preempted 1 time" in text and "request A" in text and "768 B" in text
    assert json.loads(json.dumps(vllm_diagnosis_to_json(d)))["kind"] == "preemption"
    assert diagnose_engine(run) is not None


def test_fp8_short_of_the_recorded_demand_too_likely_still_preempts(tmp_path: Path) -> None:
    # GIVEN the hand-made run with a third request C (prompt 5), all three admitted at step 1: B and C were
    # preempted at step 4 and resumed at 16 tokens (4 blocks) in step 5, where A (9 tokens, 3 blocks) ends
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["config"]["max_num_seqs"] = 3
    steps = [{**STEPS[0], "running": 3}, *STEPS[1:]]
    requests = [
        _req(1, "A", "scheduled", 2, 6, 6, 1),
        _req(1, "B", "scheduled", 1, 4, 5, 0),
        _req(1, "C", "scheduled", 1, 4, 5, 0),
        _req(4, "B", "preempted", 0, 0, 5, 3, dropped_blocks=2, dropped_tokens=7),
        _req(4, "C", "preempted", 0, 0, 5, 3, dropped_blocks=2, dropped_tokens=7),
        _req(4, "A", "blocks", 3, 9, 6, 4),
        _req(5, "A", "finished", 0, 9, 6, 4),
        _req(5, "B", "resumed", 4, 16, 5, 11, recomputed_tokens=16),
        _req(5, "C", "resumed", 4, 16, 5, 11, recomputed_tokens=16),
        _req(6, "B", "finished", 0, 16, 5, 11),
        _req(6, "C", "finished", 0, 16, 5, 11),
    ]
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine, steps=steps, requests=requests))
    assert run is not None
    d = diagnose_preemptions(run)
    # A: 6 + 4 - 1 = 9 tokens, 3 blocks of 4; B and C: 5 + 11 - 1 = 15 tokens, 4 blocks: 11 together
    assert d.final_demand_blocks == {"A": 3, "B": 4, "C": 4} and d.demand_bound_blocks == 11
    # at step 5 the three are in flight: 3 + 4 + 4 blocks, beyond fp8's 10 blocks (9 usable)
    assert (d.recorded_peak_demand_blocks, d.recorded_peak_demand_step) == (11, 5)
    (fp8,) = [r for r in d.remedies if r.knob == "kv_cache_dtype"]
    # THEN short of the run's own demand too: refused, said likely (the demand is this run's schedule's)
    assert (d.fp8_blocks, fp8.fits) == (10, False)
    assert "short of the 11 blocks this run's requests needed together" in fp8.sentence
    assert "likely still preempts" in fp8.sentence


def test_a_run_without_preemption_has_no_engine_diagnosis(tmp_path: Path) -> None:
    steps = [{**s, "preempted": []} for s in STEPS]
    requests = [r for r in REQUESTS if r["event"] != "preempted"]
    run = read_engine(write_engine_run(tmp_path / "run", steps=steps, requests=requests))
    assert run is not None and diagnose_engine(run) is None


def test_cut_last_line_is_dropped(tmp_path: Path) -> None:
    folder = write_engine_run(tmp_path / "run")
    with (folder / "engine_steps.jsonl").open("a") as f:
        f.write('{"step": 6, "t_ns": 6')
    run = read_engine(folder)
    assert run is not None and len(run.steps) == 5


@pytest.mark.parametrize(
    ("file", "content", "needle"),
    [
        ("engine.json", "{not json", "not valid JSON"),
        ("engine.json", "[1, 2]", "expected a JSON object"),
        ("engine.json", json.dumps({**ENGINE_JSON, "num_blocks": "many"}), "num_blocks"),
        ("engine_steps.jsonl", '{"step": 1}\nnot json\n{"step": 3}\n', "line 2"),
        ("engine_steps.jsonl", '{"step": 1, "preempted": "B"}\n', "preempted"),
        ("engine_steps.jsonl", '{"step": 1, "blocks_used_in_step": 9}\n', "9 blocks used of a pool of 5"),
        ("engine_requests.jsonl", '{"request_id": "A", "event": "exploded"}\n', "unknown request event"),
        (
            "engine_requests.jsonl",
            '{"request_id": "A", "event": "scheduled", "cached_tokens": "96"}\n',
            "cached_tokens",
        ),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, file: str, content: str, needle: str) -> None:
    folder = write_engine_run(tmp_path / "run")
    (folder / file).write_text(content)
    with pytest.raises(KvtraceError) as err:
        read_engine(folder)
    message = str(err.value)
    assert file in message and needle in message and "\n" not in message


@pytest.mark.parametrize(
    ("prefix_stats", "caching", "queries", "known"),
    [
        (None, True, 0, False),  # recorded before kvtrace counted hits: vLLM's stats were off, nobody counted
        (None, True, 6, True),  # the same version with vLLM's stats on: its steps queried
        (None, False, 0, True),  # prefix caching off: no lookup, 0 hits is the truth
        ("kvtrace", True, 0, True),  # who counted is said: the steps' figures are taken as logged
    ],
)
def test_a_run_recorded_before_prefix_stats_reads_its_uncounted_hits_as_unknown(
    tmp_path: Path, prefix_stats: str | None, caching: bool, queries: int, known: bool
) -> None:
    engine = {k: v for k, v in ENGINE_JSON.items() if k != "prefix_stats"}
    engine["config"] = {**ENGINE_JSON["config"], "enable_prefix_caching": caching}
    if prefix_stats is not None:
        engine["prefix_stats"] = prefix_stats
    steps = [dict(s, prefix_queries=queries if s["step"] == 1 else 0) for s in STEPS]
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine, steps=steps))
    assert run is not None and any(e.event == "scheduled" for e in run.requests)
    assert run.steps.prefix_known is known
    assert (engine_figures(run).prefix_hit_tokens is None) is not known
