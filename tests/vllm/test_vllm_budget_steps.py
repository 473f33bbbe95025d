"""A memory budget against real vLLM runs: a crossing inside an engine step is placed in that step, as the
profiler's own trace places it, not at the engine's start; and the preemption remedy priced within a budget
avoids every preemption when vLLM reruns the workload with it.

A real in-process vLLM run recorded with the profiler on. The expected crossing comes from the trace itself,
replayed here: its `[memory]` events in time order on top of what vLLM held before the trace began (its
weights and its pool, from engine.json), and its `kvtrace/engine step N` ranges; never from the code under
test."""

from __future__ import annotations

import gzip
import html
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

import kvtrace
from kvtrace import format as fmt
from kvtrace.cli import main
from kvtrace.run_reader import read_run
from tests.vllm.workload import make_llm, metric, prompts, run_workload, sampling

ENGINE_STEP = "kvtrace/engine step "
PREEMPT = Path(__file__).resolve().parents[2] / "sample_traces" / "vllm_preempt"  # this workload's run


def _trace_events(run_dir: Path) -> list[dict[str, Any]]:
    (trace,) = read_run(run_dir).profiler_traces()
    raw = trace.read_bytes()
    return list(json.loads(gzip.decompress(raw) if trace.suffix == ".gz" else raw)["traceEvents"])


def _first_new_peak_in_a_step(run_dir: Path) -> dict[str, int]:
    """Replays the trace: the first allocation inside an engine step that takes the device above every level
    before it, with that level (the budget it is the first to cross) and the step whose range holds it."""
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    # allocated before the trace: the weights, vLLM's own buffers (rotary cache, ...) and the pool
    profile = engine["memory_profile"]
    held = profile["weights_bytes"] + (profile.get("buffers_bytes") or 0) + engine["kv_cache_bytes"]
    events = _trace_events(run_dir)
    steps = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith(ENGINE_STEP)]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: float(e["ts"]))
    # ... and whatever else the process held that the trace frees before it allocates more (a tensor of an
    # earlier test collected while recording): the least that keeps the running sum from going below 0, as
    # docs/format.md says a trace without trusted totals is read
    running = lowest = 0
    for event in memory:
        running += int(event["args"]["Bytes"])
        lowest = min(lowest, running)
    level = highest = held - lowest
    for event in memory:
        size = int(event["args"]["Bytes"])
        ts = float(event["ts"])
        inside = [s for s in steps if float(s["ts"]) <= ts <= float(s["ts"]) + float(s["dur"])]
        if size > 0 and level + size > highest and inside:
            (step,) = inside
            return {
                "budget": highest,
                "step": int(step["name"][len(ENGINE_STEP) :]),
                "request": size,
                "before": level,
            }
        level += size
        highest = max(highest, level)
    raise AssertionError("no allocation inside an engine step raised the device to a new level")


@pytest.fixture(scope="module")
def profiled(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    llm = make_llm(tiny_model_dir)
    run_dir = tmp_path_factory.mktemp("vllm-budget") / "run"
    with kvtrace.record(run_dir, model=llm, profiler=True):
        llm.generate(prompts(4, 40), sampling(4), use_tqdm=False)
    return run_dir


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_budget_crossed_inside_an_engine_step_is_placed_in_that_step(
    profiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a budget that an allocation inside engine step N is the first to cross, by the trace's own events
    expected = _first_new_peak_in_a_step(profiled)
    assert expected["step"] >= 1 and expected["before"] <= expected["budget"]
    # the most bytes that allocation crosses: every level before it is at most `budget`, below this
    budget = expected["before"] + expected["request"] - 1
    assert budget >= expected["budget"]

    # WHEN diagnosed against it THEN the crossing is that allocation, in step N, not before the first step
    said = _json(["diagnose", str(profiled), "--budget", f"{budget}B"], capsys)["budget"]
    assert said["crossed"] and said["crossed_by"] == "allocation", (expected, said)
    assert (said["step"], said["request_bytes"], said["allocated_before_bytes"]) == (
        expected["step"],
        expected["request"],
        expected["before"],
    )
    capsys.readouterr()
    assert main(["diagnose", str(profiled), "--budget", f"{budget}B"]) == 0
    assert f"allocation at step {expected['step']} on top of" in capsys.readouterr().out

    # AND recorded with that budget (record(gpu_memory=...): the manifest's option), the report says so
    run = tmp_path / "run"
    shutil.copytree(profiled, run)
    manifest = json.loads((run / fmt.MANIFEST).read_text())
    manifest["options"]["gpu_memory"] = budget
    (run / fmt.MANIFEST).write_text(json.dumps(manifest))
    crossing = _json(["report", str(run), "--no-export", "-q"], capsys)["budget"]
    assert crossing["crossed"] and not crossing["before_first_step"]
    assert (crossing["step"], crossing["request_bytes"]) == (expected["step"], expected["request"])
    # the KV log's only layers are the pool's, logged at the engine's start: no forward's layer to name
    assert crossing["layer"] is None


def _page_text(section_html: str) -> str:
    """A page section's words as a reader sees them: tags dropped, entities read, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", section_html)).split())


def test_the_page_of_a_run_over_its_recorded_budget_says_what_diagnose_says(
    profiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the profiled run, recorded with a budget that an allocation inside engine step N is the first to
    # cross, by the trace's own events (record(gpu_memory=...): the manifest's option)
    expected = _first_new_peak_in_a_step(profiled)
    budget = expected["before"] + expected["request"] - 1
    run = tmp_path / "run"
    shutil.copytree(profiled, run)
    manifest = json.loads((run / fmt.MANIFEST).read_text())
    manifest["options"]["gpu_memory"] = budget
    (run / fmt.MANIFEST).write_text(json.dumps(manifest))
    # WHEN diagnosed, and its HTML report written
    capsys.readouterr()
    assert main(["diagnose", str(run)]) == 0
    said = capsys.readouterr().out.splitlines()
    page = tmp_path / "report.html"
    assert main(["report", str(run), "-o", str(page), "--no-export", "-q"]) == 0
    sections = re.findall(r"<section class='diagnosis'.*?</section>", page.read_text(), flags=re.S)
    shown = _page_text("".join(sections))
    # THEN diagnose heads with the budget vLLM crossed at that step, then vLLM's own diagnosis
    assert f"allocation at step {expected['step']} on top of" in said[0] and "vLLM" in said[0]
    # AND the page says every line of it, in the same words: no generic diagnosis that contradicts it
    for line in said:
        words = " ".join(line.removeprefix(f"kvtrace diagnose: {run}: ").split())
        assert words.removeprefix("note: ") in shown, words
    assert "Remedies, ranked" not in shown and "no OOM recorded" not in shown  # the generic diagnosis'


def test_the_pool_priced_within_a_budget_avoids_every_preemption(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not PREEMPT.is_dir():
        pytest.skip("sample_traces/vllm_preempt not generated yet")
    # GIVEN the sample run of this workload, and a budget one block short of its weights and pool
    engine = json.loads((PREEMPT / fmt.ENGINE).read_text())
    weights, pool, per_block = (
        engine["memory_profile"]["weights_bytes"],
        engine["kv_cache_bytes"],
        engine["bytes_per_block"],
    )
    weights += engine["memory_profile"].get("buffers_bytes") or 0  # vLLM's own, held beside the weights
    budget = weights + pool - per_block
    # WHEN diagnosed against it
    said = _json(["diagnose", str(PREEMPT), "--budget", f"{budget}B"], capsys)
    (both,) = [r for r in said["remedies"] if r["knob"] == "kv_cache_memory_bytes+max_num_seqs"]
    setting = both["setting"]
    assert both["fits"] and weights + setting["kv_cache_memory_bytes"] <= budget
    # THEN vLLM, rerun with the pool and max_num_seqs it names, preempts nothing
    llm = make_llm(tiny_model_dir, **setting)
    assert (
        llm.llm_engine.vllm_config.cache_config.num_gpu_blocks * per_block == setting["kv_cache_memory_bytes"]
    )
    run_workload(llm)
    assert metric(llm, "vllm:num_preemptions") == 0
