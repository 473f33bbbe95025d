"""`kvtrace plan --from-run` of a run stopped inside a decode step's forward (an OutOfMemoryError raised from
a layer, a SIGTERM landing there) plans its peak as a finished run's: the larger of its prefill (weights, the
prompt's KV, the prefill's activations) and its last decode step (weights, the KV and its growth copy, a
decode step's activations), each moment with its own activations.

Before, a run cut mid-forward put its prefill's activations beside the end-of-decode KV peak, two moments
that never coexist: a 3-layer Llama at batch 2, 12-token prompt, 200 new tokens, stopped in step 150, planned
3,203,048 B (126,376 B of the prefill's activations beside 377,856 B of KV) where the same run stopped
between two steps planned 3,102,968 B (26,296 B, a decode step's), and its table's "activations 123.41 KiB"
contradicted its own note's "25.68 KiB beside the weights and KV at its peak, decode step". Its last decode
step's ids and mask were then left at the tokens it reached, 1,632 B below the whole run's recording; and a
run SIGTERMed between two steps read as a finished run, its ids and mask never grown either. And a finished
run whose peak is its last cache growth printed "activations 79.74 KiB" (its measured 27.24 KiB plus the
growth copy, counted twice: once in the "cache growth peak" row), so its rows summed to 53,760 B over its
peak.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtrace.cli import main
from kvtrace.llama import ModelSize, build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import raising_before_layer, record_generate

# The walkthrough's model: a Llama 3 of 3 layers, 8 query and 2 KV heads of head_dim 16, a 1,000-token
# vocabulary, fp32, whose last decode steps peak inside a cache update (the growth copy above its logits)
LAYERS, HEADS, KV_HEADS, HIDDEN = 3, 8, 2, 128
HEAD_DIM = HIDDEN // HEADS
SIZE = f"ModelSize({HIDDEN}, 256, {LAYERS}, {HEADS}, {KV_HEADS}, vocab_size=1000, tie_embeddings=False)"
BATCH, PROMPT, NEW = 2, 12, 200
CONTEXT = PROMPT + NEW
CUT_FORWARD = 150  # the forward (1: the prefill) stopped as its layer 1 begins, layer 0's update of it made
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32
STORAGE_TOKEN = BATCH * KV_HEADS * HEAD_DIM * 4  # one token of one layer's K (or V) storage, all rows
# the planned last decode step: every layer's K and V of the context's written tokens, and the growth copy
# of one layer's K, the old storage of a token fewer beside the new one
KV_PEAK = TOKEN_ROW * BATCH * (CONTEXT - 1) + STORAGE_TOKEN * (CONTEXT - 2)
OOM = "CUDA out of memory. Tried to allocate 2.00 MiB (simulated)"

# The child process's code (`python -c CODE RUN_DIR`, from the repository's root): the same model and
# generate() under record(), SIGTERMed by itself as layer 1 of forward CUT_FORWARD begins, as a scheduler's
# time limit lands mid-step; kvtrace's handler writes the run's end and the process dies of the signal
_SIGTERM_MID_STEP = textwrap.dedent(
    f"""
    import gc, os, signal, sys
    import torch, kvtrace
    from kvtrace.llama import ModelSize, build_model

    torch.manual_seed(0)
    model = build_model({SIZE}).eval()
    calls = [0]

    def count(module, args):
        calls[0] += 1

    def stop(module, args):
        if calls[0] == {CUT_FORWARD}:
            os.kill(os.getpid(), signal.SIGTERM)

    model.model.layers[0].register_forward_pre_hook(count)
    model.model.layers[1].register_forward_pre_hook(stop)
    ids = torch.randint(3, 1000, ({BATCH}, {PROMPT}), generator=torch.Generator().manual_seed(0))
    gc.collect()
    with torch.no_grad(), kvtrace.record(sys.argv[1], model=model):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens={NEW}, min_new_tokens={NEW},
            do_sample=False, pad_token_id=0,
        )
    """
)


@pytest.fixture(scope="module")
def model() -> Any:
    torch.manual_seed(0)
    size = ModelSize(HIDDEN, 256, LAYERS, HEADS, KV_HEADS, vocab_size=1000, tie_embeddings=False)
    return build_model(size).eval()


# The same child SIGTERMed between two steps instead: as forward CUT_FORWARD - 1 returns, a step wholly done
_SIGTERM_BETWEEN_STEPS = _SIGTERM_MID_STEP.replace(
    "model.model.layers[1].register_forward_pre_hook(stop)",
    "model.register_forward_hook(lambda module, args, output: stop(module, args))",
).replace(f"if calls[0] == {CUT_FORWARD}:", f"if calls[0] == {CUT_FORWARD - 1}:")


def _record_cut(model: Any, run: Path, how: str) -> None:
    """The run, stopped inside forward CUT_FORWARD (a decode step) as its layer 1 begins; "sigterm_between":
    SIGTERMed as forward CUT_FORWARD - 1 returns, between two steps."""
    if how == "oom":
        with pytest.raises(torch.OutOfMemoryError):
            error = torch.OutOfMemoryError(OOM)
            with raising_before_layer(model, error, CUT_FORWARD, layer=1):
                record_generate(model, run, BATCH, PROMPT, NEW)
        return
    root = Path(__file__).resolve().parents[2]
    code = _SIGTERM_BETWEEN_STEPS if how == "sigterm_between" else _SIGTERM_MID_STEP
    assert code.count("register_forward_hook") == (how == "sigterm_between")
    done = subprocess.run(
        [sys.executable, "-c", code, str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert done.returncode == -15, done.stderr


def _activations_row(run: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> str:
    """The text table's activations row of `kvtrace plan --from-run RUN [flags]`."""
    main(["plan", "--from-run", str(run), *flags])
    out = capsys.readouterr().out
    return next(line for line in out.splitlines() if line.strip().startswith("activations "))


def _kib(num_bytes: int) -> str:
    return f"{num_bytes / 1024:.2f} KiB"


@pytest.mark.parametrize("how", ["oom", "sigterm", "sigterm_between"])
def test_a_run_cut_inside_a_decode_forward_plans_its_decode_moment_with_a_decode_steps_activations(
    model: Any, how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run stopped inside a decode step's forward (or SIGTERMed between two: its peak's step ended
    # whole, and it is cut short all the same: its call asked for NEW tokens and got fewer), and its prefill
    # recorded alone (one new token: generate() runs the prefill's forward only), which measures the
    # prefill's moment
    cut, prefill = tmp_path / "cut", tmp_path / "prefill"
    _record_cut(model, cut, how)
    record_generate(model, prefill, BATCH, PROMPT, 1)
    measured = report_json(cut, capsys)
    at_peak = measured["categories_at_peak"]
    weights = at_peak["weights"]
    # its peak is inside a decode step's cache update: a growth copy beside the KV it held when it stopped,
    # well past the prompt's, and the activations beside them a decode step's (one position's logits)
    assert at_peak["kv"] > measured["kv"]["final_bytes"] > TOKEN_ROW * BATCH * PROMPT
    decode = at_peak["other"]
    prefill_at_peak = report_json(prefill, capsys)["categories_at_peak"]
    assert prefill_at_peak["kv"] == TOKEN_ROW * BATCH * PROMPT
    assert prefill_at_peak["weights"] == weights
    prefill_moment = weights + prefill_at_peak["kv"] + prefill_at_peak["other"]
    assert prefill_at_peak["other"] > decode  # the prefill's logits cover the whole prompt

    # WHEN it is planned as launched (its generate() call's context)
    planned = plan_json(cut, capsys)

    # THEN the planned last decode step holds the context's KV and its growth copy beside the activations a
    # decode step of the run held, not the prefill's, with generate()'s ids and mask (int64, BATCH rows each)
    # at the last step's CONTEXT - 1 tokens, not the tokens the run reached: its peak is forward
    # CUT_FORWARD - 1's last update, whose ids hold the prompt and the CUT_FORWARD - 2 tokens before it
    reached = PROMPT + CUT_FORWARD - 2
    at_last_step = decode + 2 * 8 * BATCH * (CONTEXT - 1 - reached)
    assert at_last_step - decode == 1632
    assert planned["request"]["context"] == CONTEXT
    assert planned["kv_peak_bytes"] == KV_PEAK
    decode_moment = weights + KV_PEAK + at_last_step
    assert prefill_moment < decode_moment
    assert planned["peak_bytes"] == max(prefill_moment, decode_moment) == decode_moment
    assert planned["kv_at_peak_bytes"] == KV_PEAK
    assert planned["activations_bytes"] == at_last_step
    # (before: the prefill's activations beside the decode KV peak, a moment that never happens; and the ids
    # and mask at the tokens reached, 1,632 B below the whole run's recording where it was cut at 160)
    assert planned["peak_bytes"] < weights + KV_PEAK + prefill_at_peak["other"]
    # AND so the plan is the same generate() run to its end's recorded peak (the SIGTERMed child's script
    # keeps its own attention mask beside, which record_generate does not pass)
    if how == "oom":
        whole = tmp_path / "whole"
        record_generate(model, whole, BATCH, PROMPT, NEW)
        finished = report_json(whole, capsys)
        assert finished["categories_at_peak"]["other"] == at_last_step
        assert planned["peak_bytes"] == finished["peak_allocated_bytes"]
    # AND the table's activations are the planned ones; the note's, the decode step's measured ones
    assert _kib(at_last_step) in _activations_row(cut, capsys)
    note = next(n for n in planned["notes"] if n.startswith("the peak counts the run's activations"))
    assert f"({_kib(decode)} beside the weights and KV" in note


def test_a_finished_runs_rows_sum_to_its_peak_where_it_peaked_in_its_last_cache_growth(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the whole run, which peaks inside its last decode step's cache growth (its small vocabulary's
    # logits are below the growth copy)
    run = tmp_path / "run"
    record_generate(model, run, BATCH, PROMPT, NEW)
    measured = report_json(run, capsys)
    at_peak = measured["categories_at_peak"]
    assert at_peak["kv"] == KV_PEAK == measured["kv"]["peak_bytes"]

    # WHEN it is planned from the run alone
    planned = plan_json(run, capsys)

    # THEN its peak is the recording's, and the moment's KV is the KV with its growth copy, so that its
    # activations are the run's as measured (before: the rest beside the KV without the copy, the measured
    # activations plus the copy, 53,760 B over on the walkthrough's run)
    growth_copy = STORAGE_TOKEN * (CONTEXT - 2)
    assert planned["dynamic_realloc_peak_bytes"] == growth_copy
    assert planned["kv_bytes"] + growth_copy == planned["kv_peak_bytes"] == KV_PEAK
    assert planned["peak_bytes"] == measured["peak_allocated_bytes"]
    assert planned["kv_at_peak_bytes"] == KV_PEAK
    assert planned["activations_bytes"] == at_peak["other"]
    # the table's rows (weights, KV, growth copy, activations) sum to its peak
    weights, kv, activations = planned["weights_bytes"], planned["kv_bytes"], planned["activations_bytes"]
    assert weights + kv + growth_copy + activations == planned["peak_bytes"]
    row = _activations_row(run, capsys)
    assert _kib(at_peak["other"]) in row
    assert "the KV cache and its growth copy" in row

    # AND planned at a shorter context (the same prompt, 8 new tokens), its prefill is the peak, as that
    # context's own recording measures it (before: its decode steps' moment moved to the shorter context,
    # 83,120 B below the recording on the walkthrough's run, the prefill left out)
    short = tmp_path / "short"
    record_generate(model, short, BATCH, PROMPT, 8)
    at_short = report_json(short, capsys)["categories_at_peak"]
    assert at_short["kv"] == TOKEN_ROW * BATCH * PROMPT  # its peak is its prefill
    shorter = plan_json(run, capsys, "--context", str(PROMPT + 8))
    assert shorter["peak_bytes"] == at_short["weights"] + at_short["kv"] + at_short["other"]
    assert shorter["kv_at_peak_bytes"] == at_short["kv"]
    assert shorter["activations_bytes"] == at_short["other"]
    row = _activations_row(run, capsys, "--context", str(PROMPT + 8))
    assert _kib(at_short["other"]) in row
    assert "the peak is the prefill" in row
