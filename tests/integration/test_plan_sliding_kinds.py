"""`kvtrace plan --cache sliding` is the cache `kvtrace demo --cache sliding` records: a DynamicCache whose
every layer slides (it holds the whole prompt until the first decode step), and `static_sliding` the
StaticCache whose every layer slides (its window allocated at the start). Before, plan's `sliding` priced
the static one: a recorded dynamic sliding run (2 layers, 4 rows, a 40-token prompt, a window of 8) peaked
at 1,068,152 B where `plan --cache sliding --window 8` said 1,002,616 (-6.1%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW, WINDOW = 2, 2, 4, 40, 6, 8
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32
KINDS = ("dynamic", "sliding", "static_sliding")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same generate() recorded with each of kvtrace demo's cache kinds, as demo builds them."""
    model = build_model(tiny_size(LAYERS, KV_HEADS)).eval()
    folder = tmp_path_factory.mktemp("sliding_kinds")
    found = {}
    for kind in KINDS:
        record_generate(model, folder / kind, BATCH, PROMPT, NEW, cache=kind, window=WINDOW)
        found[kind] = folder / kind
    return found


def test_plan_names_the_sliding_caches_as_demo_records_them(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN each run's measured peak
    measured = {kind: report_json(runs[kind], capsys)["peak_allocated_bytes"] for kind in KINDS}
    # WHEN each sliding run is planned from itself
    for kind in ("sliding", "static_sliding"):
        plan = plan_json(runs[kind], capsys)
        # THEN the plan keeps the run's cache kind, as demo named it, and its window, and peaks where it did
        assert (plan["request"]["cache"], plan["request"]["window"]) == (kind, WINDOW)
        assert plan["peak_bytes"] == measured[kind]
    # AND the dynamic one holds the whole prompt after its prefill, the static one its window from the start
    sliding = plan_json(runs["sliding"], capsys)
    assert sliding["kv_prefill_bytes"] == TOKEN_ROW * BATCH * PROMPT
    assert sliding["kv_preallocated_bytes"] == 0
    static = plan_json(runs["static_sliding"], capsys)
    assert static["kv_prefill_bytes"] == static["kv_preallocated_bytes"] == TOKEN_ROW * BATCH * WINDOW


@pytest.mark.parametrize("source", ["dynamic", "static_sliding"])
@pytest.mark.parametrize("kind", ["sliding", "static_sliding"])
def test_a_sliding_cache_planned_from_another_run_bounds_its_recording(
    runs: dict[str, Path], source: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run on another cache, and the recording of the sliding cache asked for
    measured = report_json(runs[kind], capsys)["peak_allocated_bytes"]
    # WHEN that cache is planned from the run by demo's name for it
    plan = plan_json(runs[source], capsys, "--cache", kind, "--window", str(WINDOW))
    # THEN the plan is at least the recording, and within a few percent of it
    assert measured <= plan["peak_bytes"] <= measured * 1.03, (source, kind)
