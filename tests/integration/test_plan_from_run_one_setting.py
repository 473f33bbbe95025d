"""`kvtrace plan --from-run RUN` plus one flag moves one setting of the run (README, "Analyze any trace").

A typed --context keeps the run's prompt: before, it planned the worst prompt for that context (the
context less two tokens), whose prefill grew the activations with it, so the demo's own remedy, "Shorten
the context to 55 tokens (peak 95.67 MiB)", typed as `--context 55`, planned a 53-token prompt at 219.25
MiB. A smaller --batch frees the batch-first activations in proportion, as `kvtrace diagnose` prices its
smaller batch: before, it kept them all (99.80 MiB at the demo's batch 6, where diagnose and a batch-6
recording said 93.92 MiB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.cli_json import cli_json, plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH = 2, 2, 4
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


def test_a_shorter_context_keeps_the_runs_prompt_and_its_own_max_context_fits(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run that peaks at its last decode step (a 3-token prompt, 40 new tokens: a context of 43)
    prompt, new = 3, 40
    context = prompt + new
    run = tmp_path / "run"
    record_generate(model, run, BATCH, prompt, new)
    report = report_json(run, capsys)
    peak, at_peak = report["peak_allocated_bytes"], report["categories_at_peak"]
    assert at_peak["kv"] == TOKEN_ROW * BATCH * (context - 1)  # the moment holds every token written
    # WHEN it is planned at a context of 30 with no --prompt
    shorter = 30
    plan = plan_json(run, capsys, "--context", str(shorter))
    # THEN the prompt is the run's (13 new tokens fewer, not a 28-token prompt), the KV the arithmetic's at
    # that context, and the rest of the run's peak beside weights and KV (activations, the growth copy) as
    # measured: the peak moves by the KV alone, an upper bound of the same run recorded at that context
    assert (plan["prompt_tokens"], plan["request"]["prompt"]) == (prompt, prompt)
    assert plan["kv_bytes"] == TOKEN_ROW * BATCH * (shorter - 1)
    assert plan["peak_bytes"] - plan["weights_bytes"] - plan["kv_bytes"] == at_peak["other"]
    assert plan["peak_bytes"] == peak - TOKEN_ROW * BATCH * (context - shorter)
    record_generate(model, tmp_path / "shorter", BATCH, prompt, shorter - prompt)
    assert report_json(tmp_path / "shorter", capsys)["peak_allocated_bytes"] <= plan["peak_bytes"] < peak

    # WHEN the run is planned on a GPU 10 tokens of KV short of its peak, then at the context its plan names
    gpu = f"{peak - TOKEN_ROW * BATCH * 10}B"
    whole = plan_json(run, capsys, "--gpu-memory", gpu)
    assert not whole["fits"] and prompt < whole["max_context"] < context
    (remedy,) = [r for r in whole["remedies"] if r["kind"] == "context"]
    assert remedy["setting"] == whole["max_context"]
    typed = plan_json(run, capsys, "--gpu-memory", gpu, "--context", str(whole["max_context"]))
    # THEN that plan fits, at the peak the remedy said, and one token more does not
    assert typed["fits"] and typed["peak_bytes"] == remedy["peak_bytes"]
    assert not plan_json(run, capsys, "--gpu-memory", gpu, "--context", str(whole["max_context"] + 1))["fits"]

    # WHEN the context leaves no room for the run's prompt and a new token
    plan = plan_json(run, capsys, "--context", str(prompt))
    # THEN the worst prompt for it is planned, and a note says so
    assert plan["request"]["prompt"] is None and plan["prompt_tokens"] < prompt
    assert any(note.startswith(f"--context {prompt} leaves no room") for note in plan["notes"])


# (prompt, new tokens, tokens a row the peak moment holds): the last decode step's, or the prefill's prompt
@pytest.mark.parametrize(
    ("prompt", "new", "held"), [(3, 40, 42), (11, 6, 11)], ids=["decode_peak", "prefill_peak"]
)
def test_a_smaller_batch_frees_the_rows_activations_as_diagnose_prices_them(
    model: Any, prompt: int, new: int, held: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run at batch 4 (peaking at its last decode step, or at its prefill's logits), and the same
    # generate() recorded at batch 2
    rows = BATCH // 2
    run = tmp_path / "run"
    record_generate(model, run, BATCH, prompt, new)
    record_generate(model, tmp_path / "half", rows, prompt, new)
    report = report_json(run, capsys)
    peak, at_peak = report["peak_allocated_bytes"], report["categories_at_peak"]
    recorded = report_json(tmp_path / "half", capsys)["peak_allocated_bytes"]
    # WHEN it is planned at batch 2
    planned = plan_json(run, capsys, "--batch", str(rows))
    # THEN the peak bounds the batch-2 recording, and lies below the old bound, which kept every activation
    # as measured and moved the moment's KV alone
    assert at_peak["kv"] == TOKEN_ROW * BATCH * held
    kv_freed = TOKEN_ROW * (BATCH - rows) * held
    assert recorded <= planned["peak_bytes"] < peak - kv_freed
    # AND it is diagnose's figure: diagnosed under a budget of that peak, its remedy is batch 2, freeing
    # exactly the run's peak less the plan's
    diagnosis = cli_json(["diagnose", str(run), "--json", "--budget", f"{planned['peak_bytes']}B"], capsys)
    (batch,) = [r for r in diagnosis["remedies"] if r["kind"] == "batch"]
    assert (batch["setting"], batch["fits"]) == (rows, True)
    assert batch["saved_bytes"] == peak - planned["peak_bytes"]
    assert diagnosis["row_activation_bytes"] > 0
    # and the plan's note says which activations a smaller batch frees
    assert any("A smaller batch frees the" in note for note in planned["notes"])


def test_the_note_on_the_runs_activations_is_set_one_sentence_a_line(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run that peaks at its last decode step, planned from itself
    run = tmp_path / "run"
    record_generate(model, run, BATCH, 3, 40)
    peak = report_json(run, capsys)["peak_allocated_bytes"]
    (note,) = [n for n in plan_json(run, capsys)["notes"] if n.startswith("the peak counts the run's")]
    # WHEN its plan is printed
    assert main(["plan", "--from-run", str(run)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("  note: the peak counts the run's")))
    said = [lines[start], *[line for line in lines[start + 1 :] if line.startswith("        ")]]
    # THEN the note (one sentence of some 1,500 characters before) is a sentence a line: what the run's own
    # settings plan, then how a smaller batch, a smaller context, a larger batch or context, a longer prompt
    # and the reserve move it, each under the first, none of them over 400 characters
    activations = said[0].split("(")[1].split(" beside")[0]  # the activations' figure, as --json's note says
    assert said[0] == (
        f"  note: the peak counts the run's activations as recorded ({activations} beside the weights and KV "
        f"at its {human_bytes(peak)} peak, decode step): the run's own settings plan its own peak."
    )
    openers = [" ".join(line.split()[:3]) for line in said[1:]]
    assert openers == [
        "A smaller batch",
        "A smaller context",
        "A larger batch",
        "A longer prompt's",
        "Attention's tensors of",
        "They replace the",
    ], said
    assert max(len(line) for line in said) < 400
    # AND the lines are the --json note's words, no figure changed
    assert " ".join(line.strip() for line in said).removeprefix("note: ") == note
