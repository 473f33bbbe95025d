"""`kvtrace plan --from-run RUN --cache static` of an sdpa run whose prompts were padded prices what the
static prefill makes over the cache's positions beyond the run's prompt: transformers (5.x) builds a bool
mask over every cache position (`masking_utils.sdpa_mask`, skipped only for unpadded prompts), and with a
mask its sdpa path expands K and V to the query heads (`use_gqa_in_sdpa` false, `repeat_kv`), a layer at a
time, torch turning the bool mask into one of the compute dtype. The plan cannot see padding in the run's
memory: the recorder keeps a weak reference to each generate() call's attention_mask and reads it after the
block's last measurement, into the manifest's `generate_calls` (no read inside the call, nothing held in the
measured memory); a mask freed before then is told as unknown, planned as padded with a note. Before, the tiny
Llama below (fp32, 2 rows, 20-token prompt, the first half padded, 16 new tokens) planned 697,168 B where
the static recording peaked at 697,696 B: 528 B below, the prefill's mask beyond the prompt (2 x 20 x 15 B)
less the decode step's (2 x 36 B) unpriced; 716,680 B after, 2.7% above, the layer's copies beside the
prefill's most, which came in an MLP; now 697,696 B, the recording's, priced beside what the run held while
its last layer attended (analyzers.planning.attention_moment)."""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, HEADS, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW = 2, 2, 2, 20, 16
CONTEXT = PROMPT + NEW
FP32 = 4
# What a padded sdpa static prefill makes a row and cache position beyond the run's prompt (the cache holds
# the context less one, 35): a bool mask element and its float32 copy a prompt token, and one layer's K and
# V expanded to the query heads
POSITION_ROW = PROMPT * (1 + FP32) + 2 * HEADS * HEAD_DIM * FP32
BEYOND = CONTEXT - 1 - PROMPT  # the cache's positions past the prompt


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same greedy sdpa generate() on a dynamic and on a static cache, its prompts unpadded and padded
    (the first row's first half)."""
    model = build_model(tiny_size(LAYERS, KV_HEADS), dtype=torch.float32).eval()
    assert model.config._attn_implementation == "sdpa"  # transformers' default
    folder = tmp_path_factory.mktemp("static_padded_sdpa")
    found = {}
    for padded in (0, PROMPT // 2):
        for cache in ("dynamic", "static"):
            name = f"{cache}_{'padded' if padded else 'unpadded'}"
            found[name] = folder / name
            record_generate(model, found[name], BATCH, PROMPT, NEW, cache, padded=padded)
    return found


def _calls(run: Path) -> list[dict[str, Any]]:
    """The run's generate() calls as its manifest tells them, each checked against its prefill sample."""
    calls: list[dict[str, Any]] = json.loads((run / "manifest.json").read_text())["generate_calls"]
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    prefills = [s["step"] for s in samples if s.get("phase") == "prefill"]
    assert [call["step"] for call in calls] == prefills
    return calls


def _as_recorded_before(run: Path, into: Path) -> Path:
    """A copy of `run` as kvtrace wrote it before it noted padding: no `generate_calls` in its manifest."""
    shutil.copytree(run, into)
    manifest = json.loads((into / "manifest.json").read_text())
    del manifest["generate_calls"]
    (into / "manifest.json").write_text(json.dumps(manifest))
    return into


def _unknown_padding_notes(plan: dict[str, Any]) -> list[str]:
    return [note for note in plan["notes"] if "whether its generate() call's prompts were padded" in note]


def test_the_recorder_notes_whether_a_calls_prompts_were_padded(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    # GIVEN generate() calls passed an attention_mask with zeros, and one of ones, alive as the block ended
    # THEN the manifest says so, for the call's prefill step
    assert [call["padded"] for call in _calls(runs["dynamic_padded"])] == [True]
    assert [call["padded"] for call in _calls(runs["static_padded"])] == [True]
    assert [call["padded"] for call in _calls(runs["dynamic_unpadded"])] == [False]
    # AND a call passed no attention_mask says nothing (transformers may infer one from the pad token)
    import kvtrace

    model = build_model(tiny_size(1, KV_HEADS), dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (BATCH, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(tmp_path / "no_mask", model=model):
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    # (its entry says what it asked for, 4 + 2 positions, and no `padded`)
    assert _calls(tmp_path / "no_mask") == [
        {"step": 1, "prompt_end": 4, "max_length": 6, "max_new_tokens": 2}
    ]


def test_a_padded_sdpa_run_planned_static_prices_the_prefills_mask_and_expansions(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the padded dynamic run, which peaked at its prefill holding the prompt's KV
    dynamic = report_json(runs["dynamic_padded"], capsys)
    assert dynamic["categories_at_peak"]["kv"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * FP32 * BATCH * PROMPT
    prefill = dynamic["categories_at_peak"]["other"]
    # AND the static recording: its prefill held the bool mask over the cache's 15 positions beyond the prompt
    static = report_json(runs["static_padded"], capsys)
    assert static["categories_at_peak"]["other"] - prefill == BATCH * PROMPT * (CONTEXT - 1 - PROMPT)
    # WHEN the dynamic run is planned with --cache static at its own batch and context
    plan = plan_json(runs["dynamic_padded"], capsys, "--cache", "static")
    # THEN its peak is the recording's, byte for byte (528 B below, then 2.7% above, before)
    assert plan["peak_bytes"] == static["peak_allocated_bytes"]
    # AND the run told its padding: no note guesses it
    assert not _unknown_padding_notes(plan)


def test_an_unpadded_sdpa_run_planned_static_is_unchanged(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the unpadded dynamic run: its static prefill takes no mask (sdpa's is_causal path)
    prefill = report_json(runs["dynamic_unpadded"], capsys)["categories_at_peak"]["other"]
    # WHEN planned static
    plan = plan_json(runs["dynamic_unpadded"], capsys, "--cache", "static")
    # THEN its peak is the run's prefill beside the whole static cache, the static recording's byte for byte
    # (a step's end, beside the decode step's bool mask over the context, holds less than the prefill did:
    # before, the plan put the prefill's activations beside that mask too, 2 x 36 B over)
    assert plan["activations_bytes"] == prefill
    static = report_json(runs["static_unpadded"], capsys)["peak_allocated_bytes"]
    assert plan["peak_bytes"] == static


@pytest.mark.parametrize("which", ["padded", "unpadded"])
def test_a_run_recorded_before_padding_was_noted_is_planned_as_padded(
    which: str, runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run without `padded` in its samples, as kvtrace wrote runs before
    old = _as_recorded_before(runs[f"dynamic_{which}"], tmp_path / "old")
    prefill = report_json(old, capsys)["categories_at_peak"]["other"]
    # WHEN planned static
    plan = plan_json(old, capsys, "--cache", "static")
    # THEN it is priced as padded, the safe side, the padded prefill's copies beside its prefill's most (it
    # does not tell whether its prefill expanded K and V: where it attended is not read), and a note says why
    assert plan["activations_bytes"] == prefill + BATCH * BEYOND * POSITION_ROW
    assert len(_unknown_padding_notes(plan)) == 1


def test_a_mask_freed_before_the_block_ends_is_told_as_unknown_and_planned_as_padded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the padded sdpa generate() of `runs`, whose caller drops its attention_mask inside the block
    import kvtrace

    model = build_model(tiny_size(LAYERS, KV_HEADS), dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[0, : PROMPT // 2], mask[0, : PROMPT // 2] = 0, 0
    gc.collect()
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model):
        model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
        del mask
    # THEN the manifest tells the call's padding as unknown (the recorder kept no reference that held it)
    (call,) = _calls(tmp_path / "run")
    asked = {"prompt_end": PROMPT, "max_length": CONTEXT, "max_new_tokens": NEW}
    assert call == {"step": call["step"], "padded": None, **asked}
    # AND planned static it is priced as padded, the safe side, with a note that says the run did not tell
    prefill = report_json(tmp_path / "run", capsys)["categories_at_peak"]["other"]
    plan = plan_json(tmp_path / "run", capsys, "--cache", "static")
    assert plan["activations_bytes"] == prefill + BATCH * BEYOND * POSITION_ROW
    (note,) = _unknown_padding_notes(plan)
    assert "freed before the recording ended" in note
