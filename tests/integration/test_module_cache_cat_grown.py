"""Module caches grown by torch.cat (`self.k_cache = torch.cat([self.k_cache, k], 2)` in a hand-written
decoder), scanned at the forward's end: the KV peak is the moment the step's copies and the storages they
replace are alive together, which depends on when the code lets the old ones go. Kept in locals until the
layer returns, both old K and V live beside both new ones; rebound directly, the old K is gone before V's
copy is made (and the old V before K's, V rebound first). A forward that raises part-way leaves the layers
it grew holding their new tokens. And a preallocated cache whose forward does not say where it writes
(gpt-fast's `input_pos`, not `start_pos`) has its batch from the forward's input, not from its buffers'
capacity."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import kvtrace
from kvtrace.run_reader import read_run
from tests.cli_json import report_json

LAYERS, KV_HEADS, HEAD_DIM, HIDDEN = 3, 2, 8, 16
ROWS, PROMPT, DECODES = 3, 6, 5
FLOAT32 = 4
TOKEN_BYTES = ROWS * KV_HEADS * HEAD_DIM * FLOAT32  # one token of one layer's K (or V), over the rows: 192


class CatAttention(nn.Module):
    """K and V appended by torch.cat, the old tensors kept in locals (`kept`) or rebound at once."""

    def __init__(
        self, kept: bool, live: LiveStorages, raise_at: int | None = None, v_first: bool = False
    ) -> None:
        super().__init__()
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.kept, self.live, self.raise_at, self.v_first = kept, live, raise_at, v_first
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        if start_pos == self.raise_at:
            raise RuntimeError("raised inside the layer")
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if self.k_cache is None or self.v_cache is None:
            self.k_cache, self.v_cache = k.contiguous(), v.contiguous()
        elif self.kept:
            old_k, old_v = self.k_cache, self.v_cache  # alive until this layer returns
            self.k_cache = torch.cat([old_k, k], 2)
            self.live.born(self.k_cache)
            self.v_cache = torch.cat([old_v, v], 2)
            self.live.born(self.v_cache)
            return x
        elif self.v_first:  # V rebound first, then K, each directly: old V is gone before K's cat
            self.v_cache = self.live.born(torch.cat([self.v_cache, v], 2))
            self.k_cache = self.live.born(torch.cat([self.k_cache, k], 2))
            return x
        else:  # each old tensor released as its new one is bound, counted alive from its making
            self.k_cache = self.live.born(torch.cat([self.k_cache, k], 2))
            self.v_cache = self.live.born(torch.cat([self.v_cache, v], 2))
            return x
        self.live.born(self.k_cache)
        self.live.born(self.v_cache)
        return x


class CatDecoder(nn.Module):
    def __init__(
        self,
        kept: bool,
        live: LiveStorages,
        raise_in_layer_1_at: int | None = None,
        v_first: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            CatAttention(kept, live, raise_in_layer_1_at if layer == 1 else None, v_first)
            for layer in range(LAYERS)
        )

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, start_pos)
        return x


class LiveStorages:
    """The KV bytes alive, measured apart from kvtrace: each cache storage counted from its making until a
    weak reference's callback says the allocator released it; `peak` the most alive at once."""

    def __init__(self) -> None:
        self.now = self.peak = 0
        self._refs: list[weakref.ref[Any]] = []

    def born(self, tensor: torch.Tensor) -> torch.Tensor:
        """Count `tensor`'s storage alive from now; returns the tensor."""
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        self._refs.append(weakref.ref(storage, lambda _, n=nbytes: self._died(n)))
        return tensor

    def _died(self, nbytes: int) -> None:
        self.now -= nbytes


def _record(run: Path, model: CatDecoder) -> None:
    """A prefill of PROMPT tokens, then DECODES one-token forwards, as a generation loop calls them."""
    x = torch.randn(ROWS, PROMPT + DECODES, HIDDEN)
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, snapshots=False):
        model(x[:, :PROMPT], 0)
        for pos in range(PROMPT, PROMPT + DECODES):
            model(x[:, pos : pos + 1], pos)


@pytest.mark.parametrize("kept", [True, False], ids=["old-kept-in-locals", "rebound-at-once"])
def test_the_kv_peak_counts_the_old_storages_as_long_as_the_layer_keeps_them(
    kept: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose layers grow K and V by torch.cat, the old tensors kept until the layer returns
    # or let go as each is rebound, recorded over a prefill and DECODES decode steps
    live = LiveStorages()
    _record(tmp_path / "run", CatDecoder(kept, live))

    # WHEN the report reads its KV log
    kv = report_json(tmp_path / "run", capsys)["kv"]

    # THEN its KV peak is the last layer's copy at the last step, beside the layers before it grown: with
    # both old tensors kept, old K and V (T-1 tokens each) live beside new K and V (T each); rebound at
    # once, the old K is gone before V's copy is made
    held = PROMPT + DECODES
    grown_layers = (LAYERS - 1) * 2 * held
    copy = 2 * (held - 1) + 2 * held if kept else held + (held - 1) + held
    peak = (grown_layers + copy) * TOKEN_BYTES
    assert peak == (16512 if kept else 14592)
    assert kv["peak_bytes"] == peak
    # ... as much as the storages' own lives, measured without kvtrace, say
    assert live.peak == peak
    # ... and the end holds every layer's T tokens
    assert kv["final_bytes"] == LAYERS * 2 * held * TOKEN_BYTES
    assert [layer["tokens"] for layer in kv["per_layer"]] == [held] * LAYERS


V_FIRST_RUNS = 6  # the allocator may hand old V's address to the new K: several runs meet more orders


def test_v_rebound_before_k_counts_old_v_gone_before_the_k_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose layers rebind V, then K, each directly to its torch.cat: old V is released
    # before K's copy is made, old K as the new one is bound; recorded several times
    for run_idx in range(V_FIRST_RUNS):
        live = LiveStorages()
        run = tmp_path / f"run{run_idx}"
        _record(run, CatDecoder(False, live, v_first=True))

        # WHEN the report reads its KV log
        kv = report_json(run, capsys)["kv"]

        # THEN its KV peak is the last layer's K copy (T tokens) beside old K (T-1) and new V (T), the
        # layers before it grown: old V is not counted beside them
        held = PROMPT + DECODES
        peak = ((LAYERS - 1) * 2 * held + held + (held - 1) + held) * TOKEN_BYTES
        assert peak == 14592
        assert (kv["peak_bytes"], live.peak) == (peak, peak), run_idx
        # ... and the end holds every layer's T tokens, the new K kept even where it took old V's address
        final = LAYERS * 2 * held * TOKEN_BYTES
        assert final == 12672
        assert (kv["final_bytes"], live.now) == (final, final), run_idx
        assert [layer["tokens"] for layer in kv["per_layer"]] == [held] * LAYERS


class PooledVFirstAttention(nn.Module):
    """V rebound before K, each copy placed in host memory the layer keeps (three numpy pools, one free):
    the new V in the free pool, then the new K where the old V was, as an allocator reusing that address
    would place it, every step."""

    def __init__(self, live: LiveStorages) -> None:
        super().__init__()
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.live = live
        size = ROWS * KV_HEADS * (PROMPT + DECODES) * HEAD_DIM
        self.pools = [np.zeros(size, dtype=np.float32) for _ in range(3)]
        self.v_pool, self.k_pool, self.free_pool = 0, 1, 2
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _placed(self, pool: int, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied into the start of `pools[pool]`, a storage of its own at the pool's address."""
        held = torch.from_numpy(self.pools[pool][: tensor.numel()]).view(tensor.shape)
        return self.live.born(held.copy_(tensor))

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        k = self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if self.k_cache is None or self.v_cache is None:
            self.k_cache, self.v_cache = self._placed(self.k_pool, k), self._placed(self.v_pool, v)
            return x
        self.v_cache = self._placed(self.free_pool, torch.cat([self.v_cache, v], 2))  # old V released
        self.k_cache = self._placed(self.v_pool, torch.cat([self.k_cache, k], 2))  # where old V was
        self.v_pool, self.k_pool, self.free_pool = self.free_pool, self.v_pool, self.k_pool
        return x


def test_a_new_k_at_the_address_old_v_left_keeps_its_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the V-first decoder whose every new K takes the address its layer's old V was released from
    live = LiveStorages()
    model = CatDecoder(False, live)
    model.layers = nn.ModuleList(PooledVFirstAttention(live) for _ in range(LAYERS))
    _record(tmp_path / "run", model)

    # WHEN the report replays its KV log by address
    kv = report_json(tmp_path / "run", capsys)["kv"]

    # THEN old V's free comes before the new K made at its address: the end holds every layer's T tokens
    held = PROMPT + DECODES
    assert kv["final_bytes"] == live.now == LAYERS * 2 * held * TOKEN_BYTES == 12672
    # ... and the peak is the last layer's new K beside its old K and new V, as the storages' lives say
    assert kv["peak_bytes"] == live.peak == ((LAYERS - 1) * 2 * held + 3 * held - 1) * TOKEN_BYTES == 14592


def test_a_raised_forward_leaves_the_layers_it_grew_holding_their_new_tokens(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the decoder (old tensors kept in locals) whose third decode forward raises as layer 1 begins,
    # after layer 0 grew its cache by that step's token
    raised_at = PROMPT + 2
    live = LiveStorages()
    model = CatDecoder(True, live, raise_in_layer_1_at=raised_at)
    with pytest.raises(RuntimeError, match="raised inside the layer"):
        _record(tmp_path / "run", model)

    # WHEN its KV log and report are read
    run = read_run(tmp_path / "run")
    report = report_json(tmp_path / "run", capsys)
    kv = report["kv"]

    # THEN layer 0 holds the raised step's token too, as its tensors' seq dim says; layers 1 and 2 do not
    before = raised_at  # tokens per row after the last whole step
    reached = [before + 1, before, before]
    assert [layer["tokens"] for layer in kv["per_layer"]] == reached
    for layer, tokens in enumerate(reached):
        last = [e for e in run.kv_events if e.layer == layer and e.kv == "k" and e.event != "freed"][-1]
        assert (last.shape, last.tokens) == ([ROWS, KV_HEADS, tokens, HEAD_DIM], tokens)
    # ... no buffers are made up from a layer's positions beyond its tokens: none have a capacity
    assert (kv["capacity_rows"], kv["capacity_tokens"], kv["capacity_of"]) == (None, None, None)
    # ... a token costs every layer's K and V, as in a run that did not raise
    assert kv["bytes_per_token_measured"] == LAYERS * 2 * TOKEN_BYTES / ROWS == 384
    # ... and the peak is the raised step's layer 0 copy (old and new K and V) beside layers 1 and 2
    peak = (2 * before + 2 * (before + 1) + (LAYERS - 1) * 2 * before) * TOKEN_BYTES
    assert kv["peak_bytes"] == live.peak == peak == 12672


MAX_ROWS, MAX_SEQ = 4, 32


class PreallocatedAttention(nn.Module):
    """gpt-fast's KVCache: [max_batch, kv_heads, max_seq, head_dim] buffers written in place."""

    def __init__(self) -> None:
        super().__init__()
        self.n_kv_heads = KV_HEADS
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM)
        self.register_buffer("k_cache", torch.zeros(MAX_ROWS, KV_HEADS, MAX_SEQ, HEAD_DIM))
        self.register_buffer("v_cache", torch.zeros(MAX_ROWS, KV_HEADS, MAX_SEQ, HEAD_DIM))

    def forward(self, x: torch.Tensor, input_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        self.k_cache[:rows, :, input_pos : input_pos + seq] = (
            self.k(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        )
        self.v_cache[:rows, :, input_pos : input_pos + seq] = (
            self.v(x).view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        )
        return x


class InputPosDecoder(nn.Module):
    """`forward(tokens, input_pos)`: no `start_pos` says where it writes; its rows are its input's."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(PreallocatedAttention() for _ in range(LAYERS))

    def forward(self, tokens: torch.Tensor, input_pos: int) -> torch.Tensor:
        for layer in self.layers:
            tokens = layer(tokens, input_pos)
        return tokens


class PositionFirstDecoder(InputPosDecoder):
    """`forward(input_pos, tokens)`: its first argument says no rows."""

    def forward(self, input_pos: int, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(tokens, input_pos)


@pytest.mark.parametrize(
    ("model_cls", "rows", "batch"),
    [
        (InputPosDecoder, ROWS, ROWS),
        (InputPosDecoder, MAX_ROWS, MAX_ROWS),
        (PositionFirstDecoder, ROWS, None),
    ],
    ids=["fewer-rows-than-the-buffers", "every-row-of-the-buffers", "rows-not-said"],
)
def test_a_buffer_written_without_start_pos_has_its_input_rows_not_its_capacity_as_batch(
    model_cls: type[InputPosDecoder],
    rows: int,
    batch: int | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN preallocated buffers for MAX_ROWS rows written for `rows` rows by a forward taking `input_pos`
    model = model_cls().eval()
    x = torch.randn(rows, PROMPT + DECODES, HIDDEN)
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False, snapshots=False):
        for start, end in [(0, PROMPT), *((pos, pos + 1) for pos in range(PROMPT, PROMPT + DECODES))]:
            if model_cls is PositionFirstDecoder:
                model(start, x[:, start:end])
            else:
                model(x[:, start:end], start)

    # WHEN the report reads the run
    report = report_json(tmp_path / "run", capsys)
    kv = report["kv"]

    # THEN its batch is the input's rows where the input says them, else unknown, never the buffers' rows
    assert kv["batch"] == batch
    assert (kv["capacity_rows"], kv["capacity_tokens"]) == (MAX_ROWS, MAX_SEQ)
    # ... its tokens: an int second argument (`input_pos`) says where it writes, the prompt and each decode
    # step's token; an int first argument says nothing, and a warning says the tokens are unknown
    if model_cls is PositionFirstDecoder:
        assert kv["tokens_held"] is None
        assert any("token counts are unknown" in note for note in report["notes"])
    else:
        assert kv["tokens_held"] == PROMPT + DECODES
        assert not any("token counts are unknown" in note for note in report["notes"])


class TwoCacheBlock(nn.Module):
    """A layer holding two cache-holding modules, `layers.N.self_attn` and `layers.N.cross_attn`, each its
    own `k_cache`/`v_cache`."""

    def __init__(self, kept: bool, live: LiveStorages, v_first: bool) -> None:
        super().__init__()
        self.self_attn = CatAttention(kept, live, v_first=v_first)
        self.cross_attn = CatAttention(kept, live, v_first=v_first)

    def forward(self, x: torch.Tensor, start_pos: int) -> torch.Tensor:
        return self.cross_attn(self.self_attn(x, start_pos), start_pos)


class TwoCacheDecoder(CatDecoder):
    def __init__(self, kept: bool, live: LiveStorages, v_first: bool) -> None:
        nn.Module.__init__(self)
        self.layers = nn.ModuleList(TwoCacheBlock(kept, live, v_first) for _ in range(LAYERS))


@pytest.mark.parametrize(
    ("kept", "v_first"),
    [(False, True), (False, False), (True, False)],
    ids=["v-rebound-first", "rebound-at-once", "old-kept-in-locals"],
)
def test_two_cache_modules_in_a_layer_are_each_logged_as_their_own_cache(
    kept: bool, v_first: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a decoder whose every layer holds two modules with their own K and V grown by torch.cat
    # (self_attn, then cross_attn), recorded over a prefill and DECODES decode steps
    live = LiveStorages()
    model = TwoCacheDecoder(kept, live, v_first)  # kept alive: its caches are the end's KV
    _record(tmp_path / "run", model)

    # WHEN the report reads its KV log
    kv = report_json(tmp_path / "run", capsys)["kv"]

    # THEN the end holds both modules' T tokens in every layer: 2 x 12,672 bytes
    held = PROMPT + DECODES
    final = 2 * LAYERS * 2 * held * TOKEN_BYTES
    assert final == 25344
    assert (kv["final_bytes"], live.now) == (final, final)
    # ... its peak is the last module's copy at the last step beside the five other modules grown, as the
    # storages' own lives, measured without kvtrace, say
    others = (2 * LAYERS - 1) * 2 * held
    copy = 2 * (held - 1) + 2 * held if kept else held + (held - 1) + held
    peak = (others + copy) * TOKEN_BYTES
    assert peak == (29184 if kept else 27264)
    assert (kv["peak_bytes"], live.peak) == (peak, peak)
    # ... and each module is a cache of its own, 1000 and 1001, every layer's T tokens in both
    caches = {cache["cache"]: cache for cache in kv["caches"]}
    assert sorted(caches) == [1000, 1001]
    assert [caches[cid]["final_bytes"] for cid in (1000, 1001)] == [final // 2] * 2
    rows = sorted((row["cache"], row["layer"], row["tokens"]) for row in kv["per_layer"])
    assert rows == [(cid, layer, held) for cid in (1000, 1001) for layer in range(LAYERS)]
