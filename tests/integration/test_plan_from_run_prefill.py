"""`kvtrace plan --from-run` prices a larger prefill with what the run held beside its KV at its prefill.

Before, a plan of more rows counted, for its prefill, the run's peak less its weights and prefill KV as
activations, scaled by the rows: where the run peaked late that held its decode KV and growth copy too. The
demo recorded at batch 8 and context 84, planned at batch 12 and context 40, said 143.23 MiB ("fits NO" on
120 MiB, 66.35 MiB of activations) where the batch-12 recording at context 40 peaked at 109.66 MiB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS = 2, 2
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


def test_a_larger_batch_at_a_shorter_context_bounds_its_recording_closely(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run of 4 rows that peaks at its last decode step (a 3-token prompt, 40 new tokens)
    batch, prompt, new = 4, 3, 40
    context = prompt + new
    run = tmp_path / "run"
    record_generate(model, run, batch, prompt, new)
    report = report_json(run, capsys)
    assert report["categories_at_peak"]["kv"] == TOKEN_ROW * batch * (context - 1)
    # AND the same generate() recorded at twice the rows and a context of 13
    rows, shorter = 2 * batch, 13
    record_generate(model, tmp_path / "larger", rows, prompt, shorter - prompt)
    recorded = report_json(tmp_path / "larger", capsys)["peak_allocated_bytes"]
    # WHEN the run is planned at those settings
    planned = plan_json(run, capsys, "--batch", str(rows), "--context", str(shorter))
    # THEN the plan bounds the recording, within less than the run's decode KV (the tokens written after
    # its prompt, its 4 rows), which the old prefill floor counted as activations, and twice over
    decode_kv = TOKEN_ROW * batch * (context - 1 - prompt)
    assert recorded <= planned["peak_bytes"] < recorded + decode_kv
    assert planned["kv_bytes"] == TOKEN_ROW * rows * (shorter - 1)
    assert not any("does not tell what it held beside its KV" in note for note in planned["notes"])
    # AND on a GPU between the two, the plan fits, as the recording does
    budget = recorded + decode_kv
    on_budget = plan_json(
        run, capsys, "--batch", str(rows), "--context", str(shorter), "--gpu-memory", f"{budget}B"
    )
    assert on_budget["fits"] and recorded <= budget
