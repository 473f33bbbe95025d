"""`kvtrace report`'s weights at the peak where the input cannot tell weights apart: a bare snapshot whose
stacks name no weight loading says "-" (counted in other), as the KV line does, not "0 B", which read as
measured beside 15.69 GiB of other; a run with a weights table keeps its figure."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

from analyzers.units import human_bytes
from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
SNAPSHOT = SAMPLES / "h200" / "oom_b266" / "snapshots" / "oom.pickle"
RUN = SAMPLES / "dynamic_b2"


def _report(*argv: str) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", *argv, "--no-export"]) == 0
    return out.getvalue()


def test_a_bare_snapshot_names_no_weights_figure() -> None:
    # GIVEN a CUDA snapshot taken after the weights were loaded, whose stacks attribute no block to them
    figures = json.loads(_report(str(SNAPSHOT), "--json"))
    (device,) = figures["devices"]
    assert device["categories_at_peak"]["weights"] == 0

    # WHEN it is reported as text THEN its weights line says they were not told apart, as the KV line does
    text = _report(str(SNAPSHOT))
    assert "    at peak  weights             -  (not attributed: counted in other)\n" in text
    assert "weights           0 B" not in text


def test_a_run_keeps_its_weights_figure() -> None:
    # GIVEN a run with its weights table WHEN reported THEN its weights line is the table's bytes at the peak
    figures = json.loads(_report(str(RUN), "--json"))
    weights = figures["devices"][0]["categories_at_peak"]["weights"]
    assert weights > 0
    assert f"    at peak  weights  {human_bytes(weights):>12}  " in _report(str(RUN))


def test_a_vllm_run_says_its_weights_were_loaded_before_the_trace() -> None:
    # GIVEN a vLLM run, whose weights the engine loaded before the trace began (engine.json has them)
    text = _report(str(SAMPLES / "vllm_preempt"))
    # THEN its weights line points to the note that gives them, instead of "0 B"
    assert "were loaded before the trace began: the device figures leave them out" in text
    assert (
        "    at peak  weights             -  "
        "(loaded before the trace: left out of these figures, see the note)\n" in text
    )


def test_a_run_without_its_weights_table_says_they_are_not_in_its_figures(tmp_path: Path) -> None:
    # GIVEN a run copied without weights.jsonl: its figures leave the weights out, as its note says
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    (run / "weights.jsonl").unlink()
    text = _report(str(run))
    # THEN its weights line sends the reader to those notes, not to "other", which does not hold them
    assert "    at peak  weights             -  (not in these figures: see the notes)\n" in text


def test_the_page_says_what_the_text_says_of_untold_weights(tmp_path: Path) -> None:
    # GIVEN the bare snapshot WHEN its page is written THEN its summary's weights row is the text's "-"
    page = tmp_path / "snapshot.html"
    assert main(["report", str(SNAPSHOT), "--no-export", "-q", "-o", str(page)]) == 0
    html = page.read_text()
    assert "weights at peak</th><td>- (not attributed: counted in other)</td>" in html
