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
