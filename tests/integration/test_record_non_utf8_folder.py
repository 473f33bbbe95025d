"""Recording into a folder whose name is not UTF-8 (bytes a POSIX file system takes, which Python reads as
lone surrogates: `os.fsdecode(b"run\\xff")`). torch's C++ takes the trace's file name as UTF-8 only, and
refused this one with a TypeError that the run logged as the block's own exception, its trace lost."""

from __future__ import annotations

import gzip
import json
import os
import tempfile

import pytest
import torch
from kvlog_math import kv_bytes

import kvtrace
from kvtrace.format import MANIFEST
from tests.cli_json import report_json

NEW_TOKENS = 4


@pytest.mark.parametrize("gzip_trace", [False, True], ids=["json", "gzip"])
def test_a_run_folder_whose_name_is_not_utf8_gets_its_trace(
    tmp_path, tiny_model, tiny_size, prompt_batch, capsys, monkeypatch, gzip_trace
):
    # GIVEN a run folder named with a byte that is not UTF-8, and a temporary folder of the test's own
    run = tmp_path / os.fsdecode(b"run\xff")
    try:
        run.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))

    # WHEN a generation is recorded into it with the profiler on
    with torch.no_grad(), kvtrace.record(run, model=tiny_model, gzip_trace=gzip_trace):
        tiny_model.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )

    # THEN the block ended ok, with nothing unwritten
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    assert manifest["ended"]["status"] == "ok", manifest["ended"]
    assert not {"type", "trace_error", "write_error"} & set(manifest["ended"]), manifest["ended"]
    # AND the trace is in profiler/ under its own name, listed by the manifest, with nothing left beside it
    suffix = ".pt.trace.json.gz" if gzip_trace else ".pt.trace.json"
    written = sorted(p.name for p in (run / "profiler").iterdir())
    assert len(written) == 1 and written[0].endswith(suffix), written
    assert f"profiler/{written[0]}" in manifest["files"]
    assert list(temporary.iterdir()) == []
    opened = gzip.open if gzip_trace else open
    with opened(run / "profiler" / written[0], "rt", encoding="utf-8") as trace_file:
        events = json.load(trace_file)["traceEvents"]
    allocs = sum(1 for e in events if e.get("name") == "[memory]" and e["args"]["Bytes"] > 0)
    assert allocs > 0

    # AND the report reads the trace's allocator events, and the KV log's exact bytes: the cache holds the
    # prompt + NEW_TOKENS - 1 tokens per row (the last token is not fed back), K and V in each layer, float32
    report = report_json(run, capsys)
    assert report["size_basis"] == "allocator"
    assert [device["alloc_events"] for device in report["devices"]] == [allocs]
    assert not [note for note in report["notes"] if "profiler trace" in note], report["notes"]
    head_dim = tiny_size.hidden_size // tiny_size.num_heads
    tokens = prompt_batch.prompt_len + NEW_TOKENS - 1
    per_tensor = kv_bytes(tiny_size.num_kv_heads, head_dim, tokens, prompt_batch.rows, 4)
    assert report["kv"]["final_bytes"] == 2 * tiny_size.num_layers * per_tensor


def test_a_trace_torch_cannot_be_given_a_name_for_is_named_and_the_run_reads(
    tmp_path, tiny_model, tiny_size, prompt_batch, capsys, monkeypatch
):
    # GIVEN a run folder and the only temporary folder both named with a byte that is not UTF-8: no name
    # torch can take leads to the run
    run = tmp_path / os.fsdecode(b"run\xff")
    temporary = tmp_path / os.fsdecode(b"tmp\xff")
    try:
        run.mkdir()
        temporary.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system takes only UTF-8 names")
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))

    # WHEN a generation is recorded into it with the profiler on
    recording = kvtrace.record(run, model=tiny_model)
    with pytest.raises(kvtrace.RecordingError) as raised, torch.no_grad(), recording:
        tiny_model.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )

    # THEN the block ends with one RecordingError naming the trace, as for a trace a full disk refused; the
    # block itself ended ok, and the manifest says which file is missing and why
    said = str(raised.value)
    assert said.startswith(f"{run / 'profiler'}{os.sep}") and ".pt.trace.json: cannot write (" in said, said
    assert said.endswith("): the run has no profiler trace (its KV log and samples are whole)"), said
    assert "torch.profiler takes UTF-8 names only" in said and "\n" not in said
    manifest = json.loads((run / MANIFEST).read_text(encoding="utf-8"))
    ended = manifest["ended"]
    assert ended["status"] == "ok" and "type" not in ended and "write_error" not in ended, ended
    assert said.startswith(ended["trace_error"])
    assert list((run / "profiler").iterdir()) == []
    assert list(temporary.iterdir()) == []

    # AND the run reads without its trace, its KV log whole
    report = report_json(run, capsys)
    assert [note for note in report["notes"] if "could not write the profiler trace" in note]
    head_dim = tiny_size.hidden_size // tiny_size.num_heads
    tokens = prompt_batch.prompt_len + NEW_TOKENS - 1
    per_tensor = kv_bytes(tiny_size.num_kv_heads, head_dim, tokens, prompt_batch.rows, 4)
    assert report["kv"]["final_bytes"] == 2 * tiny_size.num_layers * per_tensor
