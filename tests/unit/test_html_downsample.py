"""The HTML report's "Memory by category" chart, downsampled: every series it draws reaches exactly its own
highest and lowest bytes, not only the allocated line that used to pick the points for all of them."""

from __future__ import annotations

import numpy as np

from analyzers.model import CATEGORY_NAMES, KV, OTHER, WEIGHTS, DeviceEvents, MemorySource
from analyzers.render.html import MAX_POINTS, report_to_html
from analyzers.summary import summarize
from tests.plotly_figures import page_figure

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _churn(events: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(category, signed bytes) of `events` allocations and frees spread over the three categories, each
    free at most what its category holds: KV, weights and other memory rising and falling independently."""
    rng = np.random.default_rng(seed)
    category = rng.choice(np.array([KV, WEIGHTS, OTHER], dtype=np.int8), events)
    size = rng.integers(1, 4096, events)
    free = rng.random(events) < 0.45
    held = {KV: 0, WEIGHTS: 0, OTHER: 0}
    delta = np.zeros(events, dtype=np.int64)
    for i in range(events):
        code, amount = int(category[i]), int(size[i])
        if free[i] and held[code] >= amount:
            amount = -amount
        held[code] += amount
        delta[i] = amount
    return category, delta


def test_each_category_drawn_keeps_its_own_peak_and_low() -> None:
    # GIVEN a trace of a device with three times more events than the chart draws
    events = 3 * MAX_POINTS
    category, delta = _churn(events, seed=7)
    device = DeviceEvents(
        device="cpu",
        ts_us=np.arange(events, dtype=np.float64) * 10.0,
        addr=np.full(events, -1, dtype=np.int64),
        delta_bytes=delta,
        category=category,
    )
    source = MemorySource(kind="chrome_trace", path="churn.json", devices=[device])
    # WHEN the HTML report draws it
    traces, layout = page_figure(report_to_html(source, summarize(source)), "kvtrace-timeline")
    factor = UNITS[layout["yaxis"]["title"]["text"]]
    drawn = {t["name"]: np.asarray(t["y"]) * factor for t in traces if t.get("name")}
    assert len(drawn["kv"]) < events  # downsampled
    # THEN each category's line reaches its full series' max and min (the level before the trace, 0,
    # included), as does allocated, their sum; the figures from the events alone
    expected = {
        name: np.cumsum(np.where(category == code, delta, 0)) for code, name in enumerate(CATEGORY_NAMES)
    }
    expected["allocated"] = np.cumsum(delta)
    for name, full in expected.items():
        levels = np.concatenate([[0], full])
        assert (drawn[name].max(), drawn[name].min()) == (levels.max(), levels.min()), name
