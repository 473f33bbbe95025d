"""The KV Cache tab's chart helpers (analyzers/tb_plugin/static/charts.js), run under node: binary-unit
ticks, a constant heatmap drawn in one colour, whole step numbers on the heatmap's axis, and "same y scale"
covering the KV chart too."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

CHARTS = Path(__file__).resolve().parents[2] / "analyzers" / "tb_plugin" / "static" / "charts.js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def _run(expression: str) -> Any:
    code = f"import * as charts from {json.dumps(CHARTS.as_uri())};\n"
    code += f"console.log(JSON.stringify({expression}));"
    done = subprocess.run(
        [NODE or "node", "--input-type=module", "-e", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_human_bytes_rounds_like_the_cli() -> None:
    from analyzers.units import human_bytes

    values = [0, 1023, 1024, 53_477_376, 110 * 2**20 + 12345, 5 * 2**30 + 1]
    assert _run(f"{values}.map(charts.humanBytes)") == [human_bytes(v) for v in values]


def test_a_tie_rounds_to_even_as_python_does() -> None:
    from analyzers.units import human_bytes

    # GIVEN the demo's KV peak, 46.625 MiB, which Python prints 46.62 and toFixed 46.63, and more ties
    values = [int(46.625 * 2**20), 1152, int(3.375 * 2**30), int(1.875 * 2**20), -5 * 2**19]
    # THEN the tab prints each as the CLI and the diagnosis box do
    shown = _run(f"{values}.map(charts.humanBytes)")
    assert shown == [human_bytes(v) for v in values] and shown[:2] == ["46.62 MiB", "1.12 KiB"]
    assert _run("charts.humanBytes(null)") == human_bytes(None) == "-"
    # AND plain numbers read as Python's f"{x:,.Nf}": separators, ties to even (1 and 2 places)
    numbers = [(65536, 1), (65536, 0), (1234567.25, 1), (0.75, 1), (2.5, 0), (-1234.5, 0), (999, 0)]
    numbers.append((2.675, 2))
    got = _run(f"{json.dumps(numbers)}.map(([v, d]) => charts.grouped(v, d))")
    assert got == [f"{v:,.{d}f}" for v, d in numbers]
    assert got[:2] == ["65,536.0", "65,536"]


def test_byte_axis_ticks_are_binary_units() -> None:
    # GIVEN a peak of 110 MiB WHEN the axis is built THEN ticks are round MiB values, labelled in MiB
    axis = _run(f"charts.bytesAxis({110 * 2**20})")
    assert axis["title"]["text"] == "memory (MiB)"
    assert axis["ticktext"][:3] == ["0 MiB", "25 MiB", "50 MiB"]
    assert axis["tickvals"][:3] == [0, 25 * 2**20, 50 * 2**20]
    assert axis["range"][1] >= 110 * 2**20 and "tickformat" not in axis


def test_constant_heatmap_is_one_colour_with_whole_step_labels() -> None:
    # GIVEN every layer holding 52,224 B at every step (a static cache)
    layers = {
        "steps": [1, 2, 3],
        "phases": ["prefill", "decode", "decode"],
        "layers": [0, 1],
        "kv_bytes": [[52_224] * 3, [52_224] * 3],
        "evictions": [],
        "steps_total": 3,
    }
    figure = _run(f"charts.heatmapFigure({json.dumps(layers)})")
    heat = figure["traces"][0]
    # THEN colours run from zero (one colour, not a gradient from 52.2235k to 52.2245k)
    assert heat["zmin"] == 0 and heat["zmax"] == 52_224
    assert all(t.endswith("KiB") or t.endswith(" B") for t in heat["colorbar"]["ticktext"])
    # and the step axis holds numbers (no "2 decod" cut off), the phase goes to the hover
    assert heat["x"] == [1, 2, 3] and heat["customdata"][0] == ["prefill", "decode", "decode"]
    assert heat["text"][0][0] == "51.00 KiB"
    layout = figure["layout"]
    assert layout["xaxis"]["automargin"] is True and layout["xaxis"]["type"] == "linear"


def test_the_step_axis_ticks_whole_steps_about_ten_at_most() -> None:
    # GIVEN runs whose steps span 0 (one step) to 999 steps WHEN the heatmap's tick spacing is chosen
    spans = [0, 1, 9, 10, 11, 15, 49, 50, 51, 999]
    # THEN it is a whole 1, 2 or 5 times a power of ten, never a fraction that would print a step twice
    assert _run(f"{spans}.map(charts.stepTick)") == [1, 1, 1, 1, 2, 2, 5, 5, 10, 100]


def test_same_scale_covers_the_kv_chart() -> None:
    panels = [{"top": 100 * 2**20, "kvTop": 2 * 2**20}, {"top": 60 * 2**20, "kvTop": 40 * 2**20}]
    axes = _run(f"charts.sharedAxes({json.dumps(panels)})")
    assert axes["timeline"]["yaxis.range"][1] >= 100 * 2**20
    assert axes["kv"]["yaxis.range"][1] >= 40 * 2**20 and axes["kv"]["yaxis.title.text"] == "KV (MiB)"


def test_kv_final_is_a_marker_on_the_kv_chart_as_the_page_draws_it() -> None:
    # GIVEN a timeline's kv_final, as the plugin serves it (analyzers.tb_plugin.timeline_payload)
    kv_final = {"t_s": 2.506502, "bytes": 71680, "label": "KV final (end of the last step): 70.00 KiB"}
    # THEN the KV chart gets one diamond there, in bytes (the chart's own unit), with the label as its hover
    trace = _run(f"charts.kvFinalTrace({json.dumps(kv_final)})")
    shown = (trace["name"], trace["x"], trace["y"], trace["text"])
    assert shown == ("KV final", [2.506502], [71680], [kv_final["label"]])
    assert trace["marker"]["symbol"] == "diamond" and trace["showlegend"] is False
    # AND a run without one (an engine's pool, no KV log) gets none
    assert _run("charts.kvFinalTrace(null)") is None


def test_both_time_charts_span_every_event_marker_and_the_kv_final_mark() -> None:
    # GIVEN a timeline whose first step began 0.766 s before its first memory event (a run without a profiler)
    timeline = {
        "devices": [{"t_s": [0.0, 1.5, 3.58898]}, {"t_s": []}],
        "markers": [{"t_s": -0.765961}, {"t_s": 3.553485}],
        "kv_final": {"t_s": 3.57465},
    }
    # THEN the span both charts share reaches from that step to the last event, 2% of it padded each side
    pad = (3.58898 + 0.765961) * 0.02
    assert _run(f"charts.timeSpan({json.dumps(timeline)})") == pytest.approx([-0.765961 - pad, 3.58898 + pad])
    # AND a run with nothing on its time axis leaves plotly its own range
    assert _run('charts.timeSpan({"devices": [], "markers": [], "kv_final": null})') is None
