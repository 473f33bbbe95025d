"""Meta's reference Llama 3 (`llama-models`): a custom cache, preallocated per attention module as
`cache_k` / `cache_v` and written in place, found and followed by the recorder without any HF cache."""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import assert_well_ordered

import kvtrace
from kvtrace.format import read_run

fairscale_init = pytest.importorskip("fairscale.nn.model_parallel.initialize")
llama3_model = pytest.importorskip("llama_models.llama3.model")

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 64, 2, 4, 2, 256
LLAMA3_VOCAB = 128256  # the Llama 3 tokenizer's: its output projection is most of a small model's forward
MAX_BATCH, MAX_SEQ = 2, 32
PROMPT_LEN, DECODE_STEPS = 6, 3


@contextlib.contextmanager
def _reference_model(
    tmp_path,
    watched_models,
    max_batch: int = MAX_BATCH,
    dtype: torch.dtype = torch.float32,
    vocab: int = VOCAB,
) -> Iterator[torch.nn.Module]:
    """The reference Transformer on one CPU process: model parallelism of size 1 over gloo."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        fairscale_init.initialize_model_parallel(1)
        try:
            torch.manual_seed(0)
            args = llama3_model.ModelArgs(
                dim=DIM,
                n_layers=N_LAYERS,
                n_heads=N_HEADS,
                n_kv_heads=N_KV_HEADS,
                vocab_size=vocab,
                max_batch_size=max_batch,
                max_seq_len=MAX_SEQ,
            )
            model = llama3_model.Transformer(args).to(dtype).eval()
            with torch.no_grad():  # the reference code leaves its weights uninitialised (torch.empty)
                for param in model.parameters():
                    param.normal_(0.0, 0.02)
            watched_models.append(model)
            yield model
            watched_models.remove(model)
        finally:
            fairscale_init.destroy_model_parallel()
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture
def reference_model(tmp_path, watched_models) -> Iterator[torch.nn.Module]:
    with _reference_model(tmp_path, watched_models) as model:
        yield model


@pytest.mark.parametrize("call", ["model(...)", "model.forward(...)"])
def test_reference_llama3_module_caches(reference_model, tmp_path, call):
    model = reference_model

    # Meta's own Llama3.generate calls `self.model.forward(tokens[:, prev_pos:cur_pos], prev_pos)`, past
    # any forward hook; other code calls the module
    def forward(*args):
        return model.forward(*args) if call == "model.forward(...)" else model(*args)

    head_dim = DIM // N_HEADS
    cache_bytes = MAX_BATCH * MAX_SEQ * N_KV_HEADS * head_dim * 4  # float32, allocated at full length
    cache_addrs = {
        (layer, kv): getattr(block.attention, f"cache_{kv}").untyped_storage().data_ptr()
        for layer, block in enumerate(model.layers)
        for kv in ("k", "v")
    }
    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS))

    # WHEN a prefill and a few decode steps run, the way llama_models' generation loop calls the model
    with kvtrace.record(tmp_path / "run", model=model, profiler=False), torch.inference_mode():
        forward(tokens[:, :PROMPT_LEN], 0)
        for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
            forward(tokens[:, pos : pos + 1], pos)

    run = read_run(tmp_path / "run")
    assert run.manifest["ended"]["status"] == "ok"
    geometry = run.manifest["model"]
    assert (geometry["num_layers"], geometry["num_kv_heads"], geometry["head_dim"]) == (
        N_LAYERS,
        N_KV_HEADS,
        head_dim,
    )
    assert_well_ordered(run.kv_events)
    module_events = [e for e in run.kv_events if e.source == "module"]
    assert module_events == run.kv_events, "only the module caches hold KV here"

    # THEN every layer's cache_k and cache_v is one storage of the arithmetic size and shape ...
    storages = {(e.layer, e.kv): e.addr for e in module_events}
    assert storages == cache_addrs
    assert len(set(storages.values())) == 2 * N_LAYERS
    for event in module_events:
        assert event.storage_bytes == cache_bytes, event
        assert event.shape == [MAX_BATCH, MAX_SEQ, N_KV_HEADS, head_dim], event

    # ... created once, then written in place at every step: prefill, then decode.
    steps = range(1, 1 + 1 + DECODE_STEPS)
    for layer, kv in cache_addrs:
        events = [e for e in module_events if (e.layer, e.kv) == (layer, kv) and e.event != "freed"]
        assert events[0].event == "created"
        written = [e for e in events if e.event == "written"]
        assert [e.step for e in written] == list(steps), (layer, kv, events)
        assert [e.phase for e in written] == ["prefill"] + ["decode"] * DECODE_STEPS
        assert [e.tokens for e in written] == list(range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS + 1))
        assert len(events) == 1 + len(written)

    # The caches are KV, not weights.
    assert not {w.addr for w in run.weights} & set(cache_addrs.values())


def test_reference_llama3_buffers_count_as_kv_with_the_profiler_on(reference_model, tmp_path, capsys):
    # GIVEN the reference model, whose KV buffers exist before record(): no allocation of the trace is theirs
    from kvtrace.cli import main

    model = reference_model
    kv_total = 2 * N_LAYERS * MAX_BATCH * MAX_SEQ * N_KV_HEADS * (DIM // N_HEADS) * 4
    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + 1))
    for name, profiler in (("on", True), ("off", False)):
        with kvtrace.record(tmp_path / name, model=model, profiler=profiler, snapshots=False):
            model(tokens[:, :PROMPT_LEN], 0)
            model(tokens[:, PROMPT_LEN:], PROMPT_LEN)
    reports = {}
    for name in ("on", "off"):
        assert main(["report", str(tmp_path / name), "--json", "--no-export"]) == 0
        reports[name] = json.loads(capsys.readouterr().out)
    # THEN with the profiler on as off, the buffers are KV held from the start: at the peak, and at the end
    for name, report in reports.items():
        (device,) = report["devices"]
        assert device["categories_at_peak"]["kv"] == kv_total, name
        assert report["kv"]["final_bytes"] == kv_total
    weights = sum(w.storage_bytes for w in read_run(tmp_path / "on").weights)
    assert reports["on"]["devices"][0]["final_allocated_bytes"] >= weights + kv_total
    # AND a budget below weights + buffers is crossed before the first step, not at the prefill
    budget = weights + kv_total - 1024
    assert main(["diagnose", str(tmp_path / "on"), "--budget", str(budget), "--json"]) == 0
    crossing = json.loads(capsys.readouterr().out)["budget_crossing"]
    assert crossing["before_first_step"] is True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_reference_llama3_tokens_rows_and_steps_follow_the_decode_loop(
    tmp_path, watched_models, capsys, dtype
):
    # GIVEN the reference model with room for 3 rows, run on a batch of 2: its caches are allocated for
    # max_batch_size x max_seq_len, written at [:2, start_pos : start_pos + seqlen] by each forward (in
    # bfloat16, a `.to()` copy made in inference mode, whose in-place writes bump no version counter)
    from kvtrace.cli import main

    max_batch, batch = 3, 2
    with _reference_model(tmp_path, watched_models, max_batch, dtype) as model:
        tokens = torch.randint(0, VOCAB, (batch, PROMPT_LEN + DECODE_STEPS))
        # WHEN a prefill and the decode steps run, as llama_models' generation loop calls the model
        with kvtrace.record(tmp_path / "run", model=model, profiler=False):
            model(tokens[:, :PROMPT_LEN], 0)
            for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
                model(tokens[:, pos : pos + 1], pos)

    forwards = 1 + DECODE_STEPS
    run = read_run(tmp_path / "run")
    # THEN each forward's events hold the tokens it wrote per row, over the rows it used: step 0 (the
    # caches found before any forward) holds none known, then the prompt, then one more per decode step
    written = [
        (e.step, e.phase, e.tokens, e.rows)
        for e in run.kv_events
        if e.event != "freed" and (e.layer, e.kv) == (0, "k")
    ]
    expected = [(0, "", 0, 0)] + [
        (step, "prefill" if step == 1 else "decode", PROMPT_LEN + step - 1, batch)
        for step in range(1, forwards + 1)
    ]
    assert written == expected
    assert {(e.tokens, e.rows) for e in run.kv_events if e.step == forwards and e.event != "freed"} == {
        (PROMPT_LEN + DECODE_STEPS, batch)
    }
    # AND the report counts the forwards, the tokens and rows held, and the bytes of the whole buffers
    itemsize = torch.tensor([], dtype=dtype).element_size()
    one_buffer = max_batch * MAX_SEQ * N_KV_HEADS * (DIM // N_HEADS)  # elements
    capsys.readouterr()  # fairscale's own lines
    assert main(["report", str(tmp_path / "run"), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == forwards
    kv = report["kv"]
    assert (kv["tokens_held"], kv["batch"]) == (PROMPT_LEN + DECODE_STEPS, batch)
    assert kv["token_rows"] == (PROMPT_LEN + DECODE_STEPS) * batch
    assert kv["final_bytes"] == 2 * N_LAYERS * one_buffer * itemsize
    # the buffers start in float32; in bfloat16 the first forward copies each (`.to()`)
    copies = 0 if dtype == torch.float32 else 2 * N_LAYERS * one_buffer * itemsize
    assert kv["allocated_bytes_total"] == 2 * N_LAYERS * one_buffer * 4 + copies
    # AND compare's generated tokens are 1 per forward and row (the prefill's yield, then one per step)
    assert main(["compare", str(tmp_path / "run"), str(tmp_path / "run"), "--json"]) == 0
    (figures, _) = json.loads(capsys.readouterr().out)["runs"]
    assert (figures["steps"], figures["batch"]) == (forwards, batch)
    assert figures["generated_tokens_per_row"] == forwards
    rate_all, rate_row = figures["tokens_per_second"], figures["tokens_per_second_per_row"]
    assert rate_all == pytest.approx(rate_row * batch)
    assert run.manifest["warnings"] == []


def _without_clock_base(run_dir: Path, copy: Path) -> None:
    """A copy of the run whose profiler trace lost its top-level baseTimeNanoseconds (another tool's edit)."""
    shutil.copytree(run_dir, copy)
    (path,) = (copy / "profiler").glob("*.pt.trace.json*")
    opener: Any = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        trace = json.load(fh)
    del trace["baseTimeNanoseconds"]
    with opener(path, "wt", encoding="utf-8") as fh:
        json.dump(trace, fh)


def test_reference_llama3_converted_to_bfloat16_keeps_its_trace_clock_and_all_its_kv(
    tmp_path, watched_models, capsys
):
    # GIVEN the reference model converted with `.to(torch.bfloat16)`: its cache_k / cache_v are plain
    # attributes, made in float32 and left so, which the first forward copies (`self.cache_k.to(xq)`). The
    # bfloat16 buffers are allocated inside the prefill, in the trace, and the recorder's scan finds them at
    # the forward's end, after the Llama 3 vocabulary's output projection: long after their allocation.
    from kvtrace.cli import main

    with _reference_model(tmp_path, watched_models, dtype=torch.bfloat16, vocab=LLAMA3_VOCAB) as model:
        tokens = torch.randint(0, LLAMA3_VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS))
        # WHEN a prefill and decode steps run with the profiler on, as llama_models' generation loop calls
        with kvtrace.record(tmp_path / "run", model=model, snapshots=False), torch.inference_mode():
            model.forward(tokens[:, :PROMPT_LEN], 0)
            for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
                model.forward(tokens[:, pos : pos + 1], pos)
    _without_clock_base(tmp_path / "run", tmp_path / "no_base")
    capsys.readouterr()  # fairscale's own lines
    reports = {}
    for name in ("run", "no_base"):
        assert main(["report", str(tmp_path / name), "--json", "--no-export"]) == 0
        reports[name] = json.loads(capsys.readouterr().out)

    # THEN every bfloat16 buffer, live from the prefill to the end, is KV at the peak: layers x K and V x
    # max_batch_size x max_seq_len x KV heads x head_dim x 2 bytes, joined by the KV log
    kv_total = N_LAYERS * 2 * MAX_BATCH * MAX_SEQ * N_KV_HEADS * (DIM // N_HEADS) * 2
    (device,) = reports["run"]["devices"]
    assert device["categories_at_peak"]["kv"] == kv_total
    assert device["attributed_bytes_by_method"]["kv_log"] == kv_total
    # ... and the trace, whose clock base is right, is read as it is: no note says it was moved
    assert reports["run"]["notes"] == []
    # AND a copy whose trace lost its base is put back on the run's clock with every buffer KV, as it says
    (device,) = reports["no_base"]["devices"]
    assert device["categories_at_peak"]["kv"] == kv_total
    assert device["attributed_bytes_by_method"]["kv_log"] == kv_total
    (note,) = reports["no_base"]["notes"]
    assert note.startswith("the profiler trace's baseTimeNanoseconds is missing: its events were put on")
