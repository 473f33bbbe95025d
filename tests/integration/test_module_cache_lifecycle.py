"""Module caches that appear or are re-made inside the block: gpt-fast's `setup_caches()` (a `KVCache`
submodule per attention, with registered `k_cache`/`v_cache` buffers [batch, kv_heads, seq, head_dim]) called
inside the block or again between two requests, and Meta-style `cache_k = None` allocated by the first
forward. The recorder must find them as KV (never as weights), log the old buffers freed, and keep nothing
alive that the model let go."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kvlog_math import assert_addresses_freed_before_reuse, assert_well_ordered, kv_bytes, replay_live_bytes
from torch import nn

import kvtrace
from kvtrace.run_reader import read_run

LAYERS, DIM, HEADS, KV_HEADS, VOCAB = 3, 64, 4, 2, 128
HEAD_DIM = DIM // HEADS
FLOAT32 = 4


class KVCache(nn.Module):
    """gpt-fast's: buffers allocated at their full length, written in place at `input_pos`."""

    def __init__(self, batch: int, max_seq: int) -> None:
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(batch, KV_HEADS, max_seq, HEAD_DIM))
        self.register_buffer("v_cache", torch.zeros(batch, KV_HEADS, max_seq, HEAD_DIM))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.wqkv = nn.Linear(DIM, (HEADS + 2 * KV_HEADS) * HEAD_DIM, bias=False)
        self.wo = nn.Linear(HEADS * HEAD_DIM, DIM, bias=False)
        self.lazy = lazy
        self.kv_cache: KVCache | None = None  # gpt-fast: set by setup_caches()
        self.cache_k: torch.Tensor | None = None  # lazy: allocated by the first forward
        self.cache_v: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
        rows, seq, _ = x.shape
        q, k, v = self.wqkv(x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1)
        q = q.view(rows, seq, HEADS, HEAD_DIM).transpose(1, 2)
        k = k.view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        v = v.view(rows, seq, KV_HEADS, HEAD_DIM).transpose(1, 2)
        if self.lazy:  # Meta's layout [batch, seq, kv_heads, head_dim], made when first needed
            if self.cache_k is None:
                self.cache_k = torch.zeros(LAZY_BATCH, LAZY_SEQ, KV_HEADS, HEAD_DIM)
                self.cache_v = torch.zeros(LAZY_BATCH, LAZY_SEQ, KV_HEADS, HEAD_DIM)
            assert self.cache_v is not None
            self.cache_k[:rows, start_pos : start_pos + seq] = k.transpose(1, 2)
            self.cache_v[:rows, start_pos : start_pos + seq] = v.transpose(1, 2)
            keys = self.cache_k[:rows, : start_pos + seq].transpose(1, 2)
            values = self.cache_v[:rows, : start_pos + seq].transpose(1, 2)
        else:
            assert self.kv_cache is not None
            keys, values = self.kv_cache.update(pos, k, v)
            keys, values = keys[:, :, : start_pos + seq], values[:, :, : start_pos + seq]
        keys = keys.repeat_interleave(HEADS // KV_HEADS, 1)
        values = values.repeat_interleave(HEADS // KV_HEADS, 1)
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=seq > 1)
        return self.wo(out.transpose(1, 2).reshape(rows, seq, HEADS * HEAD_DIM))


class Block(nn.Module):
    def __init__(self, lazy: bool) -> None:
        super().__init__()
        self.attention = Attention(lazy)
        self.ff = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, start_pos: int) -> torch.Tensor:
        x = x + self.attention(x, pos, start_pos)
        return x + self.ff(x)


class Decoder(nn.Module):
    def __init__(self, lazy: bool = False) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(lazy) for _ in range(LAYERS))
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def setup_caches(self, max_batch: int, max_seq: int) -> None:
        """gpt-fast's: a new KVCache module per attention, in place of the one before."""
        for block in self.layers:
            block.attention.kv_cache = KVCache(max_batch, max_seq)

    def forward(self, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
        pos = torch.arange(start_pos, start_pos + tokens.shape[1])
        h = self.tok_embeddings(tokens)
        for block in self.layers:
            h = block(h, pos, start_pos)
        return self.output(h)


LAZY_BATCH, LAZY_SEQ = 4, 64


def _generate(model: Decoder, rows: int, prompt: int, new_tokens: int) -> None:
    """A prefill, then greedy decode steps: `new_tokens` tokens in all."""
    with torch.inference_mode():
        ids = torch.randint(0, VOCAB, (rows, prompt))
        nxt = model(ids, 0)[:, -1:].argmax(-1)
        for i in range(new_tokens - 1):
            nxt = model(nxt, prompt + i)[:, -1:].argmax(-1)


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _cache_tensors(model: Decoder) -> dict[tuple[int, str], torch.Tensor]:
    return {
        (layer, kv): getattr(block.attention.kv_cache, f"{kv}_cache")
        for layer, block in enumerate(model.layers)
        for kv in ("k", "v")
    }


@pytest.mark.parametrize("old_dropped_first", [False, True], ids=["replaced", "dropped-then-made"])
def test_caches_remade_between_requests_are_freed_found_as_kv_and_not_kept_alive(tmp_path, old_dropped_first):
    # GIVEN gpt-fast's caches set up before the block for batch 2, length 32 ...
    torch.manual_seed(0)
    model = Decoder().eval()
    model.setup_caches(2, 32)
    old = _cache_tensors(model)
    old_addrs = {key: tensor.untyped_storage().data_ptr() for key, tensor in old.items()}
    old_alive = weakref.ref(old[(0, "k")])
    del old
    second_rows, second_seq, second_prompt = (2, 32, 6) if old_dropped_first else (4, 48, 5)

    # WHEN a first request runs, then setup_caches() makes new ones for a second request (gpt-fast's
    # generate() does, at every call), which runs on them
    with kvtrace.record(tmp_path / "run", model=model, profiler=False):
        _generate(model, rows=2, prompt=8, new_tokens=6)
        if old_dropped_first:  # all old buffers released before the new ones: their addresses reused
            for block in model.layers:
                block.attention.kv_cache = None
        model.setup_caches(second_rows, second_seq)
        # THEN the old buffers die right there, as they would unrecorded (kvtrace held their module)
        freed_inside = old_alive() is None
        _generate(model, rows=second_rows, prompt=second_prompt, new_tokens=4)
    assert freed_inside, "recording kept the replaced cache module's buffers alive"

    run = read_run(tmp_path / "run")
    events = run.kv_events
    assert_well_ordered(events)
    assert_addresses_freed_before_reuse(events)
    first_kv = kv_bytes(KV_HEADS, HEAD_DIM, 32, 2, FLOAT32)
    new_kv = kv_bytes(KV_HEADS, HEAD_DIM, second_seq, second_rows, FLOAT32)
    # ... every old buffer is logged freed, at the second request's first step (its prefill, step 7) ...
    freed = {(e.layer, e.kv): e.addr for e in events if e.event == "freed"}
    assert freed == old_addrs
    assert {e.step for e in events if e.event == "freed"} == {7}
    # ... and the KV held is the first request's buffers, then the second's: never both, never weights.
    live = replay_live_bytes(events)
    assert live.per_step[6] == dict.fromkeys(range(LAYERS), 2 * first_kv)
    assert live.per_step[7] == dict.fromkeys(range(LAYERS), 2 * new_kv)
    assert live.final == dict.fromkeys(range(LAYERS), 2 * new_kv)
    new_addrs = {key: t.untyped_storage().data_ptr() for key, t in _cache_tensors(model).items()}
    made = [e for e in events if e.step == 7 and e.event in ("created", "grown", "replaced")]
    assert {(e.layer, e.kv): e.addr for e in made} == new_addrs
    if not old_dropped_first:  # each new buffer names the old one it stands for: made while that one lived
        assert {(e.layer, e.kv): e.prev_addr for e in made} == old_addrs
    assert sum(w.storage_bytes for w in run.weights if not w.event) == _parameter_bytes(model)
    assert [w for w in run.weights if w.event] == [], "the new caches are not weights"
    assert not any("weights changed" in w for w in run.manifest["warnings"])


class _Arena:
    """A caching allocator's reuse, as CUDA's makes it and CPU malloc only sometimes: a released block of
    the size asked for is handed out again, the lowest address first. Tensors over one numpy buffer, so
    which new cache lands where an old one was is decided here, not by the earlier tests' allocations."""

    def __init__(self, nbytes: int) -> None:
        self.memory = np.zeros(nbytes, np.uint8)
        self.top = 0
        self.released: list[tuple[int, int]] = []  # (offset, bytes) of blocks whose tensor was let go

    def zeros(self, *shape: int) -> torch.Tensor:
        nbytes = int(np.prod(shape)) * FLOAT32
        fits = sorted(block for block in self.released if block[1] == nbytes)
        if fits:
            self.released.remove(fits[0])
            offset = fits[0][0]
        else:
            offset, self.top = self.top, self.top + nbytes
        block = self.memory[offset : offset + nbytes]
        block[:] = 0
        weakref.finalize(block, self.released.append, (offset, nbytes))  # the tensor's storage holds it
        return torch.from_numpy(block).view(torch.float32).view(shape)


@pytest.mark.parametrize("old_dropped_first", [False, True], ids=["replaced", "dropped-then-made"])
def test_caches_remade_where_old_ones_were_free_them_first_and_name_those_they_replaced(
    tmp_path, monkeypatch, old_dropped_first
):
    # GIVEN gpt-fast's caches over an allocator that reuses released blocks: setup_caches() makes layer 0's
    # new K and V, drops layer 0's old module, then makes layer 1's new K and V where layer 0's old were
    arena = _Arena(1 << 20)

    class ArenaKVCache(KVCache):
        def __init__(self, batch: int, max_seq: int) -> None:
            nn.Module.__init__(self)
            self.register_buffer("k_cache", arena.zeros(batch, KV_HEADS, max_seq, HEAD_DIM))
            self.register_buffer("v_cache", arena.zeros(batch, KV_HEADS, max_seq, HEAD_DIM))

    monkeypatch.setitem(globals(), "KVCache", ArenaKVCache)  # what setup_caches() makes
    torch.manual_seed(0)
    model = Decoder().eval()
    model.setup_caches(2, 32)
    old_addrs = {key: t.untyped_storage().data_ptr() for key, t in _cache_tensors(model).items()}

    # WHEN a first request runs, then setup_caches() makes caches of the same size for a second one
    with kvtrace.record(tmp_path / "run", model=model, profiler=False):
        _generate(model, rows=2, prompt=8, new_tokens=6)
        if old_dropped_first:
            for block in model.layers:
                block.attention.kv_cache = None
        model.setup_caches(2, 32)
        _generate(model, rows=2, prompt=6, new_tokens=4)
    new_addrs = {key: t.untyped_storage().data_ptr() for key, t in _cache_tensors(model).items()}
    if old_dropped_first:  # every block released before any new one: each comes back where it was
        assert new_addrs == old_addrs
    else:  # each layer's old blocks released after its new ones are made: the next layer takes them
        assert [new_addrs[(layer + 1, kv)] for layer in range(LAYERS - 1) for kv in "kv"] == [
            old_addrs[(layer, kv)] for layer in range(LAYERS - 1) for kv in "kv"
        ]

    # THEN the log frees every old buffer before its address is used again, at the second prefill (step 7)
    run = read_run(tmp_path / "run")
    events = run.kv_events
    assert_well_ordered(events)
    assert_addresses_freed_before_reuse(events)
    assert {(e.layer, e.kv): e.addr for e in events if e.event == "freed"} == old_addrs
    assert {e.step for e in events if e.event == "freed"} == {7}
    made = [e for e in events if e.step == 7 and e.event in ("created", "grown", "replaced")]
    assert {(e.layer, e.kv): e.addr for e in made} == new_addrs
    if not old_dropped_first:  # ... and each new buffer names the old one it stands for: made while it lived
        assert {(e.layer, e.kv): e.prev_addr for e in made} == old_addrs
    kv = kv_bytes(KV_HEADS, HEAD_DIM, 32, 2, FLOAT32)
    live = replay_live_bytes(events)
    assert live.per_step[6] == live.per_step[7] == live.final == dict.fromkeys(range(LAYERS), 2 * kv)


def test_caches_set_up_inside_the_block_are_kv_not_weights(tmp_path):
    # GIVEN a model whose caches gpt-fast's generate() sets up itself: none exist when the block begins
    torch.manual_seed(0)
    model = Decoder().eval()

    # WHEN setup_caches() runs inside the block, before the generation
    with kvtrace.record(tmp_path / "run", model=model, profiler=False):
        model.setup_caches(2, 32)
        _generate(model, rows=2, prompt=8, new_tokens=6)

    # THEN its buffers are found as KV from the prefill on, and the weights are the parameters alone
    run = read_run(tmp_path / "run")
    assert_well_ordered(run.kv_events)
    kv = kv_bytes(KV_HEADS, HEAD_DIM, 32, 2, FLOAT32)
    live = replay_live_bytes(run.kv_events)
    assert live.per_step[1] == dict.fromkeys(range(LAYERS), 2 * kv)
    assert live.final == dict.fromkeys(range(LAYERS), 2 * kv)
    assert sum(w.storage_bytes for w in run.weights) == _parameter_bytes(model)
    assert [w for w in run.weights if w.event] == []
    assert not any("weights changed" in w for w in run.manifest["warnings"])


@pytest.mark.parametrize("cache_attrs", [None, {"cache_k": "k", "cache_v": "v"}], ids=["default", "named"])
def test_lazy_caches_allocated_by_the_first_forward_are_kv(tmp_path, cache_attrs):
    # GIVEN Meta-style attention whose cache_k / cache_v stay None until the first forward allocates them
    torch.manual_seed(0)
    model = Decoder(lazy=True).eval()
    prompt, new_tokens = 8, 6

    # WHEN a generation runs inside the block
    with kvtrace.record(tmp_path / "run", model=model, profiler=False, cache_attrs=cache_attrs):
        _generate(model, rows=2, prompt=prompt, new_tokens=new_tokens)

    # THEN the buffers the prefill made are KV, holding the tokens that `start_pos` says at each step
    run = read_run(tmp_path / "run")
    assert_well_ordered(run.kv_events)
    kv = kv_bytes(KV_HEADS, HEAD_DIM, LAZY_SEQ, LAZY_BATCH, FLOAT32)
    live = replay_live_bytes(run.kv_events)
    assert live.per_step[1] == dict.fromkeys(range(LAYERS), 2 * kv)
    assert live.final == dict.fromkeys(range(LAYERS), 2 * kv)
    layer0_k = [e for e in run.kv_events if (e.layer, e.kv) == (0, "k")]
    assert [e.tokens for e in layer0_k] == list(range(prompt, prompt + new_tokens))
    assert layer0_k[0].event == "created" and layer0_k[0].phase == "prefill"
    assert sum(w.storage_bytes for w in run.weights) == _parameter_bytes(model)
    assert run.manifest["warnings"] == []
