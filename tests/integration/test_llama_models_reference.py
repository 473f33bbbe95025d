"""Meta's reference Llama 3 (`llama-models`): a custom cache, preallocated per attention module as
`cache_k` / `cache_v` and written in place, found and followed by the recorder without any HF cache."""

from __future__ import annotations

import contextlib
import gzip
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import assert_well_ordered

import kvtrace
from kvtrace.run_reader import read_run

fairscale_init = pytest.importorskip("fairscale.nn.model_parallel.initialize")
llama3_model = pytest.importorskip("llama_models.llama3.model")

DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 64, 2, 4, 2, 256
LLAMA3_VOCAB = 128256  # the Llama 3 tokenizer's: its output projection is most of a small model's forward
MAX_BATCH, MAX_SEQ = 2, 32
PROMPT_LEN, DECODE_STEPS = 6, 3
# fp8 buffers and transformers' int4 QuantizedCache (not priced): the quantized remedies of fp32 buffers
_QUANTIZED = {("quantized_kv", 8), ("quantized_kv", 4)}


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


def _decode_loop(
    forward: Callable[..., Any], tokens: torch.Tensor, written: int = PROMPT_LEN + DECODE_STEPS
) -> None:
    """A prefill of PROMPT_LEN positions, then one decode step per position up to `written`, as llama_models'
    generation loop calls the model: `forward(tokens, start_pos)`."""
    forward(tokens[:, :PROMPT_LEN], 0)
    for pos in range(PROMPT_LEN, written):
        forward(tokens[:, pos : pos + 1], pos)


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
        _decode_loop(forward, tokens)

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
    assert main(["diagnose", str(tmp_path / "on"), "--budget", f"{budget}B", "--json"]) == 0
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
            _decode_loop(model, tokens)

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
    # AND a byte per token is a slot's of the buffers (max_batch_size x max_seq_len), the arithmetic
    assert kv["bytes_per_token_measured"] == kv["final_bytes"] / (max_batch * MAX_SEQ)
    assert kv["bytes_per_token_measured"] == N_LAYERS * 2 * N_KV_HEADS * (DIM // N_HEADS) * itemsize
    # AND diagnose offers no static cache: the buffers already are one (bfloat16's transient is the `.to()`
    # of the float32 buffers, not a dynamic cache's torch.cat)
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    kinds = {r["kind"] for r in json.loads(capsys.readouterr().out)["remedies"]}
    assert "static_cache" not in kinds and {"batch", "context"} <= kinds


def test_reference_llama3_remedies_are_priced_in_max_batch_size_and_max_seq_len(
    tmp_path, watched_models, capsys
):
    # GIVEN the reference model with room for 4 rows of 32 positions, run on 2 rows: its float32 buffers
    # are allocated once, whatever the rows and tokens written
    from kvtrace.cli import main

    max_batch, rows = 4, 2
    head_dim = DIM // N_HEADS
    written = PROMPT_LEN + DECODE_STEPS  # tokens per row the forwards wrote
    per_row = 2 * N_LAYERS * MAX_SEQ * N_KV_HEADS * head_dim * 4  # a row of max_batch_size, K and V
    per_position = 2 * N_LAYERS * max_batch * N_KV_HEADS * head_dim * 4  # a position of max_seq_len
    kv_total = max_batch * per_row
    assert kv_total == MAX_SEQ * per_position == 65536
    with _reference_model(tmp_path, watched_models, max_batch) as model:
        tokens = torch.randint(0, VOCAB, (rows, written))
        # profiler=False: the peak is the weights and the buffers, so a budget gives an exact shortfall
        with kvtrace.record(tmp_path / "run", model=model, profiler=False):
            _decode_loop(model, tokens, written)
    run = tmp_path / "run"
    weights = sum(w.storage_bytes for w in read_run(run).weights)
    capsys.readouterr()  # fairscale's own lines

    # THEN the report's bytes per token are a slot's (the buffers over max_batch_size x max_seq_len), the
    # arithmetic, not the buffers over the 9 tokens x 2 rows written
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    arithmetic = N_LAYERS * 2 * N_KV_HEADS * head_dim * 4
    assert (kv["batch"], kv["tokens_held"], kv["token_rows"]) == (rows, written, rows * written)
    assert (kv["capacity_rows"], kv["capacity_tokens"]) == (max_batch, MAX_SEQ)
    assert kv["bytes_per_token_measured"] == kv_total / (max_batch * MAX_SEQ) == arithmetic == 512
    assert kv["bytes_per_token_expected"] == arithmetic
    (cache,) = kv["caches"]
    assert cache["bytes_per_token_measured"] == 512
    assert main(["report", str(run), "--no-export"]) == 0
    text = capsys.readouterr().out
    per_written = f"{kv_total / (rows * written):,.1f}"
    assert f"measured 512.0 (the buffers' {MAX_SEQ} positions x {max_batch} rows" in text
    assert f"the {written} tokens x {rows} rows written hold {per_written} each), arithmetic 512" in text

    def remedies(*flags: str) -> tuple[dict[str, object], dict[tuple[str, object], dict[str, object]]]:
        assert main(["diagnose", str(run), "--json", *flags]) == 0
        data = json.loads(capsys.readouterr().out)
        return data, {(r["kind"], r["setting"]): r for r in data["remedies"]}

    # WHEN the run is diagnosed against a budget 20000 B short of weights + buffers
    need = 20000
    data, priced = remedies("--budget", f"{weights + kv_total - need}B")
    assert (data["shortfall_bytes"], data["kv_bytes"]) == (need, kv_total)
    # THEN fewer rows or a shorter context are not offered as freeing KV: a smaller max_batch_size is, the
    # largest that leaves room for the shortfall (4 x (65536 - 20000) / 65536 = 2.8 -> 2), 2 rows of 16 KiB
    assert set(priced) == {("batch", 2), ("context", 22), ("sliding_window", 22), *_QUANTIZED}
    batch = priced[("batch", 2)]
    assert (batch["saved_bytes"], batch["fits"]) == (2 * per_row, True) == (32768, True)
    assert "Fewer rows in use (this run writes up to 2) free no KV" in str(batch["sentence"])
    assert "max_batch_size=2 instead of 4 frees 32.00 KiB, enough to fit." in str(batch["sentence"])
    # ... and a smaller max_seq_len: 32 x 45536 / 65536 = 22.2 -> 22, freeing 10 positions of 2 KiB
    context = priced[("context", 22)]
    assert (context["saved_bytes"], context["fits"]) == (10 * per_position, True) == (20480, True)
    assert "A shorter context frees no KV" in str(context["sentence"])
    assert "(9 at most in this run). max_seq_len=22 instead of 32 frees 20.00 KiB" in str(context["sentence"])
    window = priced[("sliding_window", 22)]
    assert window["saved_bytes"] == 20480 and "needs the model's code changed" in str(window["sentence"])
    # fp8 buffers keep 8 of the 32 bits (the model's code changed); transformers' int4 cache is no remedy
    fp8 = priced[("quantized_kv", 8)]
    assert (fp8["saved_bytes"], fp8["fits"]) == (kv_total * 3 // 4, True)
    assert "need the model's code changed" in str(fp8["sentence"])
    assert priced[("quantized_kv", 4)]["saved_bytes"] is None

    # WHEN 50000 B are missing: max_batch_size=1 frees 3 rows, 49152 B, not enough; max_seq_len=7
    # (32 x 15536 / 65536 = 7.6) frees 25 positions, 51200 B, below the 9 tokens this run writes
    need = 50000
    data, priced = remedies("--budget", f"{weights + kv_total - need}B")
    assert data["shortfall_bytes"] == need
    batch = priced[("batch", None)]
    assert (batch["saved_bytes"], batch["fits"]) == (3 * per_row, False) == (49152, False)
    assert "Even max_batch_size=1 frees only 48.00 KiB" in str(batch["sentence"])
    context = priced[("context", 7)]
    assert (context["saved_bytes"], context["fits"]) == (25 * per_position, True) == (51200, True)
    assert "with at most 7 tokens (this run writes up to 9)" in str(context["sentence"])

    # WHEN there is no budget: the settings the run itself needs, 2 rows and 9 positions
    data, priced = remedies()
    assert data["shortfall_bytes"] is None
    assert priced[("batch", 2)]["saved_bytes"] == 2 * per_row
    assert priced[("context", 9)]["saved_bytes"] == (MAX_SEQ - 9) * per_position == 47104


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
            _decode_loop(model.forward, tokens)
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
    # AND diagnose prices fp8 buffers against the bfloat16 copies the peak held, not the float32 buffers they
    # were copied from, which the scan's span of the prefill holds too
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    assert diagnosis["kv_bytes"] == kv_total
    fp8 = {(r["kind"], r["setting"]): r for r in diagnosis["remedies"]}[("quantized_kv", 8)]
    assert fp8["saved_bytes"] == kv_total // 2
    assert "held at 16 bits" in str(fp8["sentence"])


def _trace_memory(run_dir: Path) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """The run's profiler trace file, its JSON, and its `[memory]` events (in file order)."""
    (path,) = (run_dir / "profiler").glob("*.pt.trace.json*")
    raw = path.read_bytes()
    trace = json.loads(gzip.decompress(raw) if path.name.endswith(".gz") else raw)
    return path, trace, [e for e in trace["traceEvents"] if e.get("name") == "[memory]"]


def _with_buffer_frees(run_dir: Path) -> None:
    """Give the run's trace the frees a GPU's trace reports of blocks allocated before it started (a CPU's
    lacks them): each buffer the KV log saw replaced and freed, just after its replacement's allocation (the
    latest of its address and size by the `replaced` line), where `self.cache_k = self.cache_k.to(xq)` lets
    the old one go."""
    events = read_run(run_dir).kv_events
    replaced = {e.prev_addr: e for e in events if e.event == "replaced"}
    path, trace, _memory = _trace_memory(run_dir)
    base_us = trace["baseTimeNanoseconds"] / 1000.0
    listed = trace["traceEvents"]
    for freed in (e for e in events if e.event == "freed" and e.addr in replaced):
        new = replaced[freed.addr]
        made = [
            i
            for i, e in enumerate(listed)
            if e.get("name") == "[memory]"
            and (e["args"]["Addr"], e["args"]["Bytes"]) == (new.addr, new.storage_bytes)
            and base_us + e["ts"] <= new.t_ns / 1000.0
        ][-1]
        free = json.loads(json.dumps(listed[made]))
        free["args"].update({"Addr": freed.addr, "Bytes": -freed.storage_bytes})
        listed.insert(made + 1, free)
    written = json.dumps(trace).encode()
    path.write_bytes(gzip.compress(written) if path.name.endswith(".gz") else written)


def test_reference_llama3_converted_inside_the_block_holds_its_float32_buffers_until_the_first_forward(
    tmp_path, watched_models, capsys
):
    # GIVEN the reference model in float32, its cache_k / cache_v allocated with it, before record(), and
    # converted with `.to(torch.bfloat16)` inside the block: the buffers stay float32 until the first
    # forward copies them (`self.cache_k.to(xq)`), a free the CPU profiler does not report (it never saw
    # them allocated)
    from test_gpu_allocator_totals import _as_cuda, _block

    from kvtrace.cli import main

    max_batch, rows = 4, 2
    head_dim = DIM // N_HEADS
    run = tmp_path / "run"

    def storage_bytes(model: torch.nn.Module) -> list[int]:
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (*model.parameters(), *model.buffers())
        }
        return list(storages.values())

    with _reference_model(tmp_path, watched_models, max_batch) as model:
        weights = storage_bytes(model)
        tokens = torch.randint(0, VOCAB, (rows, PROMPT_LEN + DECODE_STEPS))
        # WHEN it is converted and run inside the block, profiler on
        with kvtrace.record(run, model=model, snapshots=False), torch.inference_mode():
            model.to(torch.bfloat16)
            _decode_loop(model.forward, tokens)
        converted = storage_bytes(model)
    capsys.readouterr()  # fairscale's own lines
    buffers = N_LAYERS * 2 * max_batch * MAX_SEQ * N_KV_HEADS * head_dim * 4
    assert buffers == 65536
    _path, _trace, memory = _trace_memory(run)
    first_allocation = min(memory, key=lambda e: e["ts"])["args"]["Bytes"]
    assert first_allocation > 0
    first_free_us = min(e.t_ns for e in read_run(run).kv_events if e.event == "freed") / 1000.0

    def figures(run_dir: Path) -> tuple[dict[str, Any], int]:
        """The run's report device, checked against compare's peak, and the export's level at its start."""
        assert main(["report", str(run_dir), "--json", "--no-export", "-q"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert main(["compare", str(run_dir), str(run_dir), "--json"]) == 0
        (compared, _) = json.loads(capsys.readouterr().out)["runs"]
        assert compared["peak_bytes"] == report["peak_allocated_bytes"]
        out = run_dir.parent / f"{run_dir.name}_tables"
        assert main(["export", str(run_dir), "-o", str(out)]) == 0
        capsys.readouterr()
        assert main(["query", str(out), "--json", "SELECT baseline_bytes FROM devices"]) == 0
        ((level,),) = (row.values() for row in json.loads(capsys.readouterr().out))
        (device,) = report["devices"]
        return device, level

    # THEN the level at the block's start holds the float32 weights and buffers, ...
    device, level = figures(run)
    assert level == sum(weights) + buffers
    # ... the peak is at least that level and the trace's first allocation (the first bfloat16 weight),
    # before the buffers go, with all of them KV at the peak
    assert device["peak_allocated_bytes"] >= level + first_allocation
    assert device["peak_time"] < first_free_us
    assert device["categories_at_peak"]["kv"] == buffers
    # A process that profiled before (earlier tests) may see torch's CPU reporter free blocks of this trace
    # at sizes an earlier session left it, or free a block allocated before the trace at an address the
    # trace reuses later (a known limit: the level before such a trace is a lower bound); the end and the
    # CUDA rewrite are checked on a trace whose every free is of a block it allocated, at its size
    live: dict[Any, int] = {}
    for event in sorted(memory, key=lambda e: e["ts"]):
        addr, size = event["args"].get("Addr"), event["args"]["Bytes"]
        if size > 0:
            live[addr] = size
        elif live.pop(addr, None) != -size:
            return
    # ... and they are gone by the end: the bfloat16 weights and buffers are what is left
    assert device["final_allocated_bytes"] == sum(converted) + buffers // 2

    # AND as CUDA writes the same run (blocks of 512 B; totals that count from the process's start, the
    # float32 buffers included), with the buffers' frees in its trace (a GPU reports them) or without,
    # the buffers count once: in the level at the start (not added to what the totals count), at the
    # peak, and gone by the end
    found = []
    for name, frees in (("cuda_frees", True), ("cuda", False)):
        shutil.copytree(run, tmp_path / name)
        if frees:
            _with_buffer_frees(tmp_path / name)
        _as_cuda(tmp_path / name, blocks=True, kv_held=buffers)
        on_cuda, level = figures(tmp_path / name)
        assert on_cuda["device"] == "cuda:0"
        assert level == sum(_block(n) for n in weights) + buffers
        assert on_cuda["peak_allocated_bytes"] >= level + _block(first_allocation)
        assert on_cuda["peak_time"] < first_free_us
        assert on_cuda["categories_at_peak"]["kv"] == buffers
        assert on_cuda["final_allocated_bytes"] == sum(_block(n) for n in converted) + buffers // 2
        found.append(on_cuda)
    assert found[0] == found[1]


def test_plan_from_a_reference_run_is_its_preallocated_buffers(reference_model, tmp_path, capsys):
    from kvtrace.cli import main

    # GIVEN a prefill and a few decode steps of the reference model, its buffers MAX_BATCH x MAX_SEQ
    model = reference_model
    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS))
    with kvtrace.record(tmp_path / "run", model=model, profiler=False), torch.inference_mode():
        _decode_loop(model.forward, tokens)
    buffers = N_LAYERS * 2 * MAX_BATCH * MAX_SEQ * N_KV_HEADS * (DIM // N_HEADS) * 4  # float32
    # WHEN planned from the run alone
    assert main(["plan", "--from-run", str(tmp_path / "run"), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # THEN a static cache of the buffers' rows and positions: the run's own KV, and notes that say why
    assert (plan["request"]["cache"], plan["request"]["batch"]) == ("static", MAX_BATCH)
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (buffers, buffers)
    assert any("preallocated buffers" in note for note in plan["notes"])
    assert any("no Hugging Face config" in note for note in plan["notes"])
    assert not any("recorded before" in note for note in plan["notes"])


def test_diagnose_of_a_reference_run_without_the_profiler_gives_the_rows_and_tokens_written(
    tmp_path, watched_models, capsys
):
    # GIVEN the reference model with room for 4 rows, run on 3 with profiler=False: its peak, weights and
    # buffers, is reached before the first forward (the buffers are made with the model) and held to the end
    from kvtrace.cli import main

    max_batch, rows = 4, 3
    written = PROMPT_LEN + DECODE_STEPS
    with _reference_model(tmp_path, watched_models, max_batch) as model:
        tokens = torch.randint(0, VOCAB, (rows, written))
        with kvtrace.record(tmp_path / "run", model=model, profiler=False):
            _decode_loop(model, tokens, written)
    run = tmp_path / "run"
    weights = sum(w.storage_bytes for w in read_run(run).weights)
    kv_total = N_LAYERS * 2 * max_batch * MAX_SEQ * N_KV_HEADS * (DIM // N_HEADS) * 4
    capsys.readouterr()  # fairscale's own lines

    # WHEN it is diagnosed, alone and against a budget 1 KiB short of weights + buffers
    for flags in ((), ("--budget", f"{weights + kv_total - 1024}B")):
        assert main(["diagnose", str(run), "--json", *flags]) == 0
        data = json.loads(capsys.readouterr().out)
        # THEN the peak's moment is its level's last, the end of the last forward: the rows in use and the
        # tokens each wrote, not the buffers' max_batch_size before anything was written (4 x 0 at step 0)
        assert data["allocated_bytes"] == weights + kv_total, flags
        assert (data["batch"], data["tokens_held"]) == (rows, written), flags
        assert (data["step"], data["step_phase"]) == (1 + DECODE_STEPS, "decode"), flags
        assert main(["diagnose", str(run), *flags]) == 0
        text = capsys.readouterr().out
        assert f"batch x tokens held (end of step {1 + DECODE_STEPS})  {rows} x {written}" in text, text


def test_diagnose_of_a_reference_run_without_the_profiler_names_its_buffers_not_with_stack(
    reference_model, tmp_path, capsys
):
    # GIVEN a reference run recorded with profiler=False: its memory events are the KV log's storages
    from kvtrace.cli import main

    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + 1))
    with kvtrace.record(tmp_path / "run", model=reference_model, profiler=False):
        reference_model(tokens[:, :PROMPT_LEN], 0)
        reference_model(tokens[:, PROMPT_LEN:], PROMPT_LEN)
    capsys.readouterr()  # fairscale's own lines
    kv_total = N_LAYERS * 2 * MAX_BATCH * MAX_SEQ * N_KV_HEADS * (DIM // N_HEADS) * 4
    # WHEN it is diagnosed
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    stacks = json.loads(capsys.readouterr().out)["top_stacks"]
    # THEN its 2 x N_LAYERS buffers are one row that says they are the KV log's, not advice to record
    # with_stack=True, which puts stacks on the profiler's allocations and adds none without it
    (buffers,) = (s for s in stacks if s["allocations"])
    assert (buffers["bytes"], buffers["allocations"]) == (kv_total, 2 * N_LAYERS)
    assert buffers["stack"].startswith("(KV cache storages from the KV log"), buffers
    assert not any("record with with_stack=True" in s["stack"] for s in stacks), stacks
    # AND the weights' row names where they come from, not a trace the run does not have
    (weights,) = (s for s in stacks if not s["allocations"])
    assert weights["stack"].startswith("(the model's weights and KV held before the block"), weights
    assert not any("trace began" in s["stack"] for s in stacks), stacks


def test_plan_from_a_reference_run_takes_max_seq_len_as_a_setting_not_a_position_limit(
    reference_model, tmp_path, capsys
):
    from kvtrace.cli import main

    # GIVEN a reference run whose buffers were built for MAX_SEQ positions: Llama3.build's max_seq_len, a
    # setting of the run (Llama 3.1 takes 131,072 positions whatever it is), not a length it was trained to
    model = reference_model
    tokens = torch.randint(0, VOCAB, (MAX_BATCH, PROMPT_LEN + DECODE_STEPS))
    with kvtrace.record(tmp_path / "run", model=model, profiler=False), torch.inference_mode():
        _decode_loop(model.forward, tokens)
    capsys.readouterr()  # fairscale's own lines
    per_token_row = N_LAYERS * 2 * N_KV_HEADS * (DIM // N_HEADS) * 4  # float32: 512 B
    # WHEN planned at the run's own buffers (the default: --context MAX_SEQ + 1) and at a longer context
    for flags, rows, held in (((), MAX_BATCH, MAX_SEQ), (("--context", "8192", "--batch", "3"), 3, 8191)):
        assert main(["plan", "--from-run", str(tmp_path / "run"), "--json", *flags]) == 0
        plan = json.loads(capsys.readouterr().out)
        # THEN the KV is the buffers' arithmetic at that size, and no note calls the context one past what
        # the model takes, nor the model untrained there: the run does not say how long it was trained
        assert plan["kv_bytes"] == rows * held * per_token_row, flags
        assert plan["request"]["geometry"]["max_position_embeddings"] is None
        assert not any("max_position_embeddings" in note for note in plan["notes"]), plan["notes"]
        (buffers,) = (note for note in plan["notes"] if "preallocated buffers" in note)
        run_flags = f"(this run's: --batch {MAX_BATCH} --context {MAX_SEQ + 1})"
        assert f"--context max_seq_len + 1 {run_flags}" in buffers
        assert main(["plan", "--from-run", str(tmp_path / "run"), *flags]) == 0
        text = capsys.readouterr().out
        assert "positions" not in next(line for line in text.splitlines() if "max context" in line)
