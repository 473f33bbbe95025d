"""`kvtrace plan --from-run RUN --cache static` of a dynamic run that peaked decoding prices the static
cache's prefill with what the run held during its own prefill, as `kvtrace diagnose`'s static cache remedy
does ("as `kvtrace plan --from-run RUN --cache static` prices it"), not with its decode step's end. Before,
the plan took the step's end: on a Llama whose prefill holds more beside its KV than a step's end (a wide
KV, K and V expanded to the query heads over padded prompts) it planned below the static recording (a
static cache said to fit where it did not: 1,412,020 B where it peaks at 1,474,008), and on the demo's Llama
126.22 MiB where diagnose said at most 122.29 MiB. Both now price the static prefill at its last layer's
attention, the recording's peak, byte for byte (tests/integration/test_static_remedy_moment.py: the
prefill's most and the attention's extra were added before, 2.3% over here). A sliding cache's prompt,
held whole until its first decode step, goes beside that prefill too, not beside a decode step's end."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import ModelSize, build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import record_generate

ROWS, PROMPT, NEW, PADDED = 4, 8, 24, 3
SIZE = ModelSize(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, vocab_size=1000,
    head_dim=64,
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() on padded prompts (the first row's first 3 ids masked), with a dynamic
    cache and a static one."""
    import torch

    folder = tmp_path_factory.mktemp("static_prefill")
    torch.manual_seed(0)
    model = build_model(SIZE).eval()
    found = {name: folder / name for name in ("dynamic", "static")}
    for cache, run in found.items():
        record_generate(model, run, ROWS, PROMPT, NEW, None if cache == "dynamic" else cache, padded=PADDED)
    return found


def test_a_static_plan_from_a_dynamic_run_prices_its_prefill_as_measured(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the static cache's recording of the same call, which peaks at its prefill
    measured = report_json(runs["static"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is planned on a static cache, and diagnosed
    plan = plan_json(runs["dynamic"], capsys, "--cache", "static")
    diagnosis = cli_json(["diagnose", str(runs["dynamic"]), "--json"], capsys)
    (static,) = [r for r in diagnosis["remedies"] if r["kind"] == "static_cache"]
    # THEN both give one peak, the recording's, byte for byte
    assert plan["peak_bytes"] == diagnosis["allocated_bytes"] - static["saved_bytes"] == measured


SLIDING_PROMPT, WINDOW = 48, 4  # a window far shorter than the prompt, held whole until the first decode


@pytest.fixture(scope="module")
def sliding_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() of 8 new tokens after a 48-token prompt on 4 rows, with a dynamic cache
    and a sliding one of window 4, on a 32,000-token vocabulary: a decode step's end (the logits
    processors' vectors over it) holds more beside the KV than the prefill does."""
    from dataclasses import replace

    import torch

    folder = tmp_path_factory.mktemp("sliding_prefill")
    torch.manual_seed(0)
    model = build_model(replace(SIZE, vocab_size=32000)).eval()
    found = {name: folder / name for name in ("dynamic", "sliding")}
    record_generate(model, found["dynamic"], ROWS, SLIDING_PROMPT, 8)
    record_generate(model, found["sliding"], ROWS, SLIDING_PROMPT, 8, "sliding", window=WINDOW)
    return found


def test_a_sliding_plan_from_a_dynamic_run_puts_the_prompt_beside_its_prefill(
    sliding_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sliding cache's recording, which peaks at its prefill: the whole prompt's KV beside what
    # the prefill holds
    measured = report_json(sliding_runs["sliding"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run is planned on that sliding cache
    plan = plan_json(sliding_runs["dynamic"], capsys, "--cache", "sliding", "--window", str(WINDOW))
    # THEN the plan is the recording: the prompt's KV beside the dynamic run's prefill, as measured (before,
    # beside its decode step's end, a moment no run holds: 2.96% over)
    assert plan["peak_bytes"] == measured
