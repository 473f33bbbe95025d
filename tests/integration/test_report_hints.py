"""Reports explain what they cannot attribute: the bytes no rule matched, and how to get KV figures from a
bare torch.profiler trace (which attributes 100% to "other")."""

from __future__ import annotations

import io
import json
import re
import threading
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.memory_samples import MemorySampler
from tests.tiny import tiny_size

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _out(argv: list[str]) -> str:
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        assert main(argv) == 0
    return buffer.getvalue()


def test_a_bare_profiler_trace_says_how_to_get_kv_attribution() -> None:
    # GIVEN the profiler trace of a recorded HF run, read alone (no KV log beside it)
    trace = next((SAMPLES / "dynamic_b2" / "profiler").iterdir())
    text = _out(["report", str(trace)])
    data = json.loads(_out(["report", str(trace), "--json"]))
    # THEN it says nothing marks KV, and how to fix that
    assert data["kv"]["measured_from"] == "none"
    hint = data["kv"]["how_to_attribute"]
    assert "kvtrace.record" in hint and "with_stack=True" in hint
    assert "no KV attribution" in text and "with_stack=True" in text
    # AND its KV reads as unknown, not as 0 B (the JSON's 0s stay, as docs/format.md says, with
    # `measured_from` "none"): at each device's peak and in the KV section
    devices = len(data["devices"])
    assert text.count("at peak  kv                  -  (not attributed: counted in other)") == devices > 0
    assert "    final -, peak - (not attributed: unknown, not 0)\n" in text
    assert "final 0 B, peak 0 B" not in text
    # and the unattributed bytes are named for what they are, not "attributed by: none"
    assert "attributed by: none" not in text and "not attributed, counted as other" in text


def test_a_recorded_run_needs_no_hint() -> None:
    data = json.loads(_out(["report", str(SAMPLES / "dynamic_b2"), "--json", "-q", "--no-export"]))
    assert data["kv"]["measured_from"] == "kv_log" and data["kv"]["how_to_attribute"] is None


def test_nvml_absent_without_a_driver_is_a_reason_not_an_error() -> None:
    # GIVEN a sampler asked for CUDA device 0 on a machine where NVML cannot start (no GPU driver here)
    sampler = MemorySampler(0)
    try:
        sample = sampler.sample()
    finally:
        sampler.close()
    if sampler.nvml_status["status"] == "ok":  # a machine with a GPU: the figures are there
        assert sample["gpu_memory_total_bytes"] > 0 and 0 <= sample["gpu_utilization_percent"] <= 100
    else:
        status = sampler.nvml_status
        assert status["status"] == "absent" and "NVML unavailable" in status["reason"]
        assert not any(key.startswith("gpu_") for key in sample)
    assert sample["cpu_percent"] >= 0


def test_a_run_that_shows_no_kv_update_says_why_it_may_be(tmp_path: Path) -> None:
    # GIVEN generate() without a cache: every forward recomputes, no KV update is ever made
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))
    with torch.no_grad(), kvtrace.record(tmp_path / "run2", model=model, profiler=False):
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False)
    data = json.loads(_out(["report", str(tmp_path / "run2"), "--json", "--no-export"]))
    # THEN the report and diagnose say that none was seen in its 5 forward passes, and what that can mean
    said = "no KV cache update was seen in 5 forward passes: use_cache=False"
    assert any(note.startswith(said) for note in data["notes"])
    assert said in _out(["diagnose", str(tmp_path / "run2")])


@pytest.mark.parametrize("profiler", [True, False], ids=["profiler", "light"])
def test_forward_passes_without_a_cache_are_the_steps(tmp_path: Path, profiler: bool) -> None:
    # GIVEN generate() without a cache, 4 new tokens: 4 forwards, none of which updates a KV cache
    ids = torch.randint(3, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
        model.generate(
            ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0
        )
    lines = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    ended = [sample["step"] for sample in lines if sample["phase"] in ("prefill", "decode")]
    assert ended == [1, 2, 3, 4] and (run / "kv_events.jsonl").read_text() == ""
    # WHEN it is reported and compared
    report = json.loads(_out(["report", str(run), "--json", "--no-export"]))
    compared = json.loads(_out(["compare", str(run), str(run), "--json"]))
    # THEN its steps are its 4 forward passes, as the note on them says
    assert report["steps"] == 4
    assert any(note.startswith("no KV cache update was seen in 4 forward passes") for note in report["notes"])
    assert [figures["steps"] for figures in compared["runs"]] == [4, 4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="an offloaded cache's update raises only without CUDA")
@pytest.mark.parametrize("profiler", [True, False], ids=["profiler", "light"])
def test_a_run_whose_cache_update_raised_says_so(tmp_path: Path, profiler: bool) -> None:
    # GIVEN generate() with an offloaded cache on a machine without CUDA: transformers' update waits on a
    # CUDA stream, which raises inside the first layer update, before anything is written
    ids = torch.randint(3, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))
    run = kvtrace.record(tmp_path / "run", model=model, profiler=profiler)
    with pytest.raises(AssertionError), torch.no_grad(), run:
        model.generate(
            ids, max_new_tokens=3, do_sample=False, cache_implementation="offloaded", pad_token_id=0
        )
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model_caches"] == [1] and manifest["kv_events"] == 0
    data = json.loads(_out(["report", str(tmp_path / "run"), "--json", "--no-export"]))
    # THEN the report says the cache's own update raised, in its one forward pass, not that none was seen
    said = (
        "no KV was logged in 1 forward pass: the cache's own update raised (AssertionError at layer 0) "
        "before kvtrace could log what it wrote"
    )
    assert said in data["notes"]
    assert not any("no KV cache update was seen" in note for note in data["notes"])


def test_a_first_forward_that_raised_before_any_cache_update_says_so(tmp_path: Path) -> None:
    # GIVEN generate() with transformers' own cache, whose model raises in layer 0 before its attention
    ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))

    def boom(module: torch.nn.Module, args: tuple[object, ...]) -> None:
        raise RuntimeError("boom in layer 0 before attention")

    model.model.layers[0].register_forward_pre_hook(boom)
    run = kvtrace.record(tmp_path / "run", model=model, profiler=False)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), run:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["kv_events"] == 0 and manifest["ended"]["status"] == "exception"
    data = json.loads(_out(["report", str(tmp_path / "run"), "--json", "--no-export"]))
    # THEN the report says its one forward raised in step 1 before any layer's update, not that its cache
    # may be one kvtrace does not follow
    said = (
        "no KV was logged in 1 forward pass: the model's forward raised in step 1, before any layer's KV "
        "cache update, so it generated no token"
    )
    assert any(note.startswith(said) for note in data["notes"])
    assert not any("cache_attrs" in note or "use_cache=False" in note for note in data["notes"])


def test_one_forward_pass_without_a_cache_is_one_pass(tmp_path: Path) -> None:
    # GIVEN generate() of 1 new token without a cache: 1 forward pass, which finishes with no KV update
    ids = torch.randint(3, 1000, (1, 7), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        model.generate(ids, max_new_tokens=1, do_sample=False, use_cache=False, pad_token_id=0)
    data = json.loads(_out(["report", str(tmp_path / "run"), "--json", "--no-export"]))
    # THEN the advice stays, in the singular
    said = (
        "no KV cache update was seen in 1 forward pass: use_cache=False, or a cache kvtrace does not follow"
    )
    assert any(note.startswith(said) for note in data["notes"])


def test_diagnose_of_a_run_without_kv_says_none_was_held(tmp_path: Path) -> None:
    # GIVEN a run recorded with kvtrace.record whose generate() holds no cache (use_cache=False)
    ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    # WHEN it is diagnosed
    data = json.loads(_out(["diagnose", str(tmp_path / "run"), "--json"]))
    remedies = {r["kind"]: r["sentence"] for r in data["remedies"]}
    # THEN the static-cache remedy says no KV cache was held, not that the run lacks KV figures
    assert remedies["static_cache"] == (
        "Static cache: cannot be computed: no KV cache was held in this run (the KV log shows none)."
    )
    assert remedies["quantized_kv"] == (
        "Quantized KV: cannot be computed: no KV cache is held at this moment (the KV log shows none live)."
    )


def test_diagnose_text_of_a_run_without_kv_folds_the_kv_remedies_into_one_line(tmp_path: Path) -> None:
    # GIVEN a run whose generate() holds no cache (use_cache=False): its KV log shows none, over the run
    ids = torch.randint(3, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    model = build_model(tiny_size(2))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False)
    # WHEN it is diagnosed as text
    text = _out(["diagnose", str(tmp_path / "run")])
    # THEN the five KV remedies, none of which can be priced, are one line that says why (they were five
    # ranked lines, "1. [batch] Smaller batch: cannot be computed: ...", above the note that says why)
    lines = text.splitlines()
    assert "remedies: none priced" in lines
    assert (
        "  KV remedies (smaller batch, shorter context, sliding window, static cache, quantized KV): "
        "cannot be priced: no KV cache was held in this run (the KV log shows none; see the notes below)"
    ) in lines
    assert "cannot be computed" not in text
    assert any(line.startswith("note: no KV cache update was seen in 4 forward passes") for line in lines)


def test_forward_passes_on_another_thread_are_counted(tmp_path: Path) -> None:
    # GIVEN generate() on a worker thread (as beside a TextIteratorStreamer), the profiler on
    model = build_model(tiny_size(2))
    ids = torch.ones(1, 7, dtype=torch.long)
    with kvtrace.record(tmp_path / "run", model=model):
        worker = threading.Thread(
            target=model.generate,
            args=(ids,),
            kwargs={"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0},
        )
        worker.start()
        worker.join()
    data = json.loads(_out(["report", str(tmp_path / "run"), "--json", "--no-export"]))
    # THEN the report says the profiler's trace misses those 4 forward passes, and the KV log does not
    assert any(note.startswith("4 of 4 forward passes ran on another thread") for note in data["notes"])
    assert data["kv"]["tokens_held"] == 7 + 4 - 1


def test_a_bare_profiler_trace_taken_with_stacks_attributes_the_kv(tmp_path: Path) -> None:
    # GIVEN torch.profiler's own trace of generate(), with_stack=True, no kvtrace at all
    model = build_model(tiny_size(2))
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    activities = [torch.profiler.ProfilerActivity.CPU]
    profiler = torch.profiler.profile(activities=activities, profile_memory=True, with_stack=True)
    with torch.no_grad(), profiler:
        model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    trace = tmp_path / "plain.pt.trace.json"
    profiler.export_chrome_trace(str(trace))
    data = json.loads(_out(["report", str(trace), "--json"]))
    # THEN the cache's allocations are found by their stacks: the KV peak is the arithmetic of the last step,
    # 2 rows x 13 tokens in 2 layers x (K, V) x 2 KV heads x 16 x 4 bytes, and one layer's old K of 12 tokens
    # alive beside its copy; the cache was dropped by the end
    one_side = 2 * 16 * 4  # one layer's K (or V), one token, one row
    assert data["kv"]["measured_from"] == "stack_rule"
    assert data["kv"]["peak_bytes"] == 2 * 13 * (2 * 2 * one_side) + 2 * 12 * one_side
    assert data["kv"]["final_bytes"] == 0


class _ModuleCacheAttention(torch.nn.Module):
    """A custom cache kvtrace finds by its attribute names: one batch row, 32 slots, 2 KV heads of 8."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.cache_k = torch.zeros(1, 32, 2, 8, dtype=dtype)
        self.cache_v = torch.zeros(1, 32, 2, 8, dtype=dtype)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:  # x: [batch, seq, heads, dim]
        self.cache_k[:, start_pos : start_pos + x.shape[1]] = x
        self.cache_v[:, start_pos : start_pos + x.shape[1]] = x
        return x


class _ModuleCacheModel(torch.nn.Module):
    """Meta's calling convention, `forward(tokens, start_pos)`, over two layers of module caches."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_ModuleCacheAttention(dtype), _ModuleCacheAttention(dtype)])

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


@pytest.mark.parametrize(
    ("dtype", "size"), [(torch.float32, 4), (torch.float8_e5m2, 1)], ids=["float32", "float8_e5m2"]
)
def test_a_run_without_model_geometry_gives_the_buffers_arithmetic_else_a_dash(
    tmp_path: Path, dtype: torch.dtype, size: int
) -> None:
    # GIVEN two layers of a custom module cache and no HF config: the manifest has no KV heads or head_dim
    model = _ModuleCacheModel(dtype)
    with kvtrace.record(tmp_path / "run", model=model, profiler=False):
        for pos in range(4):
            model(torch.ones(1, 1, 2, 8), pos)
    # measured: 2 layers x (K, V) x 2 heads x 8 dims x the dtype's size, a slot of the preallocated buffers
    # (their bytes over their 32 positions x 1 row); the 4 tokens written hold 32 / 4 times that each
    per_token = 2 * 2 * 2 * 8 * size
    per_written = per_token * 32 / 4
    # WHEN it is reported as text and as HTML
    text = _out(["report", str(tmp_path / "run"), "--no-export"])
    page = tmp_path / "t.html"
    _out(["report", str(tmp_path / "run"), "--no-export", "-q", "-o", str(page)])
    html = page.read_text(encoding="utf-8")
    # THEN the arithmetic is the buffers' own heads x head_dim x dtype size over the layers (it was "-" for
    # want of a config), the same figure as measured; where kvtrace does not know the dtype's size (fp8 e5m2),
    # both say "-" (the HTML said Python's "None"); one row is "row"
    expected = f"{per_token:,}" if dtype == torch.float32 else "-"
    slots = "the buffers' 32 positions x 1 row (max_seq_len x max_batch_size)"
    held = f"the 4 tokens x 1 row written hold {per_written:,.1f} each"
    assert (
        f"    bytes per token: measured {per_token:,.1f} ({slots}; {held}), arithmetic {expected}\n" in text
    )
    assert f"<th>KV bytes/token measured vs arithmetic</th><td>{per_token:,.1f} vs {expected}</td>" in html
    # AND the CPU banner is one sentence, said once
    banner = "<p class='note'>GPU utilization and device memory (NVML) are absent: the run is not on CUDA</p>"
    assert html.count("NVML) are absent") == 1 and banner in html


def test_html_bytes_per_token_has_thousands_separators_on_both_sides(tmp_path: Path) -> None:
    # GIVEN a sample run of 4 layers x (K, V) x 2 KV heads x head_dim 16 x 4 B (float32): 1,024 B per token
    manifest = json.loads((SAMPLES / "static_b2" / "manifest.json").read_text())
    model = manifest["model"]
    assert model["dtype"] == "float32"
    per_token = model["num_layers"] * 2 * model["num_kv_heads"] * model["head_dim"] * 4
    page = tmp_path / "s.html"
    _out(["report", str(SAMPLES / "static_b2"), "--no-export", "-q", "-o", str(page)])
    # THEN measured and arithmetic read alike ("1,024.0 vs 1,024"), as the text report prints them
    cell = f"<td>{per_token:,.1f} vs {per_token:,}</td>"
    assert per_token >= 1000 and cell in page.read_text(encoding="utf-8")


def test_diagnose_text_names_the_columns_of_its_stack_list() -> None:
    text = _out(["diagnose", str(SAMPLES / "dynamic_b2")])
    lines = text.splitlines()
    at = lines.index("top allocations by stack (live at this moment):")
    # THEN a header says what "29" is (it read "in 29"), and each row has the bytes and the count
    assert lines[at + 1] == "         bytes  allocs  stack (innermost first)"
    row = re.compile(r" +[0-9.]+ (MiB|KiB|B) +[0-9]+  \(no stack recorded.*")
    assert any(row.fullmatch(line) for line in lines[at + 2 :])
