"""Recording again into a run directory with overwrite=True replaces the whole run, not half of it."""

from __future__ import annotations

from pathlib import Path

import torch

import kvtrace
from kvtrace.format import read_run
from kvtrace.llama import build_model
from tests.tiny import tiny_size


def test_overwrite_leaves_one_recording(tmp_path: Path) -> None:
    model = build_model(tiny_size(2))
    run = tmp_path / "run"
    for new_tokens in (6, 3):
        ids = torch.randint(3, 1000, (1, 5))
        with torch.no_grad(), kvtrace.record(run, model=model, overwrite=True):
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
    recorded = read_run(run)
    assert len(recorded.profiler_traces()) == 1
    assert max(e.step for e in recorded.kv_events) == 3
