"""`diagnose` names what a generate() call keeps for every step beside the KV, and what dropping it frees.

With `return_dict_in_generate=True, output_scores=True, output_logits=True`, generate() keeps each step's
scores and raw logits (rows x vocabulary, float32) until it returns: on Llama 3's 128,256-token vocabulary
0.5 MiB a row and step, which at the end of a generation outweighs this tiny model's KV many times. The
recorder notes which outputs a call keeps (`generate_calls[].keeps`); diagnose measures what the call's
earlier steps still hold and offers dropping them, checked against a re-recording without them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import ModelSize, build_model
from tests.tiny import HEADS, HIDDEN

VOCAB, PROMPT, NEW_TOKENS, BATCH = 128_256, 16, 24, 4
SIZE = ModelSize(
    hidden_size=HIDDEN, intermediate_size=128, num_layers=2, num_heads=HEADS, num_kv_heads=2, vocab_size=VOCAB
)
STEP_SCORES = BATCH * VOCAB * 4  # one step's scores (or logits): rows x vocabulary x float32


@pytest.fixture(scope="module")
def model() -> Any:
    import torch

    return build_model(SIZE, dtype=torch.float32).eval()


def _record(model: Any, run: Path, keep: bool, sample: bool = False) -> dict[str, Any]:
    import torch

    import kvtrace

    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    sampling = {"do_sample": True, "temperature": 0.7, "top_k": 50} if sample else {"do_sample": False}
    with kvtrace.record(run, model=model), torch.no_grad():
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=keep,
            output_logits=keep,
            **sampling,
        )
    return json.loads((run / "manifest.json").read_text())


def _diagnosis(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["diagnose", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _kept(diagnosis: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in diagnosis["remedies"] if r["kind"] == "kept_outputs"]


@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
def test_dropping_the_kept_scores_frees_what_the_calls_earlier_steps_hold(
    model: Any, sample: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() that keeps its scores and logits, and the same call without them
    manifest = _record(model, tmp_path / "kept", keep=True, sample=sample)
    assert [c.get("keeps") for c in manifest["generate_calls"]] == [["output_scores", "output_logits"]]
    plain = _record(model, tmp_path / "plain", keep=False, sample=sample)
    assert [c.get("keeps") for c in plain["generate_calls"]] == [None]

    # WHEN diagnosed at its peak
    kept = _diagnosis(tmp_path / "kept", capsys)
    (remedy,) = _kept(kept)

    # THEN the peak is the last step's, and each step before the one before it holds its scores and its
    # logits, two tensors of rows x vocabulary x float32: the raw logits, and the scores min_new_tokens'
    # processor (and sampling's temperature and top-k) made from them; the step before the moment's is not
    # counted (the loop's variables still hold its logits and scores, kept or not), nor what it carries
    # (input_ids, its mask, sampling's probabilities)
    step = kept["step"]
    assert step == NEW_TOKENS
    # nor the run's first forward, the prefill (its one-time buffers: a CUDA math library's workspace)
    assert remedy["saved_bytes"] == (step - 3) * 2 * STEP_SCORES
    assert remedy["sentence"].startswith("generate(..., output_scores=False, output_logits=False) frees")
    assert f"its steps 2 to {step - 2} still hold {(step - 3) * 2:,} of them" in remedy["sentence"]
    # AND the report says what the peak's "other" holds of them
    assert main(["report", str(tmp_path / "kept"), "--json", "--no-export", "-q"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    said = f"at the peak (step {step}) the generate() call that began at step 1 held at least "
    assert [n for n in notes if n.startswith(said)] == [
        f"{said}{human_bytes(remedy['saved_bytes'])} of the scores and logits it keeps for every step "
        "(output_scores, output_logits), counted as other: `kvtrace diagnose` prices dropping them"
    ]
    # AND it ranks first: nothing else at this moment frees as much
    assert kept["remedies"][0]["kind"] == "kept_outputs"

    # AND the re-recording without them peaks lower by at least what the remedy says it frees, and by less
    # than three steps' outputs more (those the remedy leaves out)
    without = _diagnosis(tmp_path / "plain", capsys)
    assert not _kept(without)
    dropped = kept["allocated_bytes"] - without["allocated_bytes"]
    assert remedy["saved_bytes"] <= dropped < remedy["saved_bytes"] + 3 * 2 * STEP_SCORES


def test_a_damaged_calls_list_is_read_as_no_kept_outputs(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the greedy run whose manifest's generate_calls is damaged: not a list, or a call's keeps not one
    run = tmp_path / "kept"
    manifest = _record(model, run, keep=True)
    for damaged in (5, [{"step": 1, "keeps": "output_scores"}], [{"step": "1", "keeps": ["output_scores"]}]):
        (run / "manifest.json").write_text(json.dumps({**manifest, "generate_calls": damaged}))
        # THEN report and diagnose read it as a run whose calls keep nothing they can name
        assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
        assert not [n for n in json.loads(capsys.readouterr().out)["notes"] if "keeps for every step" in n]
        assert not _kept(_diagnosis(run, capsys))


def test_a_budget_below_the_peak_by_half_the_scores_is_met_by_dropping_them_first(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the greedy run and a budget below its peak by half its generation's scores
    _record(model, tmp_path / "kept", keep=True)
    peak = _diagnosis(tmp_path / "kept", capsys)["allocated_bytes"]
    budget = peak - (NEW_TOKENS // 2) * STEP_SCORES
    assert main(["diagnose", str(tmp_path / "kept"), "--json", "--budget", f"{budget}B"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    # THEN dropping the kept outputs fits, and leads: it frees the most
    (remedy,) = _kept(diagnosis)
    assert remedy["fits"] is True and diagnosis["shortfall_bytes"] == peak - budget
    assert diagnosis["remedies"][0]["kind"] == "kept_outputs"
