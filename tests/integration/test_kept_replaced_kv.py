"""A loop of one's own that keeps every step's `(layer.keys, layer.values)`: the DynamicCache's torch.cat
replaces them each step, but the list holds the old storages, so the KV log counts them (exactly) as KV.
The report says so, its bytes per token says what it is without them, and `diagnose` prices dropping them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, cache_arg, tiny_size

LAYERS, KV_HEADS, PROMPT, DECODES, BATCH = 2, 2, 8, 10, 2
SLOT_TOKEN_BYTES = KV_HEADS * HEAD_DIM * 4  # float32 K (or V) of one layer: 128 B a token and row
TOKEN_BYTES = LAYERS * 2 * SLOT_TOKEN_BYTES  # 512 B of KV a token and row
# Each decode step replaces every layer's K and V, of PROMPT, PROMPT + 1, ... tokens
REPLACED = LAYERS * 2 * DECODES
REPLACED_BYTES = LAYERS * 2 * sum(t * BATCH * SLOT_TOKEN_BYTES for t in range(PROMPT, PROMPT + DECODES))
HELD_BYTES = (PROMPT + DECODES) * BATCH * TOKEN_BYTES  # what the cache itself holds at the end


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """The same greedy loop under no_grad, keeping every step's K and V in a list, and not."""
    import torch
    from transformers import DynamicCache

    import kvtrace

    model = build_model(tiny_size(LAYERS, KV_HEADS), dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("kept")
    runs = {}
    for keep in (True, False):
        runs[keep] = folder / str(keep)
        history: list[list[tuple[Any, Any]]] = []
        with kvtrace.record(runs[keep], model=model), torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(ids, **cache_arg(cache), use_cache=True)
            for _ in range(DECODES):
                if keep:  # "for debugging": the list holds each step's tensors past the cache's torch.cat
                    history.append([(layer.keys, layer.values) for layer in cache.layers])
                out = model(out.logits[:, -1:].argmax(-1), **cache_arg(cache), use_cache=True)
        del out, cache, history
    return runs


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_the_report_says_the_replaced_storages_are_held_from_outside(
    runs: dict[bool, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    report = _json(capsys, "report", str(runs[True]), "--json", "--no-export", "-q")
    kv = report["kv"]
    # GIVEN the KV log counts the cache's own KV and the replaced storages the list holds
    assert kv["final_bytes"] == HELD_BYTES + REPLACED_BYTES
    rows = (PROMPT + DECODES) * BATCH
    assert kv["bytes_per_token_measured"] == (HELD_BYTES + REPLACED_BYTES) / rows
    # THEN a note says what holds the difference, and the bytes per token what it is without them
    held = human_bytes(REPLACED_BYTES)
    assert (
        f"{REPLACED} K/V storages the cache replaced were never freed ({held} of the final KV's "
        f"{human_bytes(HELD_BYTES + REPLACED_BYTES)}): something outside the cache still holds them (a list "
        f"of past keys or values, a kept output); dropping them frees {held}"
    ) in report["notes"]
    assert kv["bytes_per_token_note"] == (
        f"the measured figure counts {held} of replaced K/V storages that something outside the cache "
        f"still holds: without them it is {TOKEN_BYTES:,.1f}"
    )
    text = main(["report", str(runs[True]), "--no-export", "-q"])
    assert text == 0
    assert f"({kv['bytes_per_token_note']})" in capsys.readouterr().out
    # AND the loop that keeps nothing holds the arithmetic, with no such note
    plain = _json(capsys, "report", str(runs[False]), "--json", "--no-export", "-q")
    assert plain["kv"]["final_bytes"] == HELD_BYTES
    assert plain["kv"]["bytes_per_token_note"] is None
    assert not [note for note in plain["notes"] if "never freed" in note]


def test_diagnose_prices_dropping_the_kept_storages(
    runs: dict[bool, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    diagnosis = _json(capsys, "diagnose", str(runs[True]), "--json")
    # GIVEN the peak is the end of the last step, every replaced storage live
    assert (diagnosis["step"], diagnosis["tokens_held"], diagnosis["batch"]) == (
        DECODES + 1,
        PROMPT + DECODES,
        BATCH,
    )
    # THEN dropping them frees them all, and a note says the cache's remedies count them
    (remedy,) = [r for r in diagnosis["remedies"] if r["kind"] == "kept_kv"]
    assert remedy["saved_bytes"] == REPLACED_BYTES
    assert f"the {REPLACED} K/V storages the cache replaced" in remedy["sentence"]
    assert (
        f"the KV at this moment counts {REPLACED} K/V storages the cache replaced that were never freed "
        f"({human_bytes(REPLACED_BYTES)} of the {human_bytes(diagnosis['kv_bytes'])})"
    ) in "\n".join(diagnosis["notes"])
    plain = _json(capsys, "diagnose", str(runs[False]), "--json")
    assert not [r for r in plain["remedies"] if r["kind"] == "kept_kv"]
