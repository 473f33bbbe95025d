"""`kvtrace diagnose` names a shorter context against the run's context as `kvtrace plan --from-run` counts
it (prompt + new tokens), never below the prompt and one new token, and where the moment is a prefill it says
that fewer new tokens free nothing there: a shorter prompt (the user's input) and transformers' chunked
prefill (`generate(..., prefill_chunk_size=N)`) are priced instead, from the prefill's activations the run
measured, as plan prices a shorter prompt.

Before, the context remedy counted from the tokens held at the moment: a 12-token prompt and 20 new tokens
peaking at the prefill got "A context of 10 tokens instead of 13" (plan: context 32, "--context 10 leaves no
room for the run's prompt"); a 2,000-token prompt and 4 new tokens, "A context of 1,501 tokens instead of
2,001"; with no budget it cut an arbitrary quarter of the tokens held; over a budget, a prefill whose MLP
intermediates overflowed got "No shorter context fits: all 2,000 tokens of KV are only 1.95 MiB".

KV figures are arithmetic: layers x 2 (K, V) x KV heads x head_dim x 4 bytes (fp32) x tokens x rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.llama import ModelSize, build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import HEAD_DIM, HEADS, HIDDEN, record_generate, tiny_size

LAYERS, KV_HEADS = 2, 2
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, fp32: 512 B
MIB = 1 << 20
# A wide MLP: its prefill's intermediates (rows x prompt x 8,192 x 4 B each) are the run's peak, not its KV
WIDE = ModelSize(
    hidden_size=HIDDEN, intermediate_size=8192, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS,
    vocab_size=1000,
)  # fmt: skip


def _remedy(diagnosis: dict[str, Any], kind: str) -> dict[str, Any]:
    (remedy,) = [r for r in diagnosis["remedies"] if r["kind"] == kind]
    return remedy


@pytest.mark.parametrize(
    ("size", "prompt", "new"),
    [(WIDE, 12, 20), (tiny_size(LAYERS, KV_HEADS), 2000, 4)],
    ids=["wide-mlp-12+20", "long-prompt-2000+4"],
)
def test_a_prefill_peak_is_no_shorter_context(
    size: ModelSize, prompt: int, new: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose peak is its prefill (a wide MLP over 12 tokens; a 2,000-token prompt), batch 1
    run = tmp_path / "run"
    record_generate(build_model(size).eval(), run, 1, prompt, new)
    # WHEN it is diagnosed
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)
    assert (diagnosis["step_phase"], diagnosis["tokens_held"]) == ("prefill", prompt)
    # THEN fewer new tokens are said to free nothing there, against the run's context as plan counts it
    context = _remedy(diagnosis, "context")
    assert (context["setting"], context["saved_bytes"]) == (None, 0)
    assert plan_json(run, capsys)["request"]["context"] == prompt + new
    said = f"any context from {prompt + 1:,} (the prompt and one new token) to the run's {prompt + new:,} "
    assert said in context["sentence"]
    # AND a shorter prompt is priced at a prompt token's KV and said to be the user's input, never below 1
    shorter = _remedy(diagnosis, "prompt")
    assert f"{human_bytes(TOKEN_ROW)} of KV across the batch" in shorter["sentence"]
    assert "The prompt is your input, not a generate() setting" in shorter["sentence"]
    assert shorter["setting"] is None or 1 <= shorter["setting"] < prompt


def test_a_prefill_over_budget_is_priced_as_a_shorter_prompt_or_chunks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 2 rows of a 2,000-token prompt and 4 new tokens on the wide MLP, which peaks at its prefill at
    # ~394 MiB: each of its MLP's intermediates is 2 x 2,000 x 8,192 x 4 B = 125 MiB
    rows, prompt, new, budget = 2, 2000, 4, 200 * MIB
    run = tmp_path / "run"
    record_generate(build_model(WIDE).eval(), run, rows, prompt, new)
    # WHEN it is diagnosed on a 200 MiB budget
    diagnosis = cli_json(["diagnose", str(run), "--json", "--budget", f"{budget}B"], capsys)
    peak = diagnosis["allocated_bytes"]
    assert (diagnosis["event"], diagnosis["step_phase"], diagnosis["tokens_held"]) == (
        "budget",
        "prefill",
        prompt,
    )
    assert diagnosis["kv_bytes"] == TOKEN_ROW * rows * prompt  # 2,048,000 B: not what overflows
    # THEN a shorter context is not enough, and says why
    context = _remedy(diagnosis, "context")
    assert (context["setting"], context["saved_bytes"], context["fits"]) == (None, 0, False)
    assert f"this moment is the prefill of the {prompt:,}-token prompt x {rows} rows" in context["sentence"]

    # AND a shorter prompt fits: its KV (1 KiB a token across the rows) and the prefill's activations that
    # follow it; plan --from-run prices that prompt (with the run's 4 new tokens) at the same peak, and a
    # token more over the budget: the longest prompt that fits, as plan prices it
    shorter = _remedy(diagnosis, "prompt")
    tokens, saved = shorter["setting"], shorter["saved_bytes"]
    assert shorter["fits"] and 1 <= tokens < prompt
    assert f"{human_bytes(TOKEN_ROW * rows)} of KV across the batch" in shorter["sentence"]
    assert f"--prompt {tokens} --context {tokens + new}`" in shorter["sentence"]
    # each token cut is priced as the bytes freed over the tokens cut (it was the average over the whole
    # prompt, which the prefill's moments do not follow alike: 4 x 7.76 KiB said for 37.99 KiB freed)
    each = human_bytes(saved / (prompt - tokens))
    assert f"each prompt token cut frees {each} there" in shorter["sentence"], shorter["sentence"]
    typed = plan_json(
        run, capsys, "--gpu-memory", f"{budget}B", "--prompt", str(tokens), "--context", str(tokens + new)
    )
    assert (typed["peak_bytes"], typed["fits"]) == (peak - saved, True)
    longer = str(tokens + 1), str(tokens + 1 + new)
    assert not plan_json(
        run, capsys, "--gpu-memory", f"{budget}B", "--prompt", longer[0], "--context", longer[1]
    )["fits"]
    # AND recorded at that prompt, the run fits the budget, at most the peak priced: the bytes the prefill
    # step never frees (generate()'s int64 ids and mask, ~96 KB) are priced at the run's prompt, an upper
    # bound within 0.1% (before, plan kept the prefill's activations at a shorter prompt: 412,874,600 B)
    again = tmp_path / "shorter"
    record_generate(build_model(WIDE).eval(), again, rows, tokens, new)
    recorded = report_json(again, capsys)["peak_allocated_bytes"]
    assert recorded <= peak - saved <= budget
    assert peak - saved - recorded < recorded // 1000

    # AND a chunked prefill keeps the prompt: a power of two, priced as an upper bound that fits, and the run
    # recorded with it fits under that bound
    chunked = _remedy(diagnosis, "prefill_chunk")
    chunk = chunked["setting"]
    assert chunked["fits"] and chunk & (chunk - 1) == 0 and 1 <= chunk < prompt
    assert f"generate(..., prefill_chunk_size={chunk:,})" in chunked["sentence"]
    with_chunks = tmp_path / "chunked"
    record_generate(build_model(WIDE).eval(), with_chunks, rows, prompt, new, prefill_chunk_size=chunk)
    assert report_json(with_chunks, capsys)["peak_allocated_bytes"] <= peak - chunked["saved_bytes"] <= budget
    # AND diagnosed itself, that run says it ran in chunks, and prices no shorter prompt from them
    rerun = cli_json(["diagnose", str(with_chunks), "--json", "--budget", f"{budget // 2}B"], capsys)
    assert f"this prefill ran {chunk:,} tokens at a time" in _remedy(rerun, "context")["sentence"]
    assert not [r for r in rerun["remedies"] if r["kind"] in ("prompt", "prefill_chunk")]


BATCH, PROMPT, NEW = 2, 3, 49  # a short prompt: the peak is the last decode step's
HELD = PROMPT + NEW - 1  # generate() never writes back its last token


def test_a_decode_peak_prices_the_shortest_context_as_plan_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run of a 3-token prompt and 49 new tokens (context 52) whose peak is its last decode step
    run = tmp_path / "run"
    record_generate(build_model(tiny_size(LAYERS, KV_HEADS)).eval(), run, BATCH, PROMPT, NEW)
    # WHEN diagnosed with no budget
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)
    assert (diagnosis["step_phase"], diagnosis["tokens_held"]) == ("decode", HELD)
    # THEN the context is the shortest, the prompt and one new token, freeing the KV of the 48 new tokens the
    # moment held (before: a quarter of the 51 tokens held, 12, "A context of 40 tokens instead of 52")
    context = _remedy(diagnosis, "context")
    freed = (HELD - PROMPT) * TOKEN_ROW * BATCH  # 49,152 B
    assert (context["setting"], context["saved_bytes"]) == (PROMPT + 1, freed)
    assert f"A context of {PROMPT + 1} tokens instead of {PROMPT + NEW} " in context["sentence"]
    # AND typed into plan --from-run --context, the cache holds the prompt, and the run's peak is that less
    typed = plan_json(run, capsys, "--context", str(context["setting"]))
    assert typed["kv_bytes"] == TOKEN_ROW * BATCH * PROMPT
    assert typed["peak_bytes"] == diagnosis["allocated_bytes"] - freed

    # WHEN a budget asks for 50 tokens of KV, more than the 48 new tokens hold
    budget = diagnosis["allocated_bytes"] - 50 * TOKEN_ROW * BATCH
    tight = cli_json(["diagnose", str(run), "--json", "--budget", f"{budget}B"], capsys)
    # THEN no context fits, not even the prompt and one new token (before: "A context of 2 tokens", shorter
    # than the 3-token prompt), and plan agrees
    context = _remedy(tight, "context")
    assert (context["setting"], context["saved_bytes"], context["fits"]) == (None, freed, False)
    assert (
        f"even {PROMPT + 1} tokens (the {PROMPT}-token prompt and one new token) instead of 52 "
        in (context["sentence"])
    )
    assert not plan_json(run, capsys, "--gpu-memory", f"{budget}B", "--context", str(PROMPT + 1))["fits"]


def test_a_shorter_prompt_says_what_it_frees_at_the_prefill_and_what_the_peak_falls_by(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose prefill (2 x 12 tokens, an MLP of 384) is its peak, its decode steps just below
    rows, prompt, new = 2, 12, 20
    run = tmp_path / "run"
    size = ModelSize(
        hidden_size=2 * HIDDEN, intermediate_size=384, num_layers=LAYERS, num_heads=2 * HEADS,
        num_kv_heads=KV_HEADS, vocab_size=1000,
    )  # fmt: skip
    record_generate(build_model(size).eval(), run, rows, prompt, new)
    # WHEN it is diagnosed with no budget
    diagnosis = cli_json(["diagnose", str(run), "--json"], capsys)
    assert diagnosis["step_phase"] == "prefill"
    peak = diagnosis["allocated_bytes"]
    shorter = _remedy(diagnosis, "prompt")
    tokens, saved = shorter["setting"], shorter["saved_bytes"]
    cut = prompt - tokens
    # THEN the prefill at that prompt holds what plan --from-run --prompt prices, `freed` less than the
    # run's: the shorter prompt's KV and the activations that follow it
    typed = plan_json(run, capsys, "--prompt", str(tokens), "--context", str(tokens + new))
    freed = peak - typed["peak_bytes"]
    assert freed > cut * rows * TOKEN_ROW
    # AND the run's peak falls by less, to what it held outside this prefill, which the prefill now is below
    assert 0 < saved < freed
    # AND the sentence says both, each for what it is, with the price a token, which times the tokens cut is
    # what the prefill frees (before: "frees 64.49 KiB at this prefill" beside 5 x 15.23 KiB, the peak's
    # fall said as the prefill's)
    said = (
        f"A prompt of {tokens} tokens instead of {prompt} frees {human_bytes(freed)} at this prefill and "
        f"lowers the run's peak by {human_bytes(saved)}, to the {human_bytes(peak - saved)} it holds outside "
        f"this prefill: each prompt token cut frees {human_bytes(freed / cut)} there, "
        f"{human_bytes(rows * TOKEN_ROW)} of KV across the batch"
    )
    assert shorter["sentence"].startswith(said), shorter["sentence"]
    assert tokens > 1, shorter["sentence"]  # several tokens kept, as in the case above
