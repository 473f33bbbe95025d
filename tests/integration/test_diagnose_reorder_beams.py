"""Which `reorder_cache` calls are beam search's: `diagnose` counts a batch in prompts of `num_beams` rows,
and offers fewer beams, only where the recorded generate() call beam-searched; a caller reordering its own
rows leaves them the batch's sequences. And a batch of one sequence has none to drop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import kvtrace
from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.integration.kvlog_math import kv_bytes
from tests.tiny import HEAD_DIM, cache_arg, tiny_size

LAYERS, KV_HEADS, F32 = 2, 2, 4
PROMPT = 6


def _ids(prompts: int) -> torch.Tensor:
    return torch.randint(3, 1000, (prompts, PROMPT), generator=torch.Generator().manual_seed(0))


def _generate(model: Any, ids: torch.Tensor, new: int, **kwargs: Any) -> torch.Tensor:
    """Exactly `new` tokens (a random model may draw EOS early)."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


def _diagnose(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """diagnose --json of `run`, and its remedies by kind."""
    assert main(["diagnose", str(run), "--json"]) == 0, capsys.readouterr().err
    data = json.loads(capsys.readouterr().out)
    return data, {r["kind"]: r for r in data["remedies"]}


def _reorder_reasons(run: Path) -> list[str]:
    return [e.reason for e in read_run(run).kv_events if e.event == "reordered"]


def _live_peak(run: Path) -> int:
    """The KV log's peak, replayed from the raw file: a storage is live from its first event to `freed`."""
    live: dict[int, int] = {}
    peak = 0
    for event in read_run(run).kv_events:
        if event.event == "freed":
            live.pop(event.addr, None)
        elif event.addr and event.event != "written":
            live[event.addr] = event.storage_bytes
        peak = max(peak, sum(live.values()))
    return peak


def test_a_callers_reorder_cache_between_greedy_calls_is_not_beam_search(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN greedy generate() on 4 prompts, then the caller permuting the cache's rows (pairs swapped:
    # reorder_cache keeps within blocks of 2 rows, as 2 beams a prompt would) and a second greedy call
    prompts, first, second = 4, 4, 3
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    cache = DynamicCache(config=model.config)
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        seq = _generate(model, _ids(prompts), first, **cache_arg(cache))
        order = torch.tensor([1, 0, 3, 2])
        cache.reorder_cache(order)
        _generate(model, seq[order], second, **cache_arg(cache))

    # WHEN it is diagnosed
    data, remedies = _diagnose(run, capsys)

    # THEN the reorder is logged as none of beam search's (every layer's K and V), and the 4 rows are 4
    # sequences: no beams, no fewer-beams remedy, a batch remedy per sequence that names no beams
    assert _reorder_reasons(run) == ["no_beams"] * LAYERS * 2
    held = PROMPT + first + second - 1  # the last token generated is never written back
    assert data["kv_final_bytes"] == LAYERS * 2 * kv_bytes(KV_HEADS, HEAD_DIM, held, prompts, F32)
    assert (data["batch"], data["beams"]) == (prompts, None)
    assert "beams" not in remedies
    kv = _live_peak(run)
    assert data["kv_bytes"] == kv
    batch = remedies["batch"]
    assert (batch["setting"], batch["saved_bytes"]) == (prompts - 1, round(kv / prompts))
    each = human_bytes(kv / prompts)
    assert batch["sentence"] == f"Each sequence dropped from the batch of {prompts} frees {each} of KV."


@pytest.mark.parametrize(
    ("where", "beams", "returned"),
    [("call", 2, 2), ("generation_config", 4, 3), ("model", 3, 1)],
)
def test_beam_search_tells_its_beams_wherever_num_beams_is_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, beams: int, returned: int
) -> None:
    # GIVEN beam search over 2 prompts, num_beams set in the call, in the generation_config it is passed,
    # or in the model's generation_config (as transformers resolves it), some returning several sequences
    prompts, new = 2, 4
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    settings: dict[str, Any] = {"num_return_sequences": returned}
    if where == "call":
        settings["num_beams"] = beams
    elif where == "generation_config":
        settings["generation_config"] = GenerationConfig(num_beams=beams, num_return_sequences=returned)
        del settings["num_return_sequences"]
    else:
        model.generation_config.num_beams = beams
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        out = _generate(model, _ids(prompts), new, **settings)
    assert out.shape[0] == prompts * returned

    # WHEN it is diagnosed
    data, remedies = _diagnose(run, capsys)

    # THEN its first reorder tells its beams (every layer's K and V), and the rows are prompts x beams
    reasons = _reorder_reasons(run)
    assert reasons[: LAYERS * 2] == [f"beams:{beams}"] * LAYERS * 2
    assert set(reasons[LAYERS * 2 :]) == {""}
    assert (data["batch"], data["beams"]) == (prompts * beams, beams)
    kv = _live_peak(run)
    assert data["kv_bytes"] == kv
    assert remedies["beams"]["setting"] == beams - 1
    assert remedies["beams"]["saved_bytes"] == round(kv / beams)
    batch = remedies["batch"]
    assert batch["sentence"].startswith(
        f"Each prompt dropped from the batch of {prompts} ({beams} beams each)"
    )


@pytest.mark.parametrize("beams", [1, 2])
def test_at_batch_1_the_batch_remedy_says_there_is_no_sequence_to_drop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], beams: int
) -> None:
    # GIVEN one prompt, greedy or beam-searched with 2 beams
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        _generate(model, _ids(1), 3, num_beams=beams)

    # WHEN it is diagnosed
    data, remedies = _diagnose(run, capsys)

    # THEN a smaller batch frees nothing, and its sentence says so rather than pricing a dropped sequence
    kv = _live_peak(run)
    assert (data["batch"], data["kv_bytes"]) == (beams, kv)
    batch = remedies["batch"]
    assert (batch["setting"], batch["saved_bytes"]) == (None, 0)
    each = f" ({beams} beams each)" if beams > 1 else ""
    assert batch["sentence"] == f"The run is at batch 1 already{each}: a smaller batch is no remedy."
    # AND under beam search fewer beams still does: num_beams=1 frees half the KV
    if beams > 1:
        assert (remedies["beams"]["setting"], remedies["beams"]["saved_bytes"]) == (1, round(kv / 2))


def test_a_batch_repeat_or_select_says_which_in_its_reason(tmp_path: Path) -> None:
    # GIVEN a prefill of 2 prompts, then the caller repeating each row twice and selecting rows 0 and 3
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    cache = DynamicCache(config=model.config)
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model(_ids(2), **cache_arg(cache), use_cache=True)
        cache.batch_repeat_interleave(2)
        cache.batch_select_indices(torch.tensor([0, 3]))

    # THEN each method's `reordered` events (every layer's K and V) name it as their reason, in order
    n = LAYERS * 2
    assert _reorder_reasons(run) == ["batch_repeat_interleave"] * n + ["batch_select_indices"] * n
    # AND the rows each logs are its own: 4 after the repeat, 2 after the selection
    rows = [e.shape[0] for e in read_run(run).kv_events if e.event == "reordered"]
    assert rows == [4] * n + [2] * n
