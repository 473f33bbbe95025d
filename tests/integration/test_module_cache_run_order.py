"""Module caches grown by torch.cat that run in another order than their modules are registered in: layers
run last to first, a layer's second cache module run before its first, a module's second K/V pair (in
`cache_attrs`' order) grown before its first, and a beam reorder that rebinds every layer's K and V between
steps. The KV log must follow the storages' own lives, measured without kvtrace: a free logged after a new
storage made where it was, or held past layers that ran before it, miscounts the peak or the end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kvtrace
from tests.cli_json import report_json
from tests.integration.test_module_cache_cat_grown import (
    DECODES,
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    PROMPT,
    ROWS,
    TOKEN_BYTES,
    LiveStorages,
    _record,
)
from tests.integration.test_module_cache_olds_held import HeldOldsAttention

HELD = PROMPT + DECODES  # tokens per row each cache holds after the last step
# The allocator hands out addresses in an order that varies from run to run, and a free logged after a new
# storage at its address shows only where one lands there: several recordings meet it
RECORDINGS = 8


class GrownAttention(nn.Module):
    """K and V grown by torch.cat, each old tensor released as its new one is bound; with `two_pairs`, a
    second pair, `past_k`/`past_v`, grown after the first."""

    def __init__(self, live: LiveStorages, two_pairs: bool = False) -> None:
        super().__init__()
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.live, self.two_pairs = live, two_pairs
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.past_k: torch.Tensor | None = None
        self.past_v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        born = self.live.born
        if self.k_cache is None or self.v_cache is None:
            self.k_cache, self.v_cache = born(k.contiguous()), born(v.contiguous())
        else:
            self.k_cache = born(torch.cat([self.k_cache, k], 2))
            self.v_cache = born(torch.cat([self.v_cache, v], 2))
        if not self.two_pairs:
            return x
        if self.past_k is None or self.past_v is None:
            self.past_k, self.past_v = born(k.contiguous()), born(v.contiguous())
        else:
            self.past_k = born(torch.cat([self.past_k, k], 2))
            self.past_v = born(torch.cat([self.past_v, v], 2))
        return x


class OrderedDecoder(nn.Module):
    """Its layers run from the last registered to the first (`reverse`), or in order."""

    def __init__(self, how: str, live: LiveStorages, reverse: bool = True) -> None:
        super().__init__()
        past: list[torch.Tensor] = []
        self.reverse = reverse
        self.layers = nn.ModuleList(
            GrownAttention(live) if how == "rebound-at-once" else HeldOldsAttention(how, live, past)
            for _ in range(LAYERS)
        )

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers[::-1] if self.reverse else self.layers:
            x = layer(x, start_pos)
        return x


@pytest.mark.parametrize("how", ["rebound-at-once", "tuple", "locals"])
def test_layers_run_last_to_first_count_each_old_storage_as_long_as_it_lived(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose layers run in the opposite order to their registration, each growing its K and
    # V by torch.cat (each old released as its new one is bound; or both copies made before either store)
    for recording in range(RECORDINGS):
        live = LiveStorages()
        model = OrderedDecoder(how, live)  # kept alive: its caches are the end's KV
        run = tmp_path / f"run{recording}"
        _record(run, model)

        # WHEN the report reads its KV log
        kv = report_json(run, capsys)["kv"]

        # THEN its KV peak is the last layer to run growing at the last step beside the others grown: its
        # old K and V (HELD - 1) beside its new ones (HELD) one at a time, or both at once
        copy = HELD + (HELD - 1) + HELD if how == "rebound-at-once" else 2 * (HELD - 1) + 2 * HELD
        peak = ((LAYERS - 1) * 2 * HELD + copy) * TOKEN_BYTES
        assert peak == (14592 if how == "rebound-at-once" else 16512)
        assert (kv["peak_bytes"], live.peak) == (peak, peak), recording
        # ... and the end holds every layer's HELD tokens
        final = LAYERS * 2 * HELD * TOKEN_BYTES
        assert (kv["final_bytes"], live.now) == (final, final) == (12672, 12672), recording


def test_a_beam_reorder_between_steps_keeps_every_layers_k_and_v(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose K and V caches a beam search reorders before each decode step (every layer's
    # K and V rebound to an index_select copy, the old ones released before the forward grows the copies)
    for recording in range(RECORDINGS):
        live = LiveStorages()
        model = OrderedDecoder("rebound-at-once", live, reverse=False)
        run = tmp_path / f"run{recording}"
        x = torch.randn(ROWS, PROMPT + DECODES, HIDDEN)
        beams = torch.tensor([2, 0, 0])
        with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, snapshots=False):
            model(x[:, :PROMPT], 0)
            for pos in range(PROMPT, PROMPT + DECODES):
                for layer in model.layers:
                    layer.k_cache = live.born(layer.k_cache.index_select(0, beams))
                    layer.v_cache = live.born(layer.v_cache.index_select(0, beams))
                model(x[:, pos : pos + 1], pos)

        # WHEN the report reads its KV log
        kv = report_json(run, capsys)["kv"]

        # THEN the end holds every layer's K and V, HELD tokens each
        final = LAYERS * 2 * HELD * TOKEN_BYTES
        assert (kv["final_bytes"], live.now) == (final, final) == (12672, 12672), recording
        assert [row["k_bytes"] + row["v_bytes"] for row in kv["per_layer"]] == [final // LAYERS] * LAYERS
        # (its peak is not checked: the beam's copies, rebound outside the forward and grown inside it, are
        # never scanned, so the log cannot say when they lived)


class TwoPairAttention(GrownAttention):
    """Two K/V pairs on one module, `k_cache`/`v_cache` grown before `past_k`/`past_v`."""

    def __init__(self, live: LiveStorages) -> None:
        super().__init__(live, two_pairs=True)


class CrossFirstBlock(nn.Module):
    """`cross_attn` registered first, `self_attn` run first."""

    def __init__(self, live: LiveStorages) -> None:
        super().__init__()
        self.cross_attn = GrownAttention(live)
        self.self_attn = GrownAttention(live)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.cross_attn(self.self_attn(x, start_pos), start_pos)


class TwoCacheDecoder(nn.Module):
    def __init__(self, block: type[nn.Module], live: LiveStorages) -> None:
        super().__init__()
        self.layers = nn.ModuleList(block(live) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


@pytest.mark.parametrize("block", [CrossFirstBlock, TwoPairAttention], ids=["two-modules", "two-pairs"])
def test_a_layers_two_caches_run_in_another_order_than_registered_count_as_they_lived(
    block: type[nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose every layer holds two caches grown by torch.cat, the one registered second
    # (`self_attn` after `cross_attn`; `past_k`/`past_v` listed before `k_cache`/`v_cache` in
    # cache_attrs) run first
    cache_attrs = {"past_k": "k", "past_v": "v", "k_cache": "k", "v_cache": "v"}
    for recording in range(RECORDINGS):
        live = LiveStorages()
        model = TwoCacheDecoder(block, live)
        run = tmp_path / f"run{recording}"
        x = torch.randn(ROWS, PROMPT + DECODES, HIDDEN)
        attrs = cache_attrs if block is TwoPairAttention else None
        with (
            torch.no_grad(),
            kvtrace.record(run, model=model, profiler=False, snapshots=False, cache_attrs=attrs),
        ):
            model(x[:, :PROMPT], 0)
            for pos in range(PROMPT, PROMPT + DECODES):
                model(x[:, pos : pos + 1], pos)

        # WHEN the report reads its KV log
        kv = report_json(run, capsys)["kv"]

        # THEN the end holds both caches' HELD tokens in every layer
        final = 2 * LAYERS * 2 * HELD * TOKEN_BYTES
        assert (kv["final_bytes"], live.now) == (final, final) == (25344, 25344), recording
        # ... and its peak is the last cache to run growing at the last step beside the five others grown,
        # each old released as its new one is bound
        peak = ((2 * LAYERS - 1) * 2 * HELD + HELD + (HELD - 1) + HELD) * TOKEN_BYTES
        assert (kv["peak_bytes"], live.peak) == (peak, peak) == (27264, 27264), recording
