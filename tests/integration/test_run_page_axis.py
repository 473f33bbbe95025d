"""The page of a `kvtrace run`: CPU % is sampled from the script's start, memory traced from its model's
first generate() (where the model is found). The time axis starts at that generate(), not at the first CPU
sample, which left most of the memory chart empty before its data; the samples before it stay in the figure
(autoscale shows them) and the axis title says what is off its left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvtrace.cli import main
from tests.plotly_figures import page_figure

REPO_ROOT = Path(__file__).resolve().parents[2]
LOAD_S = 1.0  # the script's model loading, before its first generate()

SCRIPT = textwrap.dedent(
    f"""
    import time
    import torch
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    model = build_model(tiny_size(2, kv_heads=2))
    time.sleep({LOAD_S})
    ids = torch.randint(3, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0)
    """
)


def test_a_scripts_page_starts_its_time_axis_at_the_models_first_generate(tmp_path: Path) -> None:
    # GIVEN a script that loads its model for LOAD_S, then generates, recorded by `kvtrace run`
    (tmp_path / "user.py").write_text(SCRIPT, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "run", "-o", "run", "user.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    found = json.loads((run / "manifest.json").read_text())["model_found_ns"]
    lines = (run / "memory_samples.jsonl").read_text().splitlines()
    cpu = [s["t_ns"] for s in map(json.loads, lines) if "cpu_percent" in s]
    assert (found - cpu[0]) / 1e9 >= LOAD_S

    # WHEN its page is written
    page = tmp_path / "page.html"
    assert main(["report", str(run), "-o", str(page), "--no-export", "-q"]) == 0
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")

    # THEN the CPU % line keeps every sample, the first ones LOAD_S and more before the generate()
    (usage,) = [t for t in traces if t["name"] == "process CPU %"]
    assert len(usage["x"]) == len(cpu)
    # (its x are seconds from the first memory event: the samples' clock less that event's time)
    t0_ns = cpu[0] - usage["x"][0] * 1e9
    left = (found - t0_ns) / 1e9
    assert left - usage["x"][0] >= LOAD_S
    # AND every time axis starts at the generate() (the right end autoranged), with nothing traced before it
    time_axes = ["xaxis", "xaxis2", "xaxis4"]  # memory, KV bytes, CPU %; xaxis3 is the heatmap's steps
    for name in time_axes:
        axis = layout[name]
        assert axis["autorange"] == "max"
        # (to a microsecond: Unix nanoseconds are past float64's precision, 256 ns apart)
        assert axis["range"][0] == pytest.approx(left, abs=1e-6) and axis["range"][1] is None
    timed = [t for t in traces if t.get("xaxis") in ("x", "x2") and t["type"] == "scatter"]
    assert timed and all(min(t["x"]) >= left for t in timed)
    # AND the CPU axis' title says what is off its left
    lead = f"{(found - cpu[0]) / 1e9:.2f}"
    assert layout["xaxis4"]["title"]["text"] == (
        "seconds from first event; the axis starts at the model's first generate(): the "
        f"{lead} s of CPU % before it (imports, model loading, no memory traced) is off its left, "
        "autoscale shows it"
    )
