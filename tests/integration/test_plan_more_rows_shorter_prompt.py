"""`kvtrace plan --from-run RUN --batch B --prompt P`, more rows of a shorter prompt than a run that peaked
at its prefill: the plan's prefill holds each of the run's prefill moments grown by the rows and shrunk by the
prompt. Before, its floor for a prefill of more rows priced them at the run's prompt: the tiny Llama's 2 rows
of 300 tokens planned at 3 rows of 200 said 3,293,116 B where the recording peaked at 2,481,904 (+32.7%), as
many tokens a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import record_generate, tiny_size

INT64 = 8
RUN, PLANNED, NEW = (2, 300), (3, 200), 2
SCALARS = 64  # the plan holds a few scalars more than the recording (52 B measured)


def test_more_rows_of_a_shorter_prompt_shrink_the_prefill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the tiny Llama recorded peaking at its prefill, 2 rows of 300 tokens, and 3 rows of 200
    import torch

    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2)).eval()
    for rows, prompt in (RUN, PLANNED):
        record_generate(model, tmp_path / f"{rows}x{prompt}", rows, prompt, NEW)
    run = report_json(tmp_path / "2x300", capsys)
    assert run["steps"] == NEW and run["categories_at_peak"]["kv"] == 2 * 2 * 2 * 16 * 4 * 2 * 300
    recorded = report_json(tmp_path / "3x200", capsys)["peak_allocated_bytes"]
    # WHEN the 2-row run is planned at 3 rows of 200 tokens
    rows, prompt = PLANNED
    planned = plan_json(
        tmp_path / "2x300", capsys, "--batch", str(rows), "--prompt", str(prompt), "--reserve", "0"
    )
    # THEN the plan bounds the recording, over it by the step's ids, mask and positions, which the plan keeps
    # at the run's prompt (3 int64 tensors, 3 rows x 100 tokens more), and a few scalars
    kept_ids = 3 * rows * (RUN[1] - prompt) * INT64
    assert 0 <= planned["peak_bytes"] - recorded <= kept_ids + SCALARS
