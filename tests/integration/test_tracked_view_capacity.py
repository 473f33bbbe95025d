"""A hand-written decoder that preallocates one KV tensor for every layer, in either layout, and tracks each
layer's K and V as views cut to the tokens written after each forward (the README's advice): the report's
bytes per token and capacity, and diagnose's moment and prices, come from the tensor's max_seq, not from its
bytes over the tokens written.

The tensor is made with the model, before `record()`: with the profiler on, its trace has no allocation of
it, and it is KV held from the trace's first event (`readers.kv_before_trace`).

Every figure is the arithmetic of the tensor: 2 layers x K,V x 2 rows x 2 KV heads x 64 positions x 16 x 4 B.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from analyzers.report import build_report
from tests.cli_json import cli_json, report_json
from tests.one_tensor_decoder import OneTensorDecoder, Shape

LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 64, 4, 2, 16, 128
BATCH, MAX_SEQ, PROMPT, DECODE = 2, 64, 8, 5
FP32 = 4
WRITTEN = PROMPT + DECODE  # 13 tokens a row
TENSOR_BYTES = LAYERS * 2 * BATCH * KV_HEADS * MAX_SEQ * HEAD_DIM * FP32  # 65,536 B
VIEW_BYTES = BATCH * KV_HEADS * MAX_SEQ * HEAD_DIM * FP32  # one layer's K (or V) room: 16,384 B
TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32  # a token of one row: 512 B
POSITION_BYTES = TOKEN_BYTES * BATCH  # a position across the batch: 1,024 B
# embedding, each layer's QKV projection and the output projection, fp32: 131,072 B
WEIGHT_BYTES = (
    VOCAB * DIM + LAYERS * DIM * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * VOCAB
) * FP32


def _decoder(layout: str) -> OneTensorDecoder:
    return OneTensorDecoder(Shape(LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB, BATCH, MAX_SEQ), layout)


def _record(path: Path, model: OneTensorDecoder, given: bool, profiler: bool = False) -> None:
    """Prefill 8 tokens and decode 5, tracking every layer's K and V views cut to the tokens written after
    each forward; `given`: the model is handed to record() (its forwards are steps), else a bare loop."""

    def track(end: int) -> None:
        for layer in range(LAYERS):
            for index, kind in enumerate("kv"):
                kvtrace.track(model.view(layer, index, end), layer=layer, kind=kind, layout=model.layout)

    with kvtrace.record(path, model=model if given else None, profiler=profiler), torch.inference_mode():
        logits = model(torch.randint(0, VOCAB, (BATCH, PROMPT)), 0)
        track(PROMPT)
        for pos in range(PROMPT, WRITTEN):
            logits = model(logits[:, -1:].argmax(-1), pos)
            track(pos + 1)


@pytest.mark.parametrize("given", [True, False], ids=["model-given", "bare-loop"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_views_cut_from_one_tensor_are_priced_by_its_max_seq(tmp_path, watched_models, capsys, layout, given):
    # GIVEN one preallocated fp32 tensor of 2 layers x K,V x 2 rows x 2 KV heads x 64 positions x 16, whose
    # layers' K and V are tracked as views cut to the 13 tokens written
    torch.manual_seed(0)
    model = _decoder(layout).eval()
    watched_models.append(model)
    _record(tmp_path / "run", model, given)

    # THEN every tracked view's line says the tensor's 64 positions a row, which its shape (13) does not
    lines = [json.loads(line) for line in (tmp_path / "run" / "kv_events.jsonl").read_text().splitlines()]
    views = [line for line in lines if line["event"] != "freed"]
    assert len(views) == LAYERS * 2 * (1 + DECODE)
    assert {line["capacity_tokens"] for line in views} == {MAX_SEQ}
    assert {line["shape"][2 if layout == "bhsd" else 1] for line in views[-LAYERS * 2 :]} == {WRITTEN}

    # AND the report's bytes per token are the tensor over its slots, 65,536 / (64 x 2) = 512 (not
    # 65,536 / (13 x 2) = 2,520.6), the arithmetic of one row's token; its capacity the tensor's
    kv = report_json(tmp_path / "run", capsys)["kv"]
    assert kv["final_bytes"] == kv["peak_bytes"] == model.kv.nbytes == TENSOR_BYTES == 65536
    assert kv["bytes_per_token_measured"] == TENSOR_BYTES / (BATCH * MAX_SEQ) == TOKEN_BYTES == 512
    # ... and the arithmetic, 2 layers x K,V x 2 KV heads x 16 x 4 B, from the views' own heads and width:
    # the model has no Hugging Face config (it was null, "-" in the text report, which the README promises)
    assert kv["bytes_per_token_expected"] == TOKEN_BYTES
    assert (kv["capacity_rows"], kv["capacity_tokens"], kv["capacity_of"]) == (BATCH, MAX_SEQ, "tracked")
    assert (kv["tokens_held"], kv["batch"]) == (WRITTEN, BATCH)
    assert [(row["layer"], row["k_bytes"], row["v_bytes"]) for row in kv["per_layer"]] == [
        (layer, VIEW_BYTES, VIEW_BYTES) for layer in range(LAYERS)
    ]
    (cache,) = kv["caches"]
    assert (cache["capacity_rows"], cache["capacity_tokens"]) == (BATCH, MAX_SEQ)
    assert cache["capacity_of"] == "tracked"
    assert cache["bytes_per_token_measured"] == TOKEN_BYTES

    # AND diagnose takes the tensor at the run's end (every view seen, 13 tokens written), not at the
    # first view's track, and prices a position as 65,536 / 64 = 1,024 B across the 2 rows
    diagnosis = cli_json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
    assert (diagnosis["batch"], diagnosis["tokens_held"]) == (BATCH, WRITTEN)
    assert diagnosis["kv_bytes"] == TENSOR_BYTES
    if given:
        assert diagnosis["step"] == 1 + DECODE  # the last forward
    assert not [note for note in diagnosis["notes"] if "KV layers" in note]
    remedies = {remedy["kind"]: remedy for remedy in diagnosis["remedies"]}
    context = remedies["context"]
    assert context["setting"] == WRITTEN  # max_seq 13 would hold what the run wrote
    assert context["saved_bytes"] == POSITION_BYTES * (MAX_SEQ - WRITTEN) == 52224
    assert f"max_seq_len={MAX_SEQ} positions (1.00 KiB of KV each" in context["sentence"]
    assert "preallocated tensor behind the tracked views" in context["sentence"]
    assert remedies["batch"]["saved_bytes"] == TENSOR_BYTES // BATCH == 32768  # a row of the tensor
    assert "static_cache" not in remedies  # the tensor already is one


def test_whole_views_of_one_tensor_give_its_capacity(tmp_path, capsys):
    # GIVEN the README's kvtrace.track(kv[l, 0], ...): whole views, tracked once before the forwards
    torch.manual_seed(0)
    model = _decoder("bshd").eval()
    with kvtrace.record(tmp_path / "run", profiler=False):
        for layer in range(LAYERS):
            for index, kind in enumerate("kv"):
                kvtrace.track(model.kv[layer, index], layer=layer, kind=kind, layout="bshd")
        with torch.inference_mode():
            model(torch.randint(0, VOCAB, (BATCH, PROMPT)), 0)

    # THEN no line says more room than the views' length, and the report takes that length, 64, for the
    # tensor's capacity: 512 B a token of a row, as for views cut to the tokens
    lines = (tmp_path / "run" / "kv_events.jsonl").read_text().splitlines()
    assert not [line for line in lines if "capacity_tokens" in line]
    kv = report_json(tmp_path / "run", capsys)["kv"]
    assert (kv["capacity_rows"], kv["capacity_tokens"], kv["capacity_of"]) == (BATCH, MAX_SEQ, "tracked")
    assert kv["bytes_per_token_measured"] == TOKEN_BYTES == 512
    # AND diagnose prices its context in those 64 positions; the tokens written are not known
    remedies = cli_json(["diagnose", str(tmp_path / "run"), "--json"], capsys)["remedies"]
    context = next(remedy for remedy in remedies if remedy["kind"] == "context")
    assert (context["setting"], context["saved_bytes"]) == (MAX_SEQ - 1, POSITION_BYTES)
    assert "at most in this run" not in context["sentence"]


def _memory_events(run: Path) -> list[dict[str, Any]]:
    """The `[memory]` events of the run's profiler trace, as the file has them."""
    (trace,) = (run / "profiler").glob("*.pt.trace.json")
    return [
        event for event in json.loads(trace.read_text())["traceEvents"] if event.get("name") == "[memory]"
    ]


@pytest.mark.parametrize("given", [True, False], ids=["model-given", "bare-loop"])
def test_a_tensor_made_before_the_block_is_kv_from_the_traces_first_event(
    tmp_path, watched_models, capsys, given
):
    # GIVEN the tensor made with the model, before record(), and the views tracked after each forward with
    # the profiler on (the default): the KV log first sees it after the prefill, the trace never allocates it
    torch.manual_seed(0)
    model = _decoder("bhsd").eval()
    watched_models.append(model)
    _record(tmp_path / "run", model, given, profiler=True)
    events = _memory_events(tmp_path / "run")
    assert events and all(event["args"].get("Addr") for event in events)
    assert not [
        event for event in events if event["args"].get("Addr") == model.kv.untyped_storage().data_ptr()
    ]

    # THEN the device's KV is the whole tensor from the trace's first event to its last, 65,536 B (it was 0:
    # the log's sighting, after the trace began, was taken for a storage the trace should have allocated)
    weights = WEIGHT_BYTES if given else 0  # a bare loop lists no weights
    _, report = build_report(tmp_path / "run")
    (timeline,) = report.timelines
    assert (timeline.start_by_category["kv"], timeline.start_by_category["weights"]) == (
        TENSOR_BYTES,
        weights,
    )
    assert set(timeline.by_category["kv"].tolist()) == {TENSOR_BYTES}
    (device,) = report.devices
    assert device.categories_at_peak["kv"] == TENSOR_BYTES == 65536
    assert device.categories_at_peak["weights"] == weights
    assert device.final_allocated_bytes >= weights + TENSOR_BYTES
    # AND the report's KV at the peak says so, as the KV log does
    kv = report_json(tmp_path / "run", capsys)
    assert kv["categories_at_peak"]["kv"] == kv["kv"]["peak_bytes"] == kv["kv"]["final_bytes"] == TENSOR_BYTES

    # AND diagnose's moment holds the tensor, 65,536 B of KV for its 2 rows
    diagnosis = cli_json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
    assert (diagnosis["kv_bytes"], diagnosis["batch"]) == (TENSOR_BYTES, BATCH)
    # AND its step's end state holds every layer's views, tracked after the forward returned: no note that
    # the step "stopped before the others held any" (the prefill's peak, 8 tokens written of each row)
    assert not [note for note in diagnosis["notes"] if "KV layers" in note], diagnosis["notes"]
    if given:
        assert (diagnosis["step"], diagnosis["tokens_held"]) == (1, PROMPT)


@pytest.mark.parametrize("cut_rows", [True, False], ids=["views-of-rows-in-use", "views-of-every-row"])
def test_views_of_a_tensor_with_more_rows_than_fed_are_priced_by_its_max_batch(
    tmp_path, watched_models, capsys, cut_rows
):
    # GIVEN the tensor made for 4 rows (max_batch), fed 2 (BATCH) in Meta's bshd layout, its layers' K and V
    # tracked after each forward as views cut to the tokens written and either to the 2 rows in use
    # (kv[l, 0, :2, :pos]) or over every row (kv[l, 0, :, :pos], the README's form)
    max_batch = 2 * BATCH
    torch.manual_seed(0)
    model = OneTensorDecoder(
        Shape(LAYERS, DIM, HEADS, KV_HEADS, HEAD_DIM, VOCAB, max_batch, MAX_SEQ), "bshd"
    ).eval()
    watched_models.append(model)
    tensor = LAYERS * 2 * max_batch * MAX_SEQ * KV_HEADS * HEAD_DIM * FP32  # 131,072 B
    rows = BATCH if cut_rows else None

    def track(end: int) -> None:
        for layer in range(LAYERS):
            for index, kind in enumerate("kv"):
                kvtrace.track(model.view(layer, index, end, rows), layer=layer, kind=kind, layout="bshd")

    with kvtrace.record(tmp_path / "run", model=model, profiler=False), torch.inference_mode():
        logits = model(torch.randint(0, VOCAB, (BATCH, PROMPT)), 0)
        track(PROMPT)
        for pos in range(PROMPT, WRITTEN):
            logits = model(logits[:, -1:].argmax(-1), pos)
            track(pos + 1)

    # THEN the report's capacity is the tensor's 4 rows x 64 positions, a token of a row 131,072 / (4 x 64)
    # = 512 B, the arithmetic (not 131,072 / (2 x 64) = 1,024 from the rows the views show), and the rows
    # written the 2 fed (not the 4 a view of every row spans)
    kv = report_json(tmp_path / "run", capsys)["kv"]
    assert kv["final_bytes"] == model.kv.nbytes == tensor
    assert (kv["capacity_rows"], kv["capacity_tokens"], kv["capacity_of"]) == (max_batch, MAX_SEQ, "tracked")
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == TOKEN_BYTES == 512
    assert (kv["tokens_held"], kv["batch"]) == (WRITTEN, BATCH)
    # AND diagnose prices a row of the tensor as 131,072 / 4 = 32,768 B: max_batch_size 2 instead of 4
    # frees 2 of them
    diagnosis = cli_json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
    assert diagnosis["batch"] == BATCH
    batch = next(remedy for remedy in diagnosis["remedies"] if remedy["kind"] == "batch")
    assert (batch["setting"], batch["saved_bytes"]) == (BATCH, 2 * tensor // max_batch)
    assert f"max_batch_size={max_batch}" in batch["sentence"], batch["sentence"]
