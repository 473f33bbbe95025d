"""Module caches grown by torch.cat whose old storages outlive more than their own slot's rebinding: both
copies made before either store (`self.k_cache, self.v_cache = torch.cat(...), torch.cat(...)`), or the old
caches kept on a list the model holds until the step ends. The KV peak is the moment the most of them were
alive beside the new ones, as the storages' own lives, measured without kvtrace, say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.cli_json import report_json
from tests.integration.test_module_cache_cat_grown import (
    DECODES,
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    PROMPT,
    TOKEN_BYTES,
    LiveStorages,
    _record,
)

HELD = PROMPT + DECODES  # tokens per row each layer holds after the last step


class HeldOldsAttention(nn.Module):
    """K and V grown by torch.cat: `tuple` stores both copies in one statement, `locals` makes both into
    locals before storing either, `listed` appends the old tensors to the model's `past` list first."""

    def __init__(self, how: str, live: LiveStorages, past: list[torch.Tensor]) -> None:
        super().__init__()
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.how, self.live, self.past = how, live, past
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        born = self.live.born
        if self.k_cache is None or self.v_cache is None:
            self.k_cache, self.v_cache = born(k.contiguous()), born(v.contiguous())
        elif self.how == "tuple":  # both copies made, then old K released, then old V
            self.k_cache, self.v_cache = (
                born(torch.cat([self.k_cache, k], dim=-2)),
                born(torch.cat([self.v_cache, v], dim=-2)),
            )
        elif self.how == "locals":
            new_k = born(torch.cat([self.k_cache, k], dim=-2))
            new_v = born(torch.cat([self.v_cache, v], dim=-2))
            self.k_cache = new_k
            self.v_cache = new_v
        else:  # "listed": the old tensors stay alive on the model's list until the step ends
            self.past += [self.k_cache, self.v_cache]
            self.k_cache = born(torch.cat([self.k_cache, k], 2))
            self.v_cache = born(torch.cat([self.v_cache, v], 2))
        return x


class HeldOldsDecoder(nn.Module):
    def __init__(self, how: str, live: LiveStorages) -> None:
        super().__init__()
        self.past: list[torch.Tensor] = []
        self.layers = nn.ModuleList(HeldOldsAttention(how, live, self.past) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        self.past.clear()  # the step's end: every layer's old K and V released
        return x


@pytest.mark.parametrize("how", ["tuple", "locals"])
def test_both_copies_made_before_either_store_count_both_old_storages(
    how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose layers make the new K and V (torch.cat) before storing either, recorded over a
    # prefill and DECODES decode steps
    live = LiveStorages()
    model = HeldOldsDecoder(how, live)  # kept alive: its caches are the end's KV
    _record(tmp_path / "run", model)

    # WHEN the report reads its KV log
    kv = report_json(tmp_path / "run", capsys)["kv"]

    # THEN its KV peak is the last layer's two copies (HELD tokens each) beside its old K and V (HELD - 1
    # each), the layers before it grown
    peak = ((LAYERS - 1) * 2 * HELD + 2 * (HELD - 1) + 2 * HELD) * TOKEN_BYTES
    assert peak == 16512
    assert (kv["peak_bytes"], live.peak) == (peak, peak)
    # ... and the end holds every layer's HELD tokens
    final = LAYERS * 2 * HELD * TOKEN_BYTES
    assert (kv["final_bytes"], live.now) == (final, final) == (12672, 12672)


def test_old_caches_kept_until_the_step_ends_count_beside_every_layers_new_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose layers put their old K and V on a list the model clears as the step ends
    live = LiveStorages()
    model = HeldOldsDecoder("listed", live)  # kept alive: its caches are the end's KV
    _record(tmp_path / "run", model)

    # WHEN the report reads its KV log
    kv = report_json(tmp_path / "run", capsys)["kv"]

    # THEN its KV peak is the last step's every old K and V (HELD - 1 tokens each) beside every new one
    peak = (LAYERS * 2 * (HELD - 1) + LAYERS * 2 * HELD) * TOKEN_BYTES
    assert peak == 24192
    assert (kv["peak_bytes"], live.peak) == (peak, peak)
    # ... and the end holds every layer's HELD tokens, the old ones freed
    final = LAYERS * 2 * HELD * TOKEN_BYTES
    assert (kv["final_bytes"], live.now) == (final, final) == (12672, 12672)
    assert [layer["tokens"] for layer in kv["per_layer"]] == [HELD] * LAYERS
