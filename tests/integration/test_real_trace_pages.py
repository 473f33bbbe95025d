"""The pages drawn from the real GPU files in shared/real_traces: memory levels drawn as steps (held until
the next event, as torch's memory_viz draws them), and `kvtrace compare` of traces and snapshots giving the
figures `report` gives of each, with their allocated memory over time instead of an empty KV chart.

The expected figures come from the raw pickle (a restricted unpickler of the test's own) or from each
input's own `kvtrace report --json`, never from the page under test."""

from __future__ import annotations

import io
import itertools
import pickle
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from analyzers.report import build_report
from analyzers.units import human_bytes
from kvtrace.cli import main
from tests.cli_json import cli_json
from tests.plotly_figures import page_figure

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces"
SPARSE_SNAPSHOT = REAL / "snapshots" / "mem_snapshot.pickle"
COMPARED = [
    REAL / "snapshots" / "memory_snapshot.pickle",
    REAL / "chrome" / "worker0.1623143089861.pt.trace.json.gz",
    REAL / "chrome" / "memory_timeline.raw.gz",
]
UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
LEVELS = ("weights", "kv", "other", "allocated", "reserved")
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real traces folder {REAL} is absent")


class _PlainUnpickler(pickle.Unpickler):
    """The test's own guard: the real pickles hold builtin types only."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _first_big_alloc(path: Path, at_least: int) -> tuple[float, int, int, float]:
    """(seconds from the trace's first allocator event to its first allocation of `at_least` bytes or more,
    that allocation's bytes, the bytes allocated just before it, seconds from the first event to the event
    before it), by hand from the pickle's device trace (its segment_alloc lines are the allocator's
    reservations, not allocations)."""
    data = _PlainUnpickler(io.BytesIO(path.read_bytes())).load()
    (trace,) = [t for t in data["device_traces"] if t]
    events = [e for e in trace if e["action"] in ("alloc", "free_completed")]
    live: dict[int, int] = {}
    level = 0
    t0 = events[0]["time_us"]
    before_t = t0
    for event in events:
        if event["action"] == "alloc" and event["size"] >= at_least:
            return (event["time_us"] - t0) / 1e6, event["size"], level, (before_t - t0) / 1e6
        if event["action"] == "alloc":
            live[event["addr"]] = event["size"]
            level += event["size"]
        else:
            level -= live.pop(event["addr"])
        before_t = event["time_us"]
    raise AssertionError(f"no allocation of {at_least} bytes in {path}")


def _level_at(x: list[float], y: list[float], t: float) -> float:
    """What a step line ("hv") draws at `t`: the value of the last point at or before it."""
    return y[int(np.searchsorted(np.asarray(x), t, side="right")) - 1]


@pytest.mark.skipif(not SPARSE_SNAPSHOT.is_file(), reason=f"{SPARSE_SNAPSHOT} is absent")
def test_the_timeline_holds_each_level_until_the_next_event(tmp_path: Path) -> None:
    # GIVEN a real snapshot (torch 2.6, on a GPU) that holds a few MiB for 0.8 s, then allocates 512 MiB
    at, size, before, before_at = _first_big_alloc(SPARSE_SNAPSHOT, 256 * 2**20)
    assert (size, before) == (512 * 2**20, 6 * 2**20) and at - before_at > 0.5
    # WHEN `kvtrace report` draws it
    page = tmp_path / "m.html"
    assert main(["report", str(SPARSE_SNAPSHOT), "-o", str(page), "-q"]) == 0
    traces, layout = page_figure(page.read_text(encoding="utf-8"), "kvtrace-timeline")
    # THEN every memory level (each category's stacked area, allocated, reserved) is drawn as steps
    levels = [t for t in traces if t.get("name") in LEVELS]
    assert sorted(t["name"] for t in levels) == sorted(LEVELS)
    assert {t["name"]: t["line"].get("shape") for t in levels} == dict.fromkeys(LEVELS, "hv")
    # AND the allocated line holds 6 MiB from the event before the alloc right up to it, then rises at once:
    # no slope across the 0.8 s that would draw growth that never happened
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    (allocated,) = [t for t in levels if t["name"] == "allocated"]
    x, y = allocated["x"], [v * factor for v in allocated["y"]]
    i = x.index(pytest.approx(at, abs=1e-9))
    assert x[i - 1] == pytest.approx(before_at, abs=1e-9)
    assert y[i - 1] == before and y[i] == before + size
    for t in np.linspace(before_at, at, 50, endpoint=False):
        assert _level_at(x, y, float(t)) == before
    assert _level_at(x, y, at) == before + size


def _main_device(report: dict[str, Any]) -> dict[str, Any]:
    """The report's device with the highest peak: the one compare's figures are of."""
    return max(report["devices"], key=lambda d: d["peak_allocated_bytes"])


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """`kvtrace compare` of the three real inputs: (its text table, its page)."""
    for path in COMPARED:
        if not path.is_file():
            pytest.skip(f"{path} is absent")
    page = tmp_path_factory.mktemp("compare") / "cmp.html"
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["compare", *map(str, COMPARED), "-o", str(page), "-q"]) == 0
    return out.getvalue(), page.read_text(encoding="utf-8")


def test_compare_of_traces_and_snapshots_gives_the_figures_report_gives(
    compared: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN each input's own report (its device with the highest peak, as compare's "peak allocated")
    mains = [_main_device(cli_json(["report", str(p), "--json", "-q"], capsys)) for p in COMPARED]
    expected = {
        "peak allocated": [d["peak_allocated_bytes"] for d in mains],
        "final allocated": [d["final_allocated_bytes"] for d in mains],
        "weights at the peak": [d["categories_at_peak"]["weights"] for d in mains],
        "other at the peak": [d["categories_at_peak"]["other"] for d in mains],
        "reserved at the peak": [d["reserved_at_peak_bytes"] for d in mains],
    }
    # the real files give figures of every kind: a snapshot's reserved bytes, a memory timeline's weights
    assert expected["reserved at the peak"][0] is not None and expected["weights at the peak"][2] > 0
    # WHEN compared: THEN the text table has a row per figure, each cell the report's ("-" only where the
    # report has none: the two traces' memory events carry no reserved bytes)
    table, page = compared
    rows = {
        cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line.strip()) for line in table.splitlines())
    }
    for name, figures in expected.items():
        assert rows[name] == [human_bytes(v) for v in figures], name
    assert rows["reserved at the peak"][1:] == ["-", "-"]
    # AND the JSON has them too
    runs = cli_json(["compare", *map(str, COMPARED), "--json", "-q"], capsys)["runs"]
    keys = {
        "peak allocated": "peak_bytes",
        "final allocated": "final_allocated_bytes",
        "weights at the peak": "weights_at_peak_bytes",
        "other at the peak": "other_at_peak_bytes",
        "reserved at the peak": "reserved_at_peak_bytes",
    }
    for name, key in keys.items():
        assert [run[key] for run in runs] == expected[name], key
    assert [run["source_kind"] for run in runs] == ["snapshot", "chrome_trace", "memory_timeline"]
    # AND the page's table has the same cells
    for name, figures in expected.items():
        cells = "".join(f"<td>{human_bytes(v)}</td>" for v in figures)
        assert f"<tr><th>{name}</th>{cells}</tr>" in page


def test_compare_of_inputs_without_kv_steps_draws_their_allocated_memory_not_an_empty_kv_chart(
    compared: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN three real inputs, none with KV steps
    _, page = compared
    # THEN the page has no KV-per-step chart (it was an empty axis, -1 to 4 B), and says why
    assert 'kvtrace-compare"' not in page and "KV bytes held at the end of each step" not in page
    assert "No chart of KV bytes per step: none of these inputs has KV steps" in page
    # AND it overlays each input's allocated memory, drawn as steps from its own first event, each reaching
    # its report's peak exactly
    traces, layout = page_figure(page, "kvtrace-compare-allocated")
    mains = [_main_device(cli_json(["report", str(p), "--json", "-q"], capsys)) for p in COMPARED]
    assert [t["name"] for t in traces] == [
        f"{p.name} ({d['device']})" for p, d in zip(COMPARED, mains, strict=True)
    ]
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    for trace, device in zip(traces, mains, strict=True):
        assert trace["line"]["shape"] == "hv"
        assert trace["x"][0] == 0.0
        assert round(max(trace["y"]) * factor) == device["peak_allocated_bytes"]


@pytest.mark.skipif(not SPARSE_SNAPSHOT.is_file(), reason=f"{SPARSE_SNAPSHOT} is absent")
def test_the_notebook_sparkline_holds_each_level_until_the_next_event() -> None:
    # GIVEN the real snapshot whose few MiB are held 0.8 s before a 512 MiB allocation
    _, report = build_report(SPARSE_SNAPSHOT)
    # WHEN a notebook shows it (`Report._repr_html_`: a static SVG, no plotly)
    cell = report._repr_html_()
    lines = re.findall(r'<polyline [^>]*points="([^"]*)"', cell)
    assert len(lines) == 2  # allocated and KV
    # THEN each line is a staircase: every segment flat or upright, none a slope between two events
    for points in lines:
        xy = [tuple(map(float, pair.split(","))) for pair in points.split()]
        assert len(xy) > 3
        for (x0, y0), (x1, y1) in itertools.pairwise(xy):
            assert x0 == x1 or y0 == y1, ((x0, y0), (x1, y1))
