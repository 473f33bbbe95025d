"""The README's examples run as written: the Python snippet on a tiny model, and the main command."""

from __future__ import annotations

import io
import json
import os
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import tiny_size

README = Path(__file__).resolve().parents[2] / "README.md"


def test_python_snippet_records_a_readable_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert snippet is not None
    monkeypatch.chdir(tmp_path)
    model = build_model(tiny_size(2))
    ids = torch.randint(3, 1000, (2, 8))
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pad_token_id": 0,
        "min_new_tokens": 256,
    }
    exec(snippet.group(1), {"model": model, "inputs": inputs})  # the README's code, verbatim
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", "runs/x", "--json", "-q", "--no-export"]) == 0
    data = json.loads(out.getvalue())
    # 256 new tokens, the last never fed back: 8 + 255 tokens held, 2 rows, 2 layers, K and V, float32
    assert data["kv"]["final_bytes"] == 2 * 2 * 2 * 16 * (8 + 255) * 2 * 4


def test_main_command_runs_the_demo(tmp_path: Path) -> None:
    commands = re.findall(r"^pip install .*&& (kvtrace demo.*)$", README.read_text(), re.M)
    assert commands == ["kvtrace demo"]
    out = io.StringIO()
    with redirect_stdout(out):
        status = main(["demo", "--out", os.fspath(tmp_path / "demo"), "--new-tokens", "4", "--no-profiler"])
    assert status == 0
    text = out.getvalue()
    assert "KV cache (kv_log)" in text
    assert (tmp_path / "demo" / "timeline.html").stat().st_size > 1_000_000


def test_the_readmes_peak_query_equals_the_reports_peak(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the README's peak query, and the real snapshots (traces that begin with frees, or have no events)
    # and this repo's sample runs, exported
    query = re.search(r'kvtrace query tables/ --json "(SELECT d\.run_id.*?)"\n', README.read_text(), re.S)
    assert query is not None
    real = README.parent.parent / "shared" / "real_traces" / "snapshots"
    samples = README.parent / "sample_traces"
    inputs = [*sorted(real.glob("*.pickle")), samples / "dynamic_b2", samples / "static_b2"]
    inputs = [p for p in inputs if p.exists()]
    assert main(["export", *map(str, inputs), "-o", str(tmp_path / "tables"), "-q"]) == 0
    capsys.readouterr()
    # WHEN it runs, THEN every device's peak is the report's
    assert main(["query", str(tmp_path / "tables"), "--json", query.group(1)]) == 0
    peaks = {(row["run_id"], row["device"]): row["peak"] for row in json.loads(capsys.readouterr().out)}
    checked = 0
    for path in inputs:
        assert main(["report", str(path), "--json", "--no-export"]) == 0
        for device in json.loads(capsys.readouterr().out)["devices"]:
            assert peaks[(str(path), device["device"])] == device["peak_allocated_bytes"], (path, device)
            checked += 1
    assert checked == len(peaks) >= 2
