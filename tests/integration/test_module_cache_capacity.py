"""A module cache's tokens are bounded by what it can hold and by whether it was written. A forward that
takes `start_pos` writes `start_pos + seqlen` tokens into the caches it grows, not into a cross-attention
cache made once from the encoder's positions (never written again), nor beyond the room of a 4-position
ring buffer or a window kept by slicing after torch.cat. The headline's main cache is the one that grows
with the decode, not such a fixed one written after it. A cache whose layout nothing tells (no KV heads
count on the model, names of no convention) is bounded only where its positions show, never by a dim
guessed to hold them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import kvtrace
from kvtrace.run_reader import read_run
from tests.cli_json import cli_json, report_json
from tests.integration.test_module_cache_cat_grown import (
    DECODES,
    FLOAT32,
    HEAD_DIM,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    PROMPT,
    ROWS,
    CatAttention,
    LiveStorages,
)

HELD = PROMPT + DECODES  # 11: the tokens a row of a cache grown by every forward holds at the end
ENCODER = 7  # the encoder's positions, those of a cross-attention cache
WINDOW = 4  # a ring buffer's positions, and a sliced window's
MAX_SEQ = 32  # a preallocated buffer's positions


class CrossAttention(nn.Module):
    """K and V made once, at the first forward, from the encoder's output; never written again."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
        if self.k_cache is None:
            rows, seq, _ = encoded.shape
            self.k_cache = self.k(encoded).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
            self.v_cache = self.v(encoded).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
        return x


class CrossBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = CatAttention(False, LiveStorages())
        self.cross_attn = CrossAttention()

    def forward(self, x: torch.Tensor, start_pos: int, encoded: torch.Tensor) -> torch.Tensor:
        return self.cross_attn(self.self_attn(x, start_pos), encoded)


class CrossDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(CrossBlock() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, start_pos: int, encoded: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos, encoded)
        return x


class RingAttention(nn.Module):
    """Meta's preallocated [rows, MAX_SEQ, heads, head_dim] buffers, written at `start_pos`, beside a ring
    buffer of WINDOW positions written at `position % WINDOW`."""

    def __init__(self) -> None:
        super().__init__()
        self.n_kv_heads = KV_HEADS
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.cache_k = torch.zeros(ROWS, MAX_SEQ, KV_HEADS, HEAD_DIM)
        self.cache_v = torch.zeros(ROWS, MAX_SEQ, KV_HEADS, HEAD_DIM)
        self.cache_k_local = torch.zeros(ROWS, WINDOW, KV_HEADS, HEAD_DIM)
        self.cache_v_local = torch.zeros(ROWS, WINDOW, KV_HEADS, HEAD_DIM)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM)
        v = self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM)
        self.cache_k[:rows, start_pos : start_pos + seq] = k
        self.cache_v[:rows, start_pos : start_pos + seq] = v
        slots = torch.arange(start_pos, start_pos + seq)[-WINDOW:] % WINDOW
        self.cache_k_local.index_copy_(1, slots, k[:, -WINDOW:])
        self.cache_v_local.index_copy_(1, slots, v[:, -WINDOW:])
        return x


class WindowAttention(CatAttention):
    """Grown by torch.cat, then cut to its last WINDOW positions."""

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if self.k_cache is not None and self.v_cache is not None:
            k, v = torch.cat([self.k_cache, k], 2), torch.cat([self.v_cache, v], 2)
        self.k_cache, self.v_cache = k[:, :, -WINDOW:].contiguous(), v[:, :, -WINDOW:].contiguous()
        return x


class Decoder(nn.Module):
    def __init__(self, layer: type[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            layer(False, LiveStorages()) if layer is WindowAttention else layer() for _ in range(LAYERS)
        )

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


class HeadsFirstAttention(nn.Module):
    """[rows, heads, seq, head_dim] K and V grown by torch.cat into `key_cache`/`value_cache`, on a model
    that says no KV heads count: nothing tells which dim holds the positions."""

    def __init__(self, heads: int, live: LiveStorages) -> None:
        super().__init__()
        self.heads, self.live = heads, live
        self.k = nn.Linear(HIDDEN, heads * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, heads * HEAD_DIM)
        self.key_cache: torch.Tensor | None = None
        self.value_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, self.heads, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, seq, self.heads, HEAD_DIM).transpose(1, 2)
        if self.key_cache is None or self.value_cache is None:
            self.key_cache = self.live.born(k.contiguous())
            self.value_cache = self.live.born(v.contiguous())
        else:
            self.key_cache = self.live.born(torch.cat([self.key_cache, k], 2))
            self.value_cache = self.live.born(torch.cat([self.value_cache, v], 2))
        return x


class HeadsFirstDecoder(nn.Module):
    def __init__(self, heads: int, live: LiveStorages) -> None:
        super().__init__()
        self.layers = nn.ModuleList(HeadsFirstAttention(heads, live) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


def _record(run: Path, model: nn.Module, *extra: torch.Tensor, **options: object) -> None:
    """A prefill of PROMPT tokens at start_pos 0, then DECODES one-token forwards at their positions."""
    x = torch.randn(ROWS, PROMPT + DECODES, HIDDEN)
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, snapshots=False, **options):
        model(x[:, :PROMPT], 0, *extra)
        for pos in range(PROMPT, PROMPT + DECODES):
            model(x[:, pos : pos + 1], pos, *extra)


def _per_layer(report: dict[str, object]) -> dict[tuple[int, int], tuple[int, int]]:
    kv = report["kv"]
    assert isinstance(kv, dict)
    return {(row["cache"], row["layer"]): (row["tokens"], row["k_bytes"]) for row in kv["per_layer"]}


def _main(report: dict[str, object]) -> int:
    kv = report["kv"]
    assert isinstance(kv, dict)
    return next(cache["cache"] for cache in kv["caches"] if cache["main"])


def test_a_cross_attention_cache_made_once_holds_the_encoders_positions_and_is_never_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose layers grow a self-attention cache and make a cross-attention one once
    model = CrossDecoder()
    _record(tmp_path / "run", model, torch.randn(ROWS, ENCODER, HIDDEN))

    # WHEN its log and report are read
    cross_k = [
        (event.step, event.event, event.tokens)
        for event in read_run(tmp_path / "run").kv_events
        if event.cache == 1001 and event.layer == 0 and event.kv == "k" and event.event != "freed"
    ]
    report = report_json(tmp_path / "run", capsys)
    notes = cli_json(["diagnose", str(tmp_path / "run"), "--json"], capsys)["notes"]

    # THEN the cross-attention K is logged once, made at the prefill holding its ENCODER positions
    assert cross_k == [(1, "created", ENCODER)]
    # ... its layers hold ENCODER tokens, the self-attention's HELD, each with its own bytes
    token = ROWS * KV_HEADS * HEAD_DIM * FLOAT32
    per_layer = _per_layer(report)
    assert per_layer == {
        **{(1000, layer): (HELD, HELD * token) for layer in range(LAYERS)},
        **{(1001, layer): (ENCODER, ENCODER * token) for layer in range(LAYERS)},
    }
    # ... and the headline is the self-attention cache's, which grew with the decode
    assert _main(report) == 1000
    assert report["kv"]["tokens_held"] == HELD
    assert any("the main cache's (cache 1000)" in note for note in notes)


@pytest.mark.parametrize("layer", [RingAttention, WindowAttention], ids=["ring-buffer", "sliced-window"])
def test_a_cache_never_holds_more_tokens_than_its_positions(
    layer: type[nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder keeping a WINDOW-position cache (a ring buffer beside Meta's buffers, or a window
    # sliced after torch.cat), written by every forward up to position HELD
    attrs = {"cache_k": "k", "cache_v": "v", "cache_k_local": "k", "cache_v_local": "v"}
    _record(tmp_path / "run", Decoder(layer), cache_attrs=attrs if layer is RingAttention else None)

    # WHEN its report is read
    report = report_json(tmp_path / "run", capsys)
    per_layer = _per_layer(report)

    # THEN the WINDOW-position cache holds WINDOW tokens, never HELD
    token = ROWS * KV_HEADS * HEAD_DIM * FLOAT32
    window = 1001 if layer is RingAttention else 1000
    assert {per_layer[(window, i)] for i in range(LAYERS)} == {(WINDOW, WINDOW * token)}
    if layer is RingAttention:
        # ... and Meta's buffers, which grew to HELD of their MAX_SEQ positions, are the headline's
        assert {per_layer[(1000, i)] for i in range(LAYERS)} == {(HELD, MAX_SEQ * token)}
        assert _main(report) == 1000
        assert report["kv"]["tokens_held"] == HELD
    else:
        assert report["kv"]["tokens_held"] == WINDOW


@pytest.mark.parametrize("heads", [KV_HEADS, 16], ids=["2-heads", "16-heads"])
def test_a_cache_whose_layout_nothing_tells_holds_the_forwards_tokens_not_its_heads(
    heads: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder growing [rows, heads, seq, head_dim] caches by torch.cat, on a model that says no
    # KV heads count, under names of no layout convention (key_cache/value_cache)
    live = LiveStorages()
    _record(tmp_path / "run", HeadsFirstDecoder(heads, live))

    # WHEN its report is read
    report = report_json(tmp_path / "run", capsys)
    kv = report["kv"]

    # THEN every layer holds the HELD tokens its forwards wrote, not its heads count read as positions
    token = ROWS * heads * HEAD_DIM * FLOAT32  # one token of one layer's K (or V), over the rows
    assert _per_layer(report) == {(1000, layer): (HELD, HELD * token) for layer in range(LAYERS)}
    assert kv["tokens_held"] == HELD
    # ... and the bytes held at the end are the storages' alive, measured without kvtrace
    final = LAYERS * 2 * HELD * token
    assert (kv["final_bytes"], live.now) == (final, final)
    if heads < HELD:  # 16 heads read as a buffer's 16 positions: its bytes per token are a capacity's
        # ... each row's token of K and V over the layers
        assert kv["bytes_per_token_measured"] == 2 * LAYERS * heads * HEAD_DIM * FLOAT32 == 384
        # ... and diagnose's moment holds ROWS x HELD, its KV the storages' peak (the last layer's copies
        # beside old K, the layers before grown)
        moment = cli_json(["diagnose", str(tmp_path / "run"), "--json"], capsys)
        peak = ((LAYERS - 1) * 2 * HELD + HELD + (HELD - 1) + HELD) * token
        assert (moment["batch"], moment["tokens_held"]) == (ROWS, HELD)
        assert (moment["kv_peak_bytes"], live.peak) == (peak, peak) == (14592, 14592)
