"""`kvtrace plan --from-run` at a longer context prices one layer's attention copies of the KV at that
context: eager attention's K and V expanded to the query heads and its scores, an fp8 cache's K and V
dequantized to float32. A short run's peak never holds them (smaller than its logits there), yet at a long
context they are the peak: before, the tiny Llama (2 layers, batch 2, a 3-token prompt) planned from
context 12 at 240 said 1,162,088 B with eager attention where the recording peaked at 1,341,084 (-13.3%),
812,544 B with an fp8 cache for 854,248 (-4.9%), and 690,176 B for that fp8 cache planned from a dynamic
run (-19.2%)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.hf_versions import HAS_FP8_CACHE, needs_fp8_cache
from tests.tiny import record_generate, tiny_size

BATCH, PROMPT, SHORT, LONG = 2, 3, 12, 240
WITHIN = 0.06  # a plan from a short run may be over its recording by this share, never under


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy generate() at contexts 12 and 240: a Llama with eager attention (dynamic cache), and
    the tiny Llama with a dynamic cache and an fp8 quantized one."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("attention_copies")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model = build_model(tiny_size(2, 2)).eval()
    found = {name: folder / name for name in ("eager12", "eager240", "dynamic12", "fp8_12", "fp8_240")}
    record_generate(eager, found["eager12"], BATCH, PROMPT, SHORT - PROMPT)
    record_generate(eager, found["eager240"], BATCH, PROMPT, LONG - PROMPT)
    record_generate(model, found["dynamic12"], BATCH, PROMPT, SHORT - PROMPT)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8_12"], BATCH, PROMPT, SHORT - PROMPT, "fp8")
        record_generate(model, found["fp8_240"], BATCH, PROMPT, LONG - PROMPT, "fp8")
    return found


def test_the_manifest_names_the_attention(runs: dict[str, Path]) -> None:
    import json

    manifest = json.loads((runs["eager12"] / "manifest.json").read_text())
    assert manifest["model"]["attn_implementation"] == "eager"


def test_eager_attention_prices_its_expanded_kv(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the eager run at context 240, which peaks inside a layer's attention over the whole context
    measured = report_json(runs["eager240"], capsys)["peak_allocated_bytes"]
    # WHEN the run at context 12 is planned at 240
    plan = plan_json(runs["eager12"], capsys, "--context", str(LONG))
    # THEN the plan is an upper bound of the recording, a tight one
    assert measured <= plan["peak_bytes"] <= measured * (1 + WITHIN), (plan["peak_bytes"], measured)


@pytest.mark.parametrize(
    ("run", "flags"),
    [("fp8_12", ()), ("dynamic12", ("--cache", "quantized", "--kv-dtype", "fp8"))],
    ids=["from_fp8", "from_dynamic"],
)
@needs_fp8_cache
def test_an_fp8_cache_prices_its_dequantized_kv(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], run: str, flags: tuple[str, ...]
) -> None:
    # GIVEN the fp8 cache's run at context 240, which holds three float32 copies of a layer's K or V
    measured = report_json(runs["fp8_240"], capsys)["peak_allocated_bytes"]
    # WHEN a run at context 12 is planned at 240 on that cache
    plan = plan_json(runs[run], capsys, "--context", str(LONG), *flags)
    # THEN the plan is an upper bound of the recording, a tight one
    assert measured <= plan["peak_bytes"] <= measured * (1 + WITHIN), (plan["peak_bytes"], measured)


@pytest.fixture(scope="module")
def wide_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Llama, 8 rows of a 20-token prompt and 40 new tokens, with a dynamic cache and an fp8 one:
    its step's end (the logits, the logits processors' vectors) holds more than a cache update does."""
    import torch

    folder = tmp_path_factory.mktemp("attention_copies_wide")
    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2)).eval()
    found = {name: folder / name for name in ("dynamic", "fp8")}
    record_generate(model, found["dynamic"], 8, 20, 40)
    if HAS_FP8_CACHE:
        record_generate(model, found["fp8"], 8, 20, 40, "fp8")
    return found


@needs_fp8_cache
def test_an_fp8_cache_planned_from_a_dynamic_run_dequantizes_beside_its_update(
    wide_runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the fp8 cache's run, whose peak is inside a layer's update: the layer's old K and V beside their
    # torch.cat copies and three float32 copies of its K or V, beside what a cache update holds
    measured = report_json(wide_runs["fp8"], capsys)["peak_allocated_bytes"]
    # WHEN the dynamic run at the same batch and context is planned on an fp8 cache
    plan = plan_json(wide_runs["dynamic"], capsys, "--cache", "fp8")
    # THEN the plan is a tight upper bound: before, the copies went beside the step's end (its logits),
    # which no update holds, 22.3% over the recording
    assert measured <= plan["peak_bytes"] <= measured * (1 + 0.08), (plan["peak_bytes"], measured)


# A 70-token prompt: generate()'s tensors that grow with the context are the only ones of more tokens than
# the prompt, so the run tells exactly what a token adds beside its update
LONG_PROMPT, FROM, TO = 70, 101, 400


@pytest.fixture(scope="module")
def eager_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The eager Llama (fp32, 2 rows, a 70-token prompt) at contexts 101 and 400."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("attention_copies_eager")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    eager = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    found = {context: folder / str(context) for context in (FROM, TO)}
    for context, run in found.items():
        record_generate(eager, run, BATCH, LONG_PROMPT, context - LONG_PROMPT)
    return found


def test_eager_attention_copies_are_priced_over_the_last_steps_keys(
    eager_runs: dict[int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the eager run at context 400, peaking in its last layer's attention at the last step: the final
    # KV live (2 layers of K and V, 2 KV heads x 16 at fp32, over the 399 tokens fed), not the prompt's
    report = report_json(eager_runs[TO], capsys)
    assert report["categories_at_peak"]["kv"] == 2 * 2 * 2 * 16 * 4 * (TO - 1) * BATCH
    # WHEN the run at context 101, which peaked at its prefill, is planned at 400
    plan = plan_json(eager_runs[FROM], capsys, "--context", str(TO))
    # THEN the plan is the recording's peak, to the byte: K and V expanded to the 4 query heads and two
    # copies of the scores over the 399 keys, beside what the run's update held less the new token's K and
    # V. Before, three float32 copies of the scores over 400 keys beside the new token's K and V
    assert plan["peak_bytes"] == report["peak_allocated_bytes"]
