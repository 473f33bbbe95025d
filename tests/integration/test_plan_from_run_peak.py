"""`kvtrace plan --from-run` counts the run's own activations: the plan of the run itself peaks where the
recording did, and a plan in another batch or context bounds (or equals) that batch's or context's own
recording. Before, its peak was weights + KV peak + a 10% reserve, whatever the run measured beside them
(`kvtrace demo --cache static`: 95.17 MiB planned, "fits", for a run that peaked at 111.87 MiB)."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.cli_json import plan_json, report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, BATCH, PROMPT, NEW = 2, 2, 4, 11, 6
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_the_plan_of_the_run_itself_peaks_where_the_recording_did(
    model: Any, cache: str | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() recorded with its allocator events (the profiler's), on a budget below its peak
    run = tmp_path / "run"
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    options = {"cache_implementation": cache} if cache else {}
    with torch.no_grad(), kvtrace.record(run, model=model, gpu_memory=600 << 10):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0, **options,
        )  # fmt: skip
    report = report_json(run, capsys)
    peak = report["peak_allocated_bytes"]
    assert report["categories_at_peak"]["other"] > 0  # activations and logits beside weights and KV
    # WHEN it is planned from the run alone
    plan = plan_json(run, capsys)
    # THEN its KV is the arithmetic's, and its peak the recording's, activations included, no reserve beside
    assert plan["kv_bytes"] == TOKEN_ROW * BATCH * (PROMPT + NEW - 1)
    assert plan["peak_bytes"] == peak
    assert plan["request"]["reserve_bytes"] == 0
    # its activations are what the run held beside its weights and the KV its peak's moment held, the
    # prefill's prompt (before, the rest beside the KV peak, a decode step's growth copy, which the prefill
    # does not hold: 119,384 B where the run held 141,912)
    assert plan["kv_at_peak_bytes"] == report["categories_at_peak"]["kv"]
    assert plan["activations_bytes"] == peak - plan["weights_bytes"] - plan["kv_at_peak_bytes"]
    assert plan["activations_bytes"] == report["categories_at_peak"]["other"]
    # and it runs out of the budget the report says the run crosses
    assert report["budget"]["crossed"] and not plan["fits"]
    assert main(["plan", "--from-run", str(run)]) == 1
    assert "activations" in capsys.readouterr().out
    # a typed reserve goes on top of the measured peak
    reserved = plan_json(run, capsys, "--reserve", "64KiB")
    assert reserved["peak_bytes"] == peak + (64 << 10)


def test_a_plan_in_another_batch_or_context_bounds_its_own_recording(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run, and the same generate() recorded at half and twice its rows and 3 new tokens fewer
    runs = {name: tmp_path / name for name in ("run", "half", "double", "shorter")}
    record_generate(model, runs["run"], BATCH, PROMPT, NEW)
    record_generate(model, runs["half"], BATCH // 2, PROMPT, NEW)
    record_generate(model, runs["double"], BATCH * 2, PROMPT, NEW)
    record_generate(model, runs["shorter"], BATCH, PROMPT, NEW - 3)
    measured = {name: report_json(path, capsys) for name, path in runs.items()}
    peak = measured["run"]["peak_allocated_bytes"]
    # The tiny model peaks at its prefill (the logits of every prompt token): its KV then is the prompt's
    assert measured["run"]["categories_at_peak"]["kv"] == TOKEN_ROW * BATCH * PROMPT
    run = runs["run"]
    # WHEN half the batch is planned: the moment's KV falls by half, and its batch-first activations (the
    # logits) by half too (test_plan_from_run_one_setting checks the figure against diagnose's)
    half = plan_json(run, capsys, "--batch", str(BATCH // 2))["peak_bytes"]
    # THEN that is below the run's peak less half the prompt's KV: an upper bound of the recording
    assert measured["half"]["peak_allocated_bytes"] <= half < peak - TOKEN_ROW * (BATCH // 2) * PROMPT
    # WHEN twice the batch is planned: the activations grow in proportion, an upper bound again
    double = plan_json(run, capsys, "--batch", str(BATCH * 2))["peak_bytes"]
    activations = peak - measured["run"]["categories_at_peak"]["weights"] - TOKEN_ROW * BATCH * PROMPT
    assert double == peak + TOKEN_ROW * BATCH * PROMPT + activations
    assert measured["double"]["peak_allocated_bytes"] <= double
    # WHEN a shorter context on the same prompt is planned: the prefill moment is unchanged, exactly
    shorter = plan_json(run, capsys, "--context", str(PROMPT + NEW - 3), "--prompt", str(PROMPT))
    assert shorter["peak_bytes"] == measured["shorter"]["peak_allocated_bytes"] == peak
    assert shorter["kv_bytes"] == TOKEN_ROW * BATCH * (PROMPT + NEW - 4)


def test_a_run_cut_short_plans_as_launched_above_the_whole_runs_peak(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a generate() of 30 new tokens stopped by an OOM at its 5th step, and the same run to its end
    from transformers import LogitsProcessor, LogitsProcessorList

    class OomAt(LogitsProcessor):
        def __init__(self, step: int) -> None:
            self.step, self.calls = step, 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == self.step:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB (simulated)")
            return scores

    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    runs = {"cut": tmp_path / "cut", "whole": tmp_path / "whole"}
    for name, step in (("cut", 5), ("whole", 0)):
        try:
            with torch.no_grad(), kvtrace.record(runs[name], model=model):
                model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30,
                    do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([OomAt(step)]),
                )  # fmt: skip
        except torch.OutOfMemoryError:
            assert name == "cut"
    whole = report_json(runs["whole"], capsys)["peak_allocated_bytes"]
    # WHEN the cut run is planned as it was launched
    plan = plan_json(runs["cut"], capsys)
    # THEN its KV is the whole run's, and its peak counts activations beside it: at least the whole run's
    assert plan["kv_bytes"] == TOKEN_ROW * BATCH * (PROMPT + 30 - 1)
    assert plan["activations_bytes"] > 0
    assert plan["peak_bytes"] >= whole


def test_a_sliding_window_run_planned_at_a_longer_context_bounds_the_long_prompts_recording(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the demo's sliding-window run (a window of 16, a 20-token prompt), and the same model recorded
    # with the 122-token prompt, the worst at context 124
    short, long = tmp_path / "short", tmp_path / "long"
    sliding = ["--cache", "sliding", "--window", "16", "--batch", "2", "--no-report"]
    assert main(["demo", "--out", str(short), *sliding, "--new-tokens", "4"]) == 0
    prompt = " ".join(["hello"] * 121)  # 122 tokens with the BOS
    prompts = ["--prompt", prompt, "--prompt", prompt]
    assert main(["demo", "--out", str(long), *sliding, *prompts, "--new-tokens", "2"]) == 0
    capsys.readouterr()
    measured = report_json(long, capsys)["peak_allocated_bytes"]
    # WHEN the short run is planned at context 124 with that prompt (--context alone keeps the run's)
    plan = plan_json(short, capsys, "--context", "124", "--prompt", "122")
    # THEN the long prompt's prefill is priced with its activations, grown with the prompt: an upper bound
    assert plan["prompt_tokens"] == 122
    assert plan["activations_bytes"] > 0
    assert plan["peak_bytes"] >= measured


def test_a_beam_search_run_plans_other_beams(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a beam search of 3 beams on 2 prompts (6 rows)
    run = tmp_path / "run"
    ids = torch.randint(3, 1000, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, num_beams=3,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    # WHEN it is planned with 2 beams on 2 prompts, or with greedy search: both are accepted, their KV exact
    for beams, batch in ((2, 4), (1, 2)):
        plan = plan_json(run, capsys, "--beams", str(beams), "--batch", str(batch))
        assert plan["kv_bytes"] == TOKEN_ROW * batch * (PROMPT + NEW - 1)
        assert plan["request"]["beams"] == beams


def test_a_smaller_batch_of_a_run_that_peaked_decoding_moves_its_peak_by_the_kv_alone(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose peak is its last decode step (a short prompt, many new tokens)
    prompt, new = 3, 40

    def recorded(batch: int, name: str) -> dict[str, Any]:
        ids = torch.randint(3, 1000, (batch, prompt), generator=torch.Generator().manual_seed(0))
        gc.collect()  # tensors other tests left in cycles, freed mid-recording, are not this run's (as sweep)
        with torch.no_grad(), kvtrace.record(tmp_path / name, model=model):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return report_json(tmp_path / name, capsys)

    report = recorded(BATCH, "run")
    assert report["kv"]["final_bytes"] == BATCH * (prompt + new - 1) * TOKEN_ROW
    # WHEN it is planned at one row
    planned = plan_json(tmp_path / "run", capsys, "--batch", "1")
    # THEN its peak is the run's less the KV the other rows held at that moment (the prefill is no later
    # moment: the run's own was smaller than its peak, and so is one row's), and bounds one row's recording
    held_less = (BATCH - 1) * (prompt + new - 1) * TOKEN_ROW
    assert planned["peak_bytes"] <= report["peak_allocated_bytes"] - held_less
    one_row = recorded(1, "one_row")
    assert planned["peak_bytes"] >= one_row["peak_allocated_bytes"], one_row["categories_at_peak"]


def test_a_beam_search_run_plans_another_beam_count_at_that_counts_recorded_peak(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN beam searches of 4 and of 2 beams on 2 prompts, each peaking at a step's end (its logits), a
    # short prompt and many new tokens
    prompts, prompt, new = 2, 3, 40
    written = prompt + new - 1
    recorded = {}
    for beams in (4, 2):
        run = tmp_path / f"beams{beams}"
        ids = torch.randint(3, 1000, (prompts, prompt), generator=torch.Generator().manual_seed(0))
        gc.collect()  # tensors other tests left in cycles, freed mid-recording, are not this run's
        with torch.no_grad(), kvtrace.record(run, model=model):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                num_beams=beams, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        report = report_json(run, capsys)
        assert report["kv"]["final_bytes"] == prompts * beams * written * TOKEN_ROW
        recorded[beams] = report["peak_allocated_bytes"]
    for run_beams, beams in ((4, 2), (2, 4)):
        # WHEN one is planned at the other's beams and rows
        rows = prompts * beams
        plan = plan_json(tmp_path / f"beams{run_beams}", capsys, "--beams", str(beams), "--batch", str(rows))
        # THEN its peak is the other's recording, from above, by less than a reorder's copy of one layer's K
        # (all written tokens of every row): the run's step-end activations that do not follow the rows are
        # kept whole. The copy and the growth copies live inside a cache update or a reorder, never beside
        # the logits the step ends with; before, they were added on top of those, and the plan was over by
        # more than the copy (4 -> 2 beams: 24,304 B over 753,126; 2 -> 4: 52,086 B over 944,918)
        one_layer_k = rows * written * KV_HEADS * HEAD_DIM * 4
        assert recorded[beams] <= plan["peak_bytes"] < recorded[beams] + one_layer_k, (run_beams, beams)
