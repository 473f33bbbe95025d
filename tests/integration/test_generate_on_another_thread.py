"""generate() on another thread with the profiler on (a TextIteratorStreamer, a server's worker): the
profiler records the thread that started it, so its trace holds no memory event of the model's; the KV log
is complete, and `report` and `diagnose` read their memory figures from it, saying why. A run recorded with
profile_memory=False reads the same way, and says that option is why."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.format import read_run
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, tiny_size

LAYERS, KV_HEADS, PROMPT, NEW_TOKENS = 4, 2, 10, 12


def _unique_storage_bytes(tensors: Any) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _kv_log_peak(run: Path) -> int:
    """The KV log's live bytes at their highest (a dynamic cache's growth copies), from the raw log."""
    live: dict[tuple[int, int, str, int], int] = {}
    kv_peak = 0
    for event in read_run(run).kv_events:
        key = (event.cache, event.layer, event.kv, event.addr)
        if event.event == "freed":
            live.pop(key)
        elif event.addr:
            live[key] = event.storage_bytes
        kv_peak = max(kv_peak, sum(live.values()))
    return kv_peak


def _reported_over_the_weights(
    run: Path, cache: Any, model: Any, capsys: pytest.CaptureFixture[str]
) -> tuple[dict[str, Any], int, int, int]:
    """`report --json` of a run whose trace has no allocator events, checked to give the KV log's figures
    over the weights (the cache's bytes by arithmetic); (report, weights, KV peak, final KV)."""
    tokens = PROMPT + NEW_TOKENS - 1
    final_kv = LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * 4  # layers x K,V x heads x dim x tokens x fp32
    assert _unique_storage_bytes(t for layer in cache.layers for t in (layer.keys, layer.values)) == final_kv
    kv_peak = _kv_log_peak(run)
    weights = _unique_storage_bytes([*model.parameters(), *model.buffers()])
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    (device,) = report["devices"]
    assert device["peak_allocated_bytes"] == weights + kv_peak
    assert device["categories_at_peak"] == {"kv": kv_peak, "weights": weights, "other": 0}
    assert device["final_allocated_bytes"] == weights + final_kv
    return report, weights, kv_peak, final_kv


def test_a_trace_without_the_models_memory_events_falls_back_to_the_kv_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN generate() run on a thread of its own inside a profiled recording
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    outputs: list[Any] = []

    def generate() -> None:
        with torch.no_grad():
            outputs.append(
                model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    return_dict_in_generate=True,
                )
            )

    run = tmp_path / "run"
    with kvtrace.record(run, model=model):
        worker = threading.Thread(target=generate)
        worker.start()
        worker.join()
    # WHEN it is reported THEN the device figures are the KV log's over the weights, and a note says why
    report, weights, kv_peak, final_kv = _reported_over_the_weights(
        run, outputs[0].past_key_values, model, capsys
    )
    assert (report["kv"]["final_bytes"], report["kv"]["peak_bytes"]) == (final_kv, kv_peak)
    assert any("no memory events of the model's thread" in note for note in report["notes"])

    # AND diagnose explains the peak from the same figures instead of refusing the run
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    assert (diagnosis["event"], diagnosis["allocated_bytes"]) == ("peak", weights + kv_peak)
    assert diagnosis["kv_bytes"] == kv_peak
    assert any("no memory events of the model's thread" in note for note in diagnosis["notes"])


def test_a_run_recorded_with_profile_memory_off_says_so_not_another_thread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN generate() run on the recording's own thread, with the profiler's allocator events turned off
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profile_memory=False):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
        )
    # WHEN it is reported THEN the figures are the KV log's over the weights (as docs/recording.md says)
    report, weights, kv_peak, _ = _reported_over_the_weights(run, out.past_key_values, model, capsys)
    # AND the note gives the run's own option as the cause, not a thread it did not use
    assert any("recorded with profile_memory=False" in note for note in report["notes"])
    assert not any("another thread" in note for note in report["notes"])

    # AND diagnose says the same
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    assert (diagnosis["event"], diagnosis["allocated_bytes"]) == ("peak", weights + kv_peak)
    assert any("recorded with profile_memory=False" in note for note in diagnosis["notes"])
    assert not any("another thread" in note for note in diagnosis["notes"])
