"""`diagnose` prices a generate() call's kept attentions and hidden states as it prices its kept scores.

With `return_dict_in_generate=True`, `output_attentions=True` keeps each step's attention weights, one
tensor a layer of rows x heads x query x key positions, and `output_hidden_states=True` keeps each step's
hidden states, the embeddings' and each layer's output (the last layer's after the final norm), layers + 1
tensors of rows x query x hidden. A decode step's query is one position and its keys the cache's tokens,
which grow by one a step, so the attentions a generation keeps grow as an arithmetic series. Only the eager
attention returns weights: transformers 5.25's sdpa (the default) warns and returns none, so a call that
asks for them under sdpa keeps nothing, and the recorder must not name them (the remedy would then say
that `output_attentions=False` frees what only another setting holds).
The model is test_diagnose_kept_outputs.py's shape with a 1,000-token vocabulary: 2 layers, 4 heads
of 16, hidden 64, 4 rows of 16 tokens + 24 new ones; a recording takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEADS, HIDDEN, tiny_size

LAYERS, PROMPT, NEW_TOKENS, BATCH, VOCAB, FP32 = 2, 16, 24, 4, 1000, 4
ATTENTIONS, HIDDEN_STATES = "output_attentions", "output_hidden_states"


@pytest.fixture(scope="module")
def eager_model() -> Any:
    """The eager attention, the only one of transformers' that returns its weights."""
    import torch

    model = build_model(tiny_size(LAYERS), dtype=torch.float32)
    model.set_attn_implementation("eager")
    return model


@pytest.fixture(scope="module")
def sdpa_model() -> Any:
    """transformers' default attention, which returns no weights (it warns when asked for them)."""
    import torch

    model = build_model(tiny_size(LAYERS), dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa"
    return model


def _tensors(flag: str) -> int:
    """The tensors a forward returns for `flag`: one attention a layer; the hidden states of the
    embeddings and of each layer."""
    return LAYERS if flag == ATTENTIONS else LAYERS + 1


def _step_bytes(flag: str, step: int) -> int:
    """What step `step` of the call (1: the prefill) keeps for `flag`, from the shapes: the prefill's query
    is the prompt, a decode step's one position; its keys are the tokens cached before it and its own."""
    query = PROMPT if step == 1 else 1
    keys = PROMPT + step - 1
    if flag == ATTENTIONS:
        return LAYERS * BATCH * HEADS * query * keys * FP32
    return (LAYERS + 1) * BATCH * query * HIDDEN * FP32


def _record(model: Any, run: Path, flags: tuple[str, ...]) -> dict[str, Any]:
    import torch

    import kvtrace

    ids = torch.randint(3, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with kvtrace.record(run, model=model), torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
            do_sample=False,
            return_dict_in_generate=True,
            **dict.fromkeys(flags, True),
        )
    return json.loads((run / "manifest.json").read_text())


def _diagnosis(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["diagnose", str(run), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _kept(diagnosis: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in diagnosis["remedies"] if r["kind"] == "kept_outputs"]


def _notes(run: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    return [n for n in json.loads(capsys.readouterr().out)["notes"] if "keeps for every step" in n]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ((ATTENTIONS,), "attentions"),
        ((HIDDEN_STATES,), "hidden states"),
        ((ATTENTIONS, HIDDEN_STATES), "attentions and hidden states"),
    ],
    ids=["attentions", "hidden_states", "both"],
)
def test_dropping_the_kept_attentions_and_hidden_states_frees_what_the_calls_earlier_steps_hold(
    eager_model: Any, flags: tuple[str, ...], named: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() under eager attention that keeps `flags`, and the same call without them
    manifest = _record(eager_model, tmp_path / "kept", flags)
    assert [c.get("keeps") for c in manifest["generate_calls"]] == [list(flags)]
    _record(eager_model, tmp_path / "plain", ())

    # WHEN diagnosed at its peak
    kept = _diagnosis(tmp_path / "kept", capsys)
    (remedy,) = _kept(kept)

    # THEN the peak is the last step's, and steps 2 to the one before the one before it hold their kept
    # tensors (the prefill's are left out, as the run's first forward; the last step's, and the moment's)
    step = kept["step"]
    assert step == NEW_TOKENS
    counted = range(2, step - 1)
    held = sum(_step_bytes(flag, s) for flag in flags for s in counted)
    if flags == (ATTENTIONS,):  # the series in closed form: keys 17 + ... + 37 = 21 x 27 positions a row
        assert held == LAYERS * BATCH * HEADS * FP32 * len(counted) * (PROMPT + 1 + PROMPT + step - 3) // 2
        assert held == 72_576
    assert remedy["saved_bytes"] == held
    tensors = len(counted) * sum(_tensors(flag) for flag in flags)
    settings = ", ".join(f"{flag}=False" for flag in flags)
    assert remedy["sentence"].startswith(f"generate(..., {settings}) frees {human_bytes(held)}: ")
    assert f"keeps every step's {named} until it returns" in remedy["sentence"]
    assert f"its steps 2 to {step - 2} still hold {tensors:,} of them" in remedy["sentence"]
    # AND the report says what the peak's "other" holds of them, and which settings keep them
    assert _notes(tmp_path / "kept", capsys) == [
        f"at the peak (step {step}) the generate() call that began at step 1 held at least "
        f"{human_bytes(held)} of the {named} it keeps for every step ({', '.join(flags)}), counted as "
        "other: `kvtrace diagnose` prices dropping them"
    ]

    # AND the re-recording without them peaks lower by at least what the remedy frees, and by no more than
    # the outputs it leaves out besides: the prefill's, and those of the last step and the moment's
    without = _diagnosis(tmp_path / "plain", capsys)
    assert not _kept(without)
    left_out = sum(_step_bytes(flag, s) for flag in flags for s in (1, step - 1, step))
    dropped = kept["allocated_bytes"] - without["allocated_bytes"]
    assert held <= dropped <= held + left_out


def test_attentions_asked_of_sdpa_are_not_named_for_they_are_not_kept(
    sdpa_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() under sdpa that asks for its scores and its attentions: sdpa returns no weights
    manifest = _record(sdpa_model, tmp_path / "kept", ("output_scores", ATTENTIONS))
    # THEN the recorder notes the scores alone
    assert [c.get("keeps") for c in manifest["generate_calls"]] == [["output_scores"]]
    # AND the remedy frees what the scores hold, rows x vocabulary x float32 a counted step (min_new_tokens'
    # processor makes them from the logits, which the loop lets go), and names their setting alone
    diagnosis = _diagnosis(tmp_path / "kept", capsys)
    step = diagnosis["step"]
    assert step == NEW_TOKENS
    (remedy,) = _kept(diagnosis)
    held = (step - 3) * BATCH * VOCAB * FP32
    assert remedy["saved_bytes"] == held
    assert remedy["sentence"].startswith(f"generate(..., output_scores=False) frees {human_bytes(held)}: ")
    assert "keeps every step's scores until it returns" in remedy["sentence"]
    assert _notes(tmp_path / "kept", capsys) == [
        f"at the peak (step {step}) the generate() call that began at step 1 held at least "
        f"{human_bytes(held)} of the scores it keeps for every step (output_scores), counted as other: "
        "`kvtrace diagnose` prices dropping them"
    ]

    # AND asking for the attentions alone under sdpa keeps nothing: no call keeps, no remedy, no note
    manifest = _record(sdpa_model, tmp_path / "attentions", (ATTENTIONS,))
    assert [c.get("keeps") for c in manifest["generate_calls"]] == [None]
    attentions = _diagnosis(tmp_path / "attentions", capsys)
    assert not _kept(attentions)
    assert _notes(tmp_path / "attentions", capsys) == []
    # AND it peaks as the same call without them: nothing was kept to name
    _record(sdpa_model, tmp_path / "plain", ())
    assert attentions["allocated_bytes"] == _diagnosis(tmp_path / "plain", capsys)["allocated_bytes"]


def test_hidden_states_are_kept_under_sdpa_too(
    sdpa_model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() under sdpa that keeps its hidden states: the attention returns none of its own
    manifest = _record(sdpa_model, tmp_path / "kept", (HIDDEN_STATES,))
    assert [c.get("keeps") for c in manifest["generate_calls"]] == [[HIDDEN_STATES]]
    # THEN the remedy frees the counted steps' layers + 1 hidden states, rows x 1 x hidden x float32 each
    diagnosis = _diagnosis(tmp_path / "kept", capsys)
    step = diagnosis["step"]
    (remedy,) = _kept(diagnosis)
    assert remedy["saved_bytes"] == (step - 3) * (LAYERS + 1) * BATCH * HIDDEN * FP32 == 64_512
    assert remedy["sentence"].startswith(f"generate(..., {HIDDEN_STATES}=False) frees 63.00 KiB: ")
