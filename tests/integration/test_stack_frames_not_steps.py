"""A trace recorded with stacks holds a range per Python frame; kvtrace's own frames are named by their path
below sys.path ("kvtrace/kv_lines.py(106): iter_tensors") where kvtrace is installed in site-packages, as
the steps kvtrace marks are ("kvtrace/decode 3"): only the steps are steps."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from analyzers.report import build_report

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 4

_RECORD = """
import sys, torch, kvtrace
from kvtrace.llama import DEFAULT_PROMPTS, ModelSize, build_model, encode_batch, llama3_tokenizer
size = ModelSize(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
model = build_model(size)
ids, mask = encode_batch(llama3_tokenizer(), list(DEFAULT_PROMPTS[:2]), model.config.pad_token_id)
new = int(sys.argv[2])
options = dict(profiler=True, profile_memory=True, with_stack=True)
with torch.no_grad(), kvtrace.record(sys.argv[1], model=model, **options):
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new)
"""


def test_kvtraces_own_stack_frames_are_no_steps(tmp_path: Path) -> None:
    # GIVEN a run recorded with stacks by a kvtrace imported from a sys.path entry (as from site-packages)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-c", _RECORD, str(run), str(NEW_TOKENS)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = (run / "profiler").glob("*.pt.trace.json*")
    with (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8") as fh:
        events = json.load(fh)["traceEvents"]
    frames = [
        e for e in events if e.get("cat") == "python_function" and str(e.get("name")).startswith("kvtrace/")
    ]
    assert frames, "the trace names no frame of kvtrace's files by its path below sys.path"

    # WHEN it is read
    source, report = build_report(run)

    # THEN its steps are the prefill and each decode step, one marker each, and no frame is one
    steps = [m.label for m in source.markers if m.kind == "step"]
    assert steps == ["step 1 prefill"] + [f"step {n} decode" for n in range(2, NEW_TOKENS + 1)]
    assert report.steps == NEW_TOKENS
