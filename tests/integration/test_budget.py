"""A memory budget (`record(..., gpu_memory=...)`): where the run would have run out, checked against the
KV arithmetic of a real recording, then explained by `diagnose` as an OOM."""

from __future__ import annotations

import html
import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import kvtrace
from analyzers.report import build_report
from analyzers.units import a_or_an, human_bytes
from kvtrace.cli import main
from kvtrace.errors import KvtraceError
from kvtrace.llama import ModelSize
from tests.tiny import record_generate, weights_bytes

PROMPT, NEW_TOKENS, BATCH = 8, 6, 1


def _kv_allocations(size: ModelSize) -> list[tuple[int, int, str, int, int]]:
    """(step, layer, kv, request bytes, device bytes after it) of every KV allocation of a dynamic cache,
    from the arithmetic alone: prefill writes P tokens per layer; each decode step s replaces K then V of
    every layer by a copy one token longer (new storage first, the old one freed right after)."""
    per_token = BATCH * size.num_kv_heads * (size.hidden_size // size.num_heads) * 4  # float32
    live, out = 0, []
    for step in range(1, NEW_TOKENS + 1):
        tokens = PROMPT + step - 1
        for layer in range(size.num_layers):
            for kv in ("k", "v"):
                request = per_token * tokens
                live += request
                out.append((step, layer, kv, request, live))
                if step > 1:
                    live -= per_token * (tokens - 1)
    return out


def _budget_under(
    size: ModelSize, weights: int, which: tuple[int, int, str]
) -> tuple[int, tuple[int, int, str, int, int]]:
    """A budget just under the KV allocation `which` (step, layer, kv), above every one before it: the
    budget, and that allocation (`_kv_allocations`' row)."""
    allocations = _kv_allocations(size)
    target = next(i for i, a in enumerate(allocations) if a[:3] == which)
    return weights + max(a[4] for a in allocations[:target]), allocations[target]


def _record(model: torch.nn.Module, out: Path, gpu_memory: int | str) -> None:
    record_generate(model, out, BATCH, PROMPT, NEW_TOKENS, profiler=False, gpu_memory=gpu_memory)


def _json(argv: list[str]) -> dict:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(argv) == 0
    return json.loads(buffer.getvalue())


def test_crossing_step_layer_and_request_match_the_arithmetic(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    # GIVEN a budget just under the allocation of layer 1's V at decode step 4, and above every earlier one
    weights = weights_bytes(tiny_model)
    budget, (step, layer, _, request, after) = _budget_under(tiny_size, weights, (4, 1, "v"))
    allocations = _kv_allocations(tiny_size)
    assert weights + after > budget  # the test's own premise: this allocation is the first over the line
    # WHEN the run is recorded with that budget and reported
    _record(tiny_model, tmp_path / "run", budget)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["options"]["gpu_memory"] == budget
    crossing = _json(["report", str(tmp_path / "run"), "--json", "-q", "--no-export"])["budget"]
    # THEN the crossing is that allocation: its step, layer, size and the bytes already allocated
    assert crossing["bytes"] == budget and crossing["crossed"] is True
    assert (crossing["step"], crossing["phase"], crossing["layer"]) == (step, "decode", layer)
    assert crossing["request_bytes"] == request and crossing["request_category"] == "kv"
    assert crossing["allocated_before_bytes"] == weights + after - request
    peak = weights + max(a[4] for a in allocations)
    assert crossing["peak_bytes"] == peak and crossing["headroom_bytes"] == budget - peak
    # AND diagnose explains it as an OOM, with remedies priced against the budget at the run's peak
    diagnosis = _json(["diagnose", str(tmp_path / "run"), "--json"])
    assert diagnosis["event"] == "budget" and diagnosis["budget_bytes"] == budget
    assert diagnosis["budget_crossing"]["step"] == step and diagnosis["budget_crossing"]["layer"] == layer
    assert diagnosis["shortfall_bytes"] == peak - budget
    assert any(r["fits"] for r in diagnosis["remedies"])  # dropping a few tokens of KV is enough here
    # remedies fit the device: nothing to offload to the CPU on a CPU run, no CUDA allocator setting
    assert {r["kind"] for r in diagnosis["remedies"]}.isdisjoint({"offloading", "expandable_segments"})
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["diagnose", str(tmp_path / "run")]) == 0
    assert f"at step {step} (decode), layer {layer}" in text.getvalue()


def test_the_notebook_cell_gives_the_budget_verdict_of_the_text_report(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    # GIVEN a run recorded with a budget that layer 0's K crosses at decode step 3
    budget, _ = _budget_under(tiny_size, weights_bytes(tiny_model), (3, 0, "k"))
    _record(tiny_model, tmp_path / "run", budget)
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["report", str(tmp_path / "run"), "-q", "--no-export"]) == 0
    (verdict,) = [line.strip() for line in text.getvalue().splitlines() if line.startswith("  budget ")]
    # WHEN the report is shown in a notebook cell
    _, report = build_report(tmp_path / "run")
    cell = report._repr_html_()
    # THEN the cell says the text report's sentence: the run would run out at that step and layer
    assert "would run out at step 3 (decode), layer 0: a " in verdict
    assert f'<div class="note">{html.escape(verdict)}</div>' in cell


def test_a_budget_that_fits_reports_the_headroom(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    _record(tiny_model, tmp_path / "run", "1GiB")
    peak = weights_bytes(tiny_model) + max(a[4] for a in _kv_allocations(tiny_size))
    crossing = _json(["report", str(tmp_path / "run"), "--json", "-q", "--no-export"])["budget"]
    assert crossing["bytes"] == 2**30 and crossing["crossed"] is False
    assert crossing["headroom_bytes"] == 2**30 - peak and crossing["step"] is None
    # recorded with profiler=False, only the KV cache and weights were seen: the verdict says so
    assert crossing["partial"] is True and "were not recorded" in crossing["counts"]
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["report", str(tmp_path / "run"), "-q", "--no-export"]) == 0
    assert "budget 1.00 GiB: the KV cache and weights fit" in text.getvalue()
    assert "the run may not" in text.getvalue()
    # and a notebook cell says the same
    (verdict,) = [line.strip() for line in text.getvalue().splitlines() if line.startswith("  budget ")]
    assert f"<div>{html.escape(verdict)}</div>" in build_report(tmp_path / "run")[1]._repr_html_()
    # and diagnose gives the headroom, with no "shortfall to cover" row of minus that headroom
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["diagnose", str(tmp_path / "run")]) == 0
    rows = dict(re.findall(r"^  (\S.*?)\s{2,}(\S.*)$", text.getvalue(), flags=re.MULTILINE))
    assert rows["headroom at the peak"] == human_bytes(2**30 - peak)
    assert "shortfall to cover" not in rows


@pytest.mark.parametrize("bad", ["8G", "lots", "-1GiB", 0])
def test_a_bad_budget_is_refused_before_recording(bad: object, tmp_path: Path) -> None:
    with pytest.raises(KvtraceError):
        kvtrace.record(tmp_path / "never", gpu_memory=bad)
    assert not (tmp_path / "never").exists()


# --- kvtrace plan against recordings at the boundary ------------------------------------------------


def _plan(config: Path, *argv: str) -> dict:
    buffer = io.StringIO()
    with redirect_stdout(buffer):  # 1 when it does not fit: the JSON is printed either way
        main(["plan", "--config", str(config), "--dtype", "fp32", "--reserve", "0", "--json", *argv])
    return json.loads(buffer.getvalue())


def _generate(model: torch.nn.Module, out: Path, batch: int, prompt: int, new: int, gpu_memory: int) -> dict:
    """Record generate() of `new` tokens after a `prompt`-token prompt under a budget; the report's JSON."""
    ids = torch.randint(3, 200, (batch, prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(out, model=model, profiler=False, gpu_memory=gpu_memory):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return _json(["report", str(out), "--json", "-q", "--no-export"])


def test_plan_context_is_prompt_plus_new_tokens_of_which_the_last_is_never_written(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    # GIVEN the tiny Llama at batch 4 and KV room for exactly a context of 33 (a 16-token prompt and 17
    # new tokens): generate() never feeds the last new token back, so the cache holds 32 tokens, and the
    # last step's cat keeps one layer's old K (31 tokens) beside the new one
    batch, prompt, context = 4, 16, 33
    side = batch * tiny_size.num_kv_heads * (tiny_size.hidden_size // tiny_size.num_heads) * 4  # fp32
    room = (context - 1) * tiny_size.num_layers * 2 * side + (context - 2) * side
    tiny_model.config.save_pretrained(tmp_path / "config")
    planned_weights = _plan(tmp_path / "config")["weights_bytes"]  # its parameters and buffers

    def plan_at(tokens: int) -> dict:
        return _plan(
            tmp_path / "config", "--batch", str(batch), "--context", str(tokens), "--gpu-memory",
            f"{planned_weights + room}B",
        )  # fmt: skip

    # WHEN plan is asked about that context and the next
    at, past = plan_at(context), plan_at(context + 1)
    # THEN the context's KV peak fills the room exactly and the next one's is more
    assert at["kv_peak_bytes"] == room and past["kv_peak_bytes"] > room
    # AND the plan's peak counts the prefill of its worst prompt, 32 tokens, too: 4 x 32 x 2,704 B of
    # activations a row and token (3 x 128 of MLP, 3 hidden states of 64 and the embeddings', cos and sin of
    # 16, fp32, and 16 B of positions), which this room, the KV's alone, has no space for: neither fits
    # (before they were estimated, 33 fitted and 34 did not, the KV's boundary, which the recordings below
    # check: without the profiler's allocator events a run's budget counts its weights and KV alone)
    assert at["prefill_activations_bytes"] == batch * (context - 1) * (
        3 * 128 * 4 + 4 * 64 * 4 + 2 * 16 * 4 + 16
    )
    assert at["fits"] is False and past["fits"] is False
    # AND recordings under the same KV room agree: 33 fits, 34 crosses
    budget = weights_bytes(tiny_model) + room
    for tokens, crossed in ((context, False), (context + 1, True)):
        report = _generate(tiny_model, tmp_path / f"c{tokens}", batch, prompt, tokens - prompt, budget)
        assert report["budget"]["crossed"] is crossed
        assert report["kv"]["tokens_held"] == tokens - 1
        assert report["kv"]["peak_bytes"] == plan_at(tokens)["kv_peak_bytes"]


def _mistral() -> torch.nn.Module:
    """Mistral with a window of 8 on every layer, 4 layers x 2 KV heads x 16 dims: in fp32 one layer's K
    and V of one token of two rows are 2 x 2 x 2 x 16 x 4 = 512 B."""
    import transformers

    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=8, vocab_size=256, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).eval()


def test_plan_prices_the_prompt_that_sliding_layers_hold_at_prefill(tmp_path: Path) -> None:
    # GIVEN Mistral's default DynamicCache at batch 2: at prefill each sliding layer's storage is the whole
    # prompt, which it lets go of at the first decode step, after making its 8-token K and V. With a
    # 64-token prompt the KV peaks at (4 layers x 64 + 8) x 512 B; give exactly that much room
    model, layer_token = _mistral(), 512
    model.config.save_pretrained(tmp_path / "config")
    room = (4 * 64 + 8) * layer_token
    weights = weights_bytes(model)
    gpu = f"{_plan(tmp_path / 'config')['weights_bytes'] + room}B"

    def plan_at(*argv: str) -> dict:
        return _plan(tmp_path / "config", "--batch", "2", "--gpu-memory", gpu, *argv)

    # WHEN plan is given the prompt, and when it plans the worst prompt for the context
    given = plan_at("--prompt", "64", "--context", "66")
    worst, worse = plan_at("--context", "66"), plan_at("--context", "67")
    # THEN the prompt at prefill and the peak are the arithmetic's; the final KV is the window
    assert given["kv_prefill_bytes"] == 4 * 64 * layer_token and given["kv_peak_bytes"] == room
    assert given["kv_bytes"] == 4 * 8 * layer_token
    # AND the worst prompt of a 66-token context is 64 tokens (the KV peak above), of 67 it is 65: too much
    assert (worst["prompt_tokens"], worst["kv_peak_bytes"]) == (64, room)
    assert worse["kv_peak_bytes"] == (4 * 65 + 8) * layer_token
    # AND the plan's peak counts the prefill's activations too, which this room, the KV's alone, has no
    # space for (before they were estimated, the KV's boundary was the plan's: 66 fitted, 67 did not)
    assert not given["fits"] and not worst["fits"] and not worse["fits"]
    # AND with room for the 64-token prompt's activations beside the KV's, the given prompt fits at any
    # context: later steps hold only windows
    spacious = f"{int(gpu.removesuffix('B')) + given['prefill_activations_bytes']}B"
    roomy = _plan(
        tmp_path / "config", "--batch", "2", "--gpu-memory", spacious, "--prompt", "64", "--context", "66"
    )
    assert roomy["fits"] is True and roomy["max_context"] is None
    # AND recordings under the same KV room agree, however long the 64-token prompt's generation runs
    for prompt, new, crossed in ((64, 2, False), (65, 2, True), (64, 12, False)):
        report = _generate(model, tmp_path / f"p{prompt}_{new}", 2, prompt, new, weights + room)
        assert report["budget"]["crossed"] is crossed, (prompt, new)
        assert report["kv"]["peak_bytes"] == (4 * prompt + 8) * layer_token


def test_plan_prices_a_sliding_layers_step_as_both_new_tensors(tmp_path: Path) -> None:
    # GIVEN Mistral at batch 2 with a 4-token prompt (shorter than the window) and 12 new tokens: once the
    # window is full, each step makes one layer's new 8-token K and V before freeing the old ones
    model, layer_token = _mistral(), 512
    model.config.save_pretrained(tmp_path / "config")
    planned = _plan(tmp_path / "config", "--batch", "2", "--prompt", "4", "--context", "16")
    report = _generate(model, tmp_path / "run", 2, 4, 12, weights_bytes(model) + 2**30)
    # THEN plan's growth peak is both of them, as recorded
    assert planned["kv_bytes"] == report["kv"]["final_bytes"] == 4 * 8 * layer_token
    assert planned["dynamic_realloc_peak_bytes"] == 8 * layer_token  # one layer's K and V of 8 tokens
    assert planned["kv_peak_bytes"] == report["kv"]["peak_bytes"] == (4 * 8 + 8) * layer_token


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("1.5B", "a size in bytes must be a whole number, got '1.5B' (B means bytes: 1.5GB is 1.5e9 bytes)"),
        ("1.7B", "a size in bytes must be a whole number, got '1.7B'"),
        ("1.5", "a size in bytes must be a whole number, got '1.5' (or give a unit: 1.5GiB)"),
        ("70M", "cannot read size '70M'"),
        (0, "a memory size must be positive, got 0"),
        ("0.1B", "a size in bytes must be a whole number"),
        (True, "not a size: True"),
        ("1e99", "size too large: '1e99'"),
    ],
)
def test_a_bad_budget_is_one_line_naming_gpu_memory(bad: object, said: str, tmp_path: Path) -> None:
    # WHEN a budget is a fraction of a byte, unreadable, zero or absurd
    # THEN record() refuses it with the exception the package exports, naming the option, before writing
    with pytest.raises(kvtrace.RecordingError) as raised:
        kvtrace.record(tmp_path / "never", gpu_memory=bad)
    message = str(raised.value)
    assert message.startswith("record(gpu_memory=...): ") and said in message and "\n" not in message
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(("given", "stored"), [("12345B", 12345), ("1.5e3B", 1500), ("0.5KiB", 512)])
def test_a_whole_byte_budget_keeps_every_byte(given: str, stored: int, tmp_path: Path) -> None:
    assert kvtrace.record(tmp_path / "run", gpu_memory=given).options.gpu_memory == stored


def test_the_tensorboard_timeline_marks_where_the_run_runs_out(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN a run crossing a budget set just under layer 1's V allocation of decode step 4
    weights = weights_bytes(tiny_model)
    budget, (step, layer, _, request, after) = _budget_under(tiny_size, weights, (4, 1, "v"))
    _record(tiny_model, tmp_path / "run", budget)
    # WHEN the TensorBoard tab's timeline is served at full resolution
    timeline = RunStore(tmp_path).timeline("run", max_points=10**6)
    # THEN it holds one "runs out here" marker, as the HTML report draws it: at the first moment the device
    # holds more than the budget, at the level that allocation took it to, naming its step and layer
    (mark,) = [m for m in timeline["markers"] if m["kind"] == "budget"]
    (device,) = timeline["devices"]
    first_over = next(i for i, b in enumerate(device["allocated"]) if b > budget)
    assert mark["t_s"] == device["t_s"][first_over]
    assert mark["bytes"] == device["allocated"][first_over] == weights + after
    assert f"step {step} (decode), layer {layer}, {a_or_an(human_bytes(request))} request" in mark["label"]


def test_a_budget_the_weights_exceed_is_marked_before_the_first_step(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    from analyzers.render.html import report_to_html
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN a run whose weights alone are a byte over its budget: no step and no request crossed it
    weights = weights_bytes(tiny_model)
    budget = weights - 1
    _record(tiny_model, tmp_path / "run", budget)
    crossing = _json(["report", str(tmp_path / "run"), "--json", "-q", "--no-export"])["budget"]
    assert crossing["before_first_step"] and crossing["step"] is None and crossing["request_bytes"] is None
    # WHEN the HTML report and the TensorBoard tab mark where the run runs out
    page = report_to_html(*build_report(tmp_path / "run"))
    (mark,) = [m for m in RunStore(tmp_path).timeline("run")["markers"] if m["kind"] == "budget"]
    # THEN both say what the text report says, with the figures of the weights, and no "step None (None)"
    said = (
        f"exceeded on {a_or_an(human_bytes(budget))} device before the first step: "
        f"{human_bytes(weights)} already allocated, {human_bytes(1)} over"
    )
    assert mark["label"] == said and mark["bytes"] == weights
    assert f'"text":["{said}"]' in page and "runs out here" in page
    assert "None" not in page.split("kvtrace-timeline", 1)[1]


@pytest.mark.parametrize("profiler", [False, True])
def test_a_run_that_ran_no_step_over_its_budget_runs_out_before_its_first_step(
    tmp_path: Path, profiler: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run that loaded its model and ran nothing: its weights alone, no allocator event in the block
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    model = build_model(tiny_size(2))
    with kvtrace.record(tmp_path / "run", model=model, profiler=profiler):
        pass
    weights = weights_bytes(model)
    # WHEN diagnosed against a budget under its weights
    assert main(["diagnose", str(tmp_path / "run"), "--budget", f"{weights - 1}B", "--json"]) == 0
    crossing = json.loads(capsys.readouterr().out)["budget_crossing"]
    # THEN it runs out before its first step, with the weights allocated (not a snapshot's dump; before, it
    # fit "with all the budget to spare", its peak counted as 0)
    assert crossing["crossed"] is True and crossing["before_first_step"] is True
    assert crossing["at_dump"] is False and crossing["allocated_after_bytes"] == weights
    assert main(["diagnose", str(tmp_path / "run"), "--budget", f"{weights - 1}B"]) == 0
    headline = capsys.readouterr().out.splitlines()[1]
    assert headline.startswith("would run out of memory on")
    assert headline.endswith("before the first step (weights and setup)")
