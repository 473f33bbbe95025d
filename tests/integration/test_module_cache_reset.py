"""Module caches let go between two generations in one recording (`reset_cache()`: `self.k_cache = None;
self.v_cache = None`, or `self.k_cache = self.v_cache = None`): a store of None is no regrown cache, so
the old storages' frees are logged where they happened, before the next prefill's new ones, and the KV
peak is the storages' own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kvtrace
from tests.cli_json import report_json
from tests.integration.test_module_cache_cat_grown import (
    DECODES,
    HIDDEN,
    LAYERS,
    PROMPT,
    ROWS,
    TOKEN_BYTES,
    CatAttention,
    LiveStorages,
)

GENERATIONS = 2
# The allocator's addresses vary between runs, and with them the order the old code read: recorded
# several times, a wrong order shows in nearly every batch
RUNS = 8


class ResetAttention(CatAttention):
    """K and V grown by torch.cat, each old tensor let go as its new one is bound; `reset_cache` sets both
    to None, in two statements or one chained."""

    def __init__(self, live: LiveStorages, chained: bool) -> None:
        super().__init__(False, live)
        self.chained = chained

    def reset_cache(self) -> None:
        if self.chained:
            self.k_cache = self.v_cache = None
        else:
            self.k_cache = None
            self.v_cache = None


class ResetDecoder(nn.Module):
    def __init__(self, live: LiveStorages, chained: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ResetAttention(live, chained) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


def _record_generations(run: Path, model: ResetDecoder) -> None:
    """GENERATIONS of a prefill of PROMPT tokens and DECODES one-token forwards, the caches reset first."""
    x = torch.randn(ROWS, PROMPT + DECODES, HIDDEN)
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, snapshots=False):
        for _ in range(GENERATIONS):
            for layer in model.layers:
                layer.reset_cache()
            model(x[:, :PROMPT], 0)
            for pos in range(PROMPT, PROMPT + DECODES):
                model(x[:, pos : pos + 1], pos)


@pytest.mark.parametrize("chained", [False, True], ids=["two-statements", "chained"])
def test_caches_reset_to_none_between_generations_free_before_the_next_prefill(
    chained: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for run_idx in range(RUNS):
        # GIVEN a decoder whose layers grow K and V by torch.cat, rebinding each at once, and whose
        # caches are reset to None before each of two generations, recorded in one block
        live = LiveStorages()
        run = tmp_path / f"run{run_idx}"
        model = ResetDecoder(live, chained)  # kept: its caches are the end's
        _record_generations(run, model)

        # WHEN the report reads its KV log
        kv = report_json(run, capsys)["kv"]

        # THEN its KV peak is a generation's last layer's K copy (T tokens) beside old K (T-1) and new V
        # (T), the layers before it grown: the reset's frees come before the next prefill's storages
        held = PROMPT + DECODES
        peak = ((LAYERS - 1) * 2 * held + held + (held - 1) + held) * TOKEN_BYTES
        assert peak == 14592
        assert (kv["peak_bytes"], live.peak) == (peak, peak), run_idx
        # ... and the end holds the second generation's T tokens in every layer
        final = LAYERS * 2 * held * TOKEN_BYTES
        assert final == 12672
        assert (kv["final_bytes"], live.now) == (final, final), run_idx
        assert [layer["tokens"] for layer in kv["per_layer"]] == [held] * LAYERS
