"""generate() on another thread with the profiler on (a TextIteratorStreamer, a server's worker): the
profiler records the thread that started it, so its trace holds no memory event of the model's; the KV log
is complete, and `report` and `diagnose` read their memory figures from it, saying why, also when the
recording thread allocated some of its own meanwhile. A run recorded with profile_memory=False reads the
same way, and says that option is why. When only some forwards ran elsewhere, the trace is read and the
warning says what it misses."""

from __future__ import annotations

import gzip
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TextIteratorStreamer

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
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


def _trace_memory_events(run: Path) -> int:
    """The profiler trace's allocator events (`[memory]`), counted from the raw file."""
    (trace,) = read_run(run).profiler_traces()
    opener: Any = gzip.open if trace.name.endswith(".gz") else open
    with opener(trace, "rt") as file:
        events = json.load(file)["traceEvents"]
    return sum(1 for event in events if event.get("name") == "[memory]")


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
    assert report["partial"] is True  # the figures are the KV log's and the weights' only
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


ALL_ELSEWHERE = "every forward pass of the model ran on another thread than the one that entered record()"


def test_a_streamed_generate_reads_the_kv_log_though_the_recording_thread_allocated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer: Any
) -> None:
    # GIVEN the streaming pattern: generate(streamer=...) on a thread of its own, the tokens read on the
    # thread that entered record(), which allocates too (the attention mask, made inside the block), under
    # a budget of the weights and 4 KiB, which the KV cache alone crosses
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    weights = _unique_storage_bytes([*model.parameters(), *model.buffers()])
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    outputs: list[Any] = []
    run = tmp_path / "run"
    with kvtrace.record(run, model=model, gpu_memory=weights + 4096):
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
        kwargs = {
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": NEW_TOKENS,
            "min_new_tokens": NEW_TOKENS,
            "do_sample": False,
            "pad_token_id": 0,
            "streamer": streamer,
            "return_dict_in_generate": True,
        }
        worker = threading.Thread(target=lambda: outputs.append(model.generate(ids, **kwargs)))
        worker.start()
        text = "".join(streamer)
        worker.join()
    assert text and _trace_memory_events(run) > 0  # the recording thread's own, none of the model's

    # WHEN it is reported THEN the memory figures are the KV log's over the weights: the peak holds the KV
    report, weights, kv_peak, final_kv = _reported_over_the_weights(
        run, outputs[0].past_key_values, model, capsys
    )
    assert report["kv"]["final_bytes"] == final_kv
    assert any(note.startswith(ALL_ELSEWHERE) for note in report["notes"])
    # AND the budget the KV cache crossed reads as crossed, on figures that count only the weights and KV
    budget = report["budget"]
    assert (budget["crossed"], budget["partial"]) == (True, True)
    assert budget["peak_bytes"] == weights + kv_peak
    assert budget["headroom_bytes"] == 4096 - kv_peak

    # AND diagnose prices the crossing from the same figures, with the KV geometry of the run
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    assert diagnosis["budget_crossing"]["crossed"] is True
    assert (diagnosis["tokens_held"], diagnosis["batch"]) == (PROMPT + NEW_TOKENS - 1, 1)
    assert any(note.startswith(ALL_ELSEWHERE) for note in diagnosis["notes"])
    assert not any("record with kvtrace" in r["sentence"] for r in diagnosis["remedies"])

    # AND a run recorded before the manifest counted those forwards reads the same from its warning
    older = tmp_path / "older"
    shutil.copytree(run, older)
    manifest = json.loads((older / "manifest.json").read_text())
    assert manifest.pop("forwards_on_other_threads") == {"forwards": NEW_TOKENS, "steps": NEW_TOKENS}
    (older / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", str(older), "--json", "--no-export"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["devices"] == report["devices"] and again["budget"] == report["budget"]


def test_when_only_some_forwards_ran_elsewhere_the_trace_is_read_and_the_warning_says_what_it_misses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN one generate() on the recording thread and one on a worker thread, the profiler on
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model):
        model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        worker = threading.Thread(
            target=model.generate, args=(ids,), kwargs={"attention_mask": torch.ones_like(ids), **kwargs}
        )
        worker.start()
        worker.join()
    # WHEN it is reported
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    # THEN the trace's figures stand (its own thread's forwards are in it, activations included) ...
    assert not any(note.startswith(ALL_ELSEWHERE) for note in report["notes"])
    (device,) = report["devices"]
    assert device["categories_at_peak"]["other"] > 0  # activations and logits: a KV log has none
    assert report["partial"] is False
    # ... and the warning says which forwards it misses, and what the measured figures leave out
    (warning,) = [note for note in report["notes"] if "ran on another thread" in note]
    assert warning.startswith("4 of 8 forward passes ran on another thread")
    assert (
        "the measured peak, its categories and the budget leave out what those forwards allocated" in warning
    )
    # AND the KV figures, from the log, have every forward: the second call's cache of 10 + 4 - 1 tokens
    assert report["kv"]["tokens_held"] == PROMPT + 4 - 1
