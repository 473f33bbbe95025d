"""A model converted inside `record()` while its disk is full: the conversion's lines for weights.jsonl cannot
be written whole. The table must stop before that change with whole lines only (a cut last line made every
command refuse the finished run), the manifest count them, and a warning say what was lost, so that the run
reads. A full disk here is a file size limit (RLIMIT_FSIZE): a write beyond it fails with EFBIG as one on a
full disk fails with ENOSPC, part-way, anywhere (tests/integration/test_record_full_disk.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from kvtrace.format import KV_EVENTS, MANIFEST, MEMORY_SAMPLES, WEIGHTS
from kvtrace.llama import build_model
from tests.integration.test_record_full_disk import REPO_ROOT, _child_lines
from tests.tiny import HEAD_DIM, tiny_size, weights_bytes

LAYERS, KV_HEADS, ROWS, PROMPT, NEW = 2, 2, 2, 5, 4

CHILD = textwrap.dedent(
    """
    import os, resource, signal, sys
    import torch
    import kvtrace
    from kvtrace.llama import build_model
    from kvtrace.recorder import RecordingError
    from tests.tiny import tiny_size

    out_dir = sys.argv[1]
    layers, kv_heads, rows, prompt, new = (int(arg) for arg in sys.argv[2:7])
    model = build_model(tiny_size(layers, kv_heads), seed=0)
    ids = torch.randint(3, 1000, (rows, prompt), generator=torch.Generator().manual_seed(0))
    weights = os.path.join(out_dir, "weights.jsonl")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def generate():
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=0, return_dict_in_generate=True,
        )

    try:
        with torch.no_grad(), kvtrace.record(out_dir, model=model, profiler=False):
            generate()  # its cache is dropped
            model.to(torch.bfloat16)  # logged whole
            # The disk fills: no file may grow 1 KiB past weights.jsonl (the largest log), so the next
            # conversion's lines (~8 KiB) are cut part-way
            limit = os.path.getsize(weights) + 1024
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            model.to(torch.float32)
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            kept = generate()  # in float32, its cache held at the end
        print("no error")
    except RecordingError as exc:
        print("error:", exc)
    """
)


def test_a_weights_change_cut_by_a_full_disk_leaves_a_run_that_reads(tmp_path: Path) -> None:
    # GIVEN a recording that generates, converts its model to bfloat16, then fills its disk and converts it
    # back to float32 (the lines of that change do not fit), then generates again
    run = tmp_path / "run"
    said = _child_lines(tmp_path, CHILD, run, LAYERS, KV_HEADS, ROWS, PROMPT, NEW)

    # THEN the block ends without an error: the KV log and samples are whole
    assert said == ["no error"]
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["status"] == "ok" and "write_error" not in manifest["ended"]
    # AND weights.jsonl holds whole lines only: the start's storages, then the first conversion's (each
    # freed, its bfloat16 copy added), and nothing of the second; the manifest counts them
    model = build_model(tiny_size(LAYERS, KV_HEADS), seed=0)
    storages = len({t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]})
    w32 = weights_bytes(model)
    text = (run / WEIGHTS).read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == manifest["weights_lines"] == 3 * storages
    assert [line.get("event") for line in lines[storages:]] == ["freed"] * storages + ["added"] * storages
    assert sum(line["storage_bytes"] for line in lines[-storages:]) == w32 // 2
    # AND a warning says which change was lost and why: the conversion at the step after the first
    # generate()'s NEW forwards, each storage freed and added
    assert manifest["warnings"][0] == (
        f"the model's weights changed at step {NEW} ({storages} storages freed, {storages} added), and those "
        f"{2 * storages} lines could not be written ({run / WEIGHTS}: cannot write (File too large)): "
        "weights.jsonl stops before that change (and logs no later one), so from then on the memory figures "
        "count the weights the model held before it"
    )
    assert manifest["kv_events"] == (run / KV_EVENTS).read_bytes().count(b"\n") > 0
    assert manifest["memory_samples_lines"] == (run / MEMORY_SAMPLES).read_bytes().count(b"\n") > 0

    # WHEN it is reported, in JSON
    report = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "report", "--no-export", "--json", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )

    # THEN it reads, with the warning as a note; the weights are the lines written (bfloat16 from the first
    # conversion on), over the final cache: prompt + NEW - 1 tokens of K and V per layer and row, in float32
    assert report.returncode == 0, report.stderr
    figures = json.loads(report.stdout)
    assert manifest["warnings"][0] in figures["notes"]
    kv_final = LAYERS * 2 * KV_HEADS * HEAD_DIM * (PROMPT + NEW - 1) * ROWS * 4
    assert figures["kv"]["final_bytes"] == kv_final
    assert figures["devices"][0]["final_allocated_bytes"] == w32 // 2 + kv_final
    # AND a plan from it says the same, as its weights are the table's
    plan = subprocess.run(
        [sys.executable, "-m", "kvtrace.cli", "plan", "--from-run", str(run), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert plan.returncode in (0, 1), plan.stderr  # 1: does not fit, a plan all the same
    assert manifest["warnings"][0] in json.loads(plan.stdout)["notes"]
