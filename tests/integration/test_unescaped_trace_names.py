"""Traces whose event names torch wrote with unescaped double quotes (invalid JSON) stay readable.

torch's Chrome trace exporter (Kineto) writes a name between quotes without escaping the quotes inside it:
a Python frame of code compiled under a file name holding a quote (optimum-quanto's quantized caches do it),
or a `record_function` label holding one, leaves the whole file invalid JSON. Both traces here are written by
the real profiler; the figures are the arithmetic of the cache and counts from the raw file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from analyzers.readers.chrome_trace import read_chrome_trace
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.cli_json import report_json
from tests.tiny import record_generate, tiny_size

LAYERS, KV_HEADS, HEAD_DIM, BATCH, PROMPT, NEW = 2, 2, 16, 2, 12, 4
HOOK_FILE = 'quoted "hooks".py'  # a file name with quotes, as code compiled from a string may carry


def _quoted_hook() -> object:
    """A forward pre-hook whose code object's file name holds double quotes; it copies its input (an
    allocation under its frame)."""
    namespace: dict[str, object] = {}
    exec(compile("def hook(module, args):\n    args[0].clone()\n", HOOK_FILE, "exec"), namespace)
    return namespace["hook"]


def _trace_of(run: Path) -> Path:
    (trace,) = (run / "profiler").iterdir()
    return trace


def test_a_frame_with_quotes_in_its_name_leaves_the_run_readable(tmp_path: Path, capsys: object) -> None:
    # GIVEN a run recorded with Python stacks, each forward calling code compiled under a quoted file name
    model = build_model(tiny_size(LAYERS, KV_HEADS)).eval()
    model.model.layers[0].register_forward_pre_hook(_quoted_hook())  # type: ignore[arg-type]
    run = tmp_path / "run"
    record_generate(model, run, BATCH, PROMPT, NEW, with_stack=True)
    raw = _trace_of(run).read_bytes()
    with pytest.raises(json.JSONDecodeError):  # torch wrote the quotes unescaped: not JSON
        json.loads(raw)
    unescaped = raw.count(b'"name": "quoted "hooks".py(1): hook",')
    assert unescaped == NEW  # one frame per forward: the prefill and NEW - 1 decode steps

    # WHEN it is reported
    report = report_json(run, capsys)

    # THEN the KV join holds the dynamic cache's arithmetic, and one note says how many names were repaired
    tokens = PROMPT + NEW - 1
    assert report["kv"]["measured_from"] == "kv_log"
    assert report["kv"]["final_bytes"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * BATCH * 4
    notes = [note for note in report["notes"] if "double quote" in note]
    assert len(notes) == 1
    assert notes[0].startswith(f"the profiler trace: {unescaped} events whose name holds a double quote")
    # the hook's own frame is read with its real name, quotes included
    source, _ = build_report(run)
    assert any(f"{HOOK_FILE}:1:hook" in frames for frames in source.frames)
    assert main(["diagnose", str(run)]) == 0


@pytest.mark.parametrize("byte_scan", [True, False], ids=["byte_scan", "json_stream"])
def test_a_step_range_with_quotes_in_its_name_is_kept(tmp_path: Path, byte_scan: bool) -> None:
    # GIVEN a bare torch.profiler trace whose kvtrace range label holds quotes, around one allocation
    label = 'kvtrace/"prefill"'
    elements = 1000
    cpu_only = [torch.profiler.ProfilerActivity.CPU]
    with (
        torch.profiler.profile(activities=cpu_only, profile_memory=True) as prof,
        torch.profiler.record_function(label),
    ):
        kept = torch.ones(elements, dtype=torch.float32)
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    raw = path.read_bytes()
    with pytest.raises(json.JSONDecodeError):
        json.loads(raw)

    # WHEN either reader reads it
    source = read_chrome_trace(path, byte_scan=byte_scan)

    # THEN the range is a step marker under its real name, the memory events are there, and the repair counted
    assert [marker.label for marker in source.markers] == [label]
    (cpu,) = source.devices
    assert elements * kept.element_size() in cpu.delta_bytes.tolist()
    assert source.meta["unescaped_names"] == {label: raw.count(b'"name": "kvtrace/"prefill"",')} == {label: 1}
