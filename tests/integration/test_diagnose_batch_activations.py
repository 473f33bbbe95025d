"""`diagnose`'s smaller batch frees the activations that follow the rows too, not only their KV.

At a decode step's peak generate() holds several copies of the logits (rows x vocabulary x float32), and
the attention mask and token ids (rows x positions x int64): a batch one row smaller frees a row's share of
each, besides its KV. The figure is checked against re-recordings at the smaller batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import ModelSize, build_model
from tests.tiny import HEAD_DIM, HEADS, HIDDEN, record_generate

LAYERS, KV_HEADS, VOCAB, PROMPT, NEW_TOKENS, BATCH = 4, 4, 2000, 16, 40, 4
SIZE = ModelSize(
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_layers=LAYERS,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    vocab_size=VOCAB,
)


def _peak(run: Path, capsys: pytest.CaptureFixture[str]) -> int:
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    return int(json.loads(capsys.readouterr().out)["peak_allocated_bytes"])


def test_a_smaller_batch_frees_its_rows_activations_as_a_re_recording_shows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the same generate() recorded (profiler on: every allocation seen) at batch 4, 3 and 2
    peaks = {}
    for rows in (BATCH, BATCH - 1, BATCH - 2):
        record_generate(build_model(SIZE), tmp_path / f"b{rows}", rows, PROMPT, NEW_TOKENS)
        peaks[rows] = _peak(tmp_path / f"b{rows}", capsys)
    held = PROMPT + NEW_TOKENS - 1  # the last token generated is never written back
    kv_row = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4 * held  # a row's KV at the end, float32
    budget = peaks[BATCH - 1]  # batch 3 fits it exactly, as recorded
    need = peaks[BATCH] - budget

    # WHEN batch 4 is diagnosed under that budget
    assert main(["diagnose", str(tmp_path / f"b{BATCH}"), "--json", "--budget", f"{budget}B"]) == 0
    data = json.loads(capsys.readouterr().out)

    # THEN its moment holds every row's KV, whose row is less than the shortfall: by the KV alone batch 2
    # would be needed, but a row also frees its logits and attention mask, and batch 3 is proposed, freeing
    # exactly what the batch 3 recording shows
    assert (data["kv_bytes"], data["shortfall_bytes"]) == (BATCH * kv_row, need)
    assert kv_row < need and BATCH * (BATCH * kv_row - need) // (BATCH * kv_row) == BATCH - 2
    (batch,) = [r for r in data["remedies"] if r["kind"] == "batch"]
    assert (batch["setting"], batch["fits"]) == (BATCH - 1, True)
    assert batch["saved_bytes"] == peaks[BATCH] - peaks[BATCH - 1]
    said = batch["sentence"]
    assert f"Batch {BATCH - 1} instead of {BATCH} frees {human_bytes(need)}, enough to fit: " in said
    assert f"{human_bytes(kv_row)} of KV and {human_bytes(need - kv_row)} of the activations" in said

    # AND under a budget batch 3 misses by a byte, batch 2 is proposed, freeing what its recording shows
    assert main(["diagnose", str(tmp_path / f"b{BATCH}"), "--json", "--budget", f"{budget - 1}B"]) == 0
    (batch,) = [r for r in json.loads(capsys.readouterr().out)["remedies"] if r["kind"] == "batch"]
    assert (batch["setting"], batch["fits"]) == (BATCH - 2, True)
    assert batch["saved_bytes"] == peaks[BATCH] - peaks[BATCH - 2]


def test_at_batch_2_the_logits_as_long_as_a_vocabulary_vector_still_follow_the_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN generate() recorded at batch 2 and 1: at 2 the float32 logits (2 x vocabulary x 4 B) are as long
    # as the int64 vector over the vocabulary the logits processors make at a step (vocabulary x 8 B)
    peaks = {}
    for rows in (2, 1):
        record_generate(build_model(SIZE), tmp_path / f"b{rows}", rows, PROMPT, NEW_TOKENS)
        peaks[rows] = _peak(tmp_path / f"b{rows}", capsys)
    assert 2 * VOCAB * 4 == VOCAB * 8

    # WHEN batch 2 is diagnosed under batch 1's own peak, THEN batch 1 is proposed, freeing exactly what
    # its recording shows: the logits' copies count as the batch's, the one vector as fixed
    assert main(["diagnose", str(tmp_path / "b2"), "--json", "--budget", f"{peaks[1]}B"]) == 0
    (batch,) = [r for r in json.loads(capsys.readouterr().out)["remedies"] if r["kind"] == "batch"]
    assert (batch["setting"], batch["fits"], batch["saved_bytes"]) == (1, True, peaks[2] - peaks[1])

    # AND under a budget an int64 vocabulary vector's half below it, which batch 1's recording crosses,
    # no batch fits: a row's share of the memory beyond the weights leaves out the vectors no batch shrinks
    budget = peaks[1] - VOCAB * 8 // 2
    assert peaks[1] > budget
    assert main(["diagnose", str(tmp_path / "b2"), "--json", "--budget", f"{budget}B"]) == 0
    (batch,) = [r for r in json.loads(capsys.readouterr().out)["remedies"] if r["kind"] == "batch"]
    assert batch["fits"] is False, batch["sentence"]
    assert batch["sentence"].startswith("Even batch 1 does not fit")
