"""A vLLM `LLM` that starts fine inside `kvtrace.record(dir)` with no model: the block follows no engine
(docs/vllm.md, "Limits"), and the run says so rather than read as one that held no KV."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.run_reader import read_run


def test_an_engine_started_inside_a_block_without_a_model_is_said_unrecorded(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import vllm

    import kvtrace
    from kvtrace.cli import main
    from tests.vllm.workload import make_llm, prompts, sampling

    # GIVEN an in-process LLM built and generating inside record(dir), no model= given
    run_dir = tmp_path / "unfollowed"
    original = vllm.LLM.__dict__["__init__"]
    with kvtrace.record(run_dir, profiler=False):
        llm = make_llm(tiny_model_dir)
        llm.generate(prompts(), sampling())
    llm.llm_engine.engine_core.shutdown()
    # THEN nothing of the engine is in the run, vLLM's LLM is its own again, and the manifest notes the start
    assert vllm.LLM.__dict__["__init__"] is original
    assert not any((run_dir / name).exists() for name in fmt.ENGINE_FILES)
    notes = read_run(run_dir).manifest["notes"]
    said = "a vLLM LLM started in the block, which record(dir) without model= does not follow"
    assert [n for n in notes if n.startswith("vLLM engine not recorded: ")] == [
        f"vLLM engine not recorded: {said} (it records a refused start only)"
    ]
    # WHEN reported
    assert main(["report", str(run_dir), "--no-export"]) == 0
    text = capsys.readouterr().out
    # THEN its "KV 0 B" comes with why: the engine was not followed, and how to follow it (it read as a run
    # without model= whose weights were left out, nothing said of the engine)
    (note,) = [line for line in text.splitlines() if said in line]
    assert "the engine's pool, weights and steps are not in this run" in note
    assert "model=llm" in note and "KVTRACE_DIR=DIR" in note
    assert "pass model= to kvtrace.record() to count them" not in text
