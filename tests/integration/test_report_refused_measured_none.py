"""A vLLM start refused for lack of KV memory made no pool: its KV log holds no KV entry, so the report's
KV figures were measured from nothing, and the text, the JSON and the HTML page all say so (`none`), with
no hint on how to attribute KV (a kvtrace run has the KV log; there was simply no KV)."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from analyzers.render.json import NO_KV_HINT
from kvtrace.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _out(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


@pytest.mark.parametrize("name", ["vllm_refused", "vllm_refused_override"])
def test_a_refused_start_measured_no_kv_in_every_output(name: str, tmp_path: Path) -> None:
    # GIVEN a real start vLLM refused: engine.json says so, and its KV log has no entry at all
    run = SAMPLES / name
    assert json.loads((run / "engine.json").read_text())["status"] == "refused_start"
    assert (run / "kv_events.jsonl").read_text() == ""

    # WHEN reported as JSON, text and HTML
    report: Any = json.loads(_out(["report", str(run), "--json", "-q", "--no-export"]))
    text = _out(["report", str(run), "-q", "--no-export"])
    page = tmp_path / "page.html"
    _out(["report", str(run), "-q", "--no-export", "-o", str(page)])

    # THEN all three say the KV was measured from nothing, and none offers a way to attribute it
    kv = report["kv"]
    assert (kv["measured_from"], kv["how_to_attribute"], kv["final_bytes"], kv["per_layer"]) == (
        "none",
        None,
        None,
        [],
    )
    assert (
        "  KV cache (none):\n    final -, peak - (not measured: no KV entry, the engine made no pool)\n"
        in text
    )
    assert "no KV attribution" not in text
    html = page.read_text()
    assert "<tr><th>measured from</th><td>none</td></tr>" in html
    assert NO_KV_HINT not in html and NO_KV_HINT not in text
