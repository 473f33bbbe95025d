"""`kvtrace plan --from-run` says the activations its peak's moment holds: beside the weights and the KV that
moment holds, not beside the KV peak.

A run whose peak is a decode step's end (its logits and the logits processors' vectors beside the whole KV)
holds no growth copy then: the copy is live inside the last update, another moment. Before, the plan's
activations were the peak less the weights and the KV peak, which subtracted that copy: kvtrace demo's dynamic
run planned at contexts 84, 60, 40, 30 and 22 said 19.48, 20.98, 22.23, 22.86 and 23.36 MiB, rising as the
context shrank (the growth copy shrinking), where the run measured 24.61 MiB beside its weights and KV,
which a shorter context keeps as measured (the plan's own note: an upper bound). The peaks were right; the
activations line was not. Now it is the run's 24.61 MiB at each.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import record_generate

BATCH, PROMPT, NEW = 8, 20, 24
CONTEXT = PROMPT + NEW
KV_TOKEN = 4 * 2 * 8 * 256 * 4  # the demo's shape: 4 layers' K and V, 8 KV heads of 256, fp32: 64 KiB


def test_the_activations_of_a_decode_peak_stay_as_measured_at_a_shorter_context(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN kvtrace demo's shape (a 128,256-token vocabulary's logits beside a wide KV), 8 rows, which peaks
    # at its last decode step's end, holding all its KV and no growth copy
    record_generate(build_model("demo"), tmp_path / "run", BATCH, PROMPT, NEW)
    report = report_json(tmp_path / "run", capsys)
    at_peak = report["categories_at_peak"]
    assert at_peak["kv"] == BATCH * (CONTEXT - 1) * KV_TOKEN
    for context in (CONTEXT, 34, 26, 22):
        # WHEN planned at its own context and at shorter ones (the same prompt, fewer new tokens)
        planned = plan_json(tmp_path / "run", capsys, "--context", str(context))
        # THEN the peak's moment holds the context's KV, no growth copy, beside the run's activations as
        # measured (before: 2,752,512 B fewer at its own context, the growth copy, and more as it shrank)
        kv = BATCH * (context - 1) * KV_TOKEN
        assert planned["activations_bytes"] == at_peak["other"], context
        assert planned["kv_at_peak_bytes"] == kv < planned["kv_peak_bytes"]
        assert planned["peak_bytes"] == at_peak["weights"] + kv + at_peak["other"]
        # AND the KV budget is what the moment leaves beside them
        budget = planned["request"]["gpu_memory_bytes"] - at_peak["weights"] - at_peak["other"]
        assert planned["kv_budget_bytes"] == budget
