"""A one-by-one eviction's KV figures stay exact under a trace clock set off by up to 5 ms either way, every
100 µs, whether kvtrace's step ranges or the KV log's storages put the trace back on the run's clock.

The hook (test_evictions' `keep_last`, one by one) frees each layer's full K and V a forward's attention
after the log saw them, and the next layer's projection outputs, of the same size, may take their
addresses within a ms. Without the step ranges, a trace set behind (its base early) was read as it was, each
sighting that much late: 2.2-2.4 ms behind, past the join's tolerance, a full K or V was taken for released
before its sighting and lost (12,288-16,896 B, not 18,944), 1-2.2 ms behind the next layer's projection
output was taken for a storage (21,248 B). 2.1-2.9 ms ahead, the storages seen at once fell out of the
join's fit while half the others fit as read (the trace not moved), and its lead was theirs (12,544-16,896
B). A forward as fast as an idle host's brings the next occupants within those ms: recorded on one thread.
How soon they come is the host's to say (a loaded one puts them tens of ms on, and the old join got every
lead right); tests/unit/test_join_lead_behind.py holds one such run's events.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_evictions import KEEP, KV_HEADS, ORDER_LAYERS, PROMPT, _record_prefill_with_hook

from analyzers.report import build_report
from tests.late_trace import late_copy, without_step_starts

BATCH, FP32 = 2, 4
ROW_BYTES = KV_HEADS * 16 * FP32 * BATCH  # one token of K or V over the rows (head_dim 16)
LEADS_US = range(-5000, 5001, 100)


@pytest.fixture(scope="module")
def fast_one_by_one_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-by-one hook's run, recorded on one thread (its forward as fast as on an idle host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _record_prefill_with_hook(tmp_path_factory.mktemp("fast"), ORDER_LAYERS, one_by_one=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("placed_by", ["step ranges", "storages"])
def test_the_kv_figures_are_exact_under_a_trace_clock_off_by_up_to_5_ms(
    fast_one_by_one_run: Path, tmp_path: Path, placed_by: str
) -> None:
    # GIVEN the run, and copies whose trace's clock runs ahead (base late) or behind (base early) by up to
    # 5 ms, every 100 µs; for "storages", without the samples' `started_ns` (a run recorded before them)
    run = fast_one_by_one_run
    if placed_by == "storages":
        run = without_step_starts(shutil.copytree(run, tmp_path / "unranged"))
    _, as_recorded = build_report(fast_one_by_one_run)

    # WHEN each is reported
    got = {}
    for lead_us in LEADS_US:
        copy = late_copy(run, tmp_path / f"lead{lead_us}", lead_us)
        _, report = build_report(copy)
        got[lead_us] = (
            int(report.timelines[0].by_category["kv"].max()),
            report.devices[0].categories_at_peak,
        )
        shutil.rmtree(copy)

    # THEN the KV line's peak is the true one at every lead: 2 compressed layers' K and V copies (KEEP
    # tokens), the last layer's full K and V (PROMPT tokens) and its K copy; and the figures at the device's
    # peak are the run's as recorded
    true_peak = (ORDER_LAYERS - 1) * 2 * KEEP * ROW_BYTES + 2 * PROMPT * ROW_BYTES + KEEP * ROW_BYTES
    assert true_peak == 18944
    at_peak = as_recorded.devices[0].categories_at_peak
    assert at_peak["kv"] == ORDER_LAYERS * 2 * KEEP * ROW_BYTES  # the copies, at the logits' allocation
    assert {lead: figures for lead, figures in got.items() if figures != (true_peak, at_peak)} == {}
