"""Hand-written decode loops that hand their caches to `kvtrace.track()`: the KV log keeps the allocator's
order, so its replay (by address) gives the KV each step held, the bytes allocated and the transient peak.

Two loops of the kind users write: GPT-2's legacy past, whose old K/V stay bound to locals until the next
layer rebinds them (freed between two `track()` calls, their memory often reused at once by the next new
tensor), and the README's attribute caches regrown by torch.cat, K then V, then tracked K then V.
"""

from __future__ import annotations

from pathlib import Path

import torch

import kvtrace
from analyzers.kv_log import analyze_kv_log
from kvtrace.run_reader import read_run
from tests.integration.kvlog_math import assert_addresses_freed_before_reuse, assert_well_ordered

LAYERS, ROWS, KV_HEADS, HEAD_DIM, PROMPT, NEW = 2, 2, 2, 16, 5, 4
TOKEN_BYTES = ROWS * KV_HEADS * HEAD_DIM * 4  # one token of one K (or V) tensor, all rows, float32


class LegacyPastLoop(torch.nn.Module):
    """Each layer's past as a (K, V) tuple, read into locals that hold the old tensors until the next
    layer's turn rebinds them: they are released there, just before that layer's torch.cat."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.ModuleList(
            torch.nn.Linear(KV_HEADS * HEAD_DIM, 2 * KV_HEADS * HEAD_DIM) for _ in range(LAYERS)
        )
        self.past: list[tuple[torch.Tensor | None, torch.Tensor | None]] = [(None, None)] * LAYERS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in range(LAYERS):
            k, v = self.proj[layer](x).chunk(2, -1)
            k = k.reshape(ROWS, -1, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
            v = v.reshape(ROWS, -1, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()
            past_k, past_v = self.past[layer]  # releases the previous layer's old K/V
            if past_k is not None and past_v is not None:
                k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
            self.past[layer] = (k, v)
            kvtrace.track(k, layer=layer, kind="k")
            kvtrace.track(v, layer=layer, kind="v")
        return x[:, -1:]


class AttributeCacheLoop(torch.nn.Module):
    """The README's pattern: K grown by torch.cat (its old tensor released at once), then V, then both
    handed to track(): when track(K) runs, V's old tensor is already gone and its new one not tracked yet."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[1]
        for layer in range(LAYERS):
            k, v = (
                torch.randn(ROWS, KV_HEADS, tokens, HEAD_DIM),
                torch.randn(ROWS, KV_HEADS, tokens, HEAD_DIM),
            )
            if len(self.keys) == layer:
                self.keys.append(k)
                self.values.append(v)
            else:
                self.keys[layer] = torch.cat([self.keys[layer], k], 2)
                self.values[layer] = torch.cat([self.values[layer], v], 2)
            kvtrace.track(self.keys[layer], layer=layer, kind="k")
            kvtrace.track(self.values[layer], layer=layer, kind="v")
        return x[:, -1:]


def _run(model: torch.nn.Module, out: Path) -> None:
    torch.manual_seed(0)
    with torch.no_grad(), kvtrace.record(out, model=model, profiler=False):
        x = model(torch.randn(ROWS, PROMPT, KV_HEADS * HEAD_DIM))
        for _ in range(NEW):
            x = model(x)


def test_a_legacy_loop_s_frees_come_before_the_new_tensors_made_after_them(tmp_path: Path) -> None:
    # GIVEN a GPT-2-style loop: layer l's old K/V are released at layer l+1, between two track() calls
    _run(LegacyPastLoop(), tmp_path / "run")
    events = read_run(tmp_path / "run").kv_events
    assert_well_ordered(events)
    # THEN no new storage is logged at an address the log still holds live (malloc reuses them at once)
    assert_addresses_freed_before_reuse(events)
    kv = analyze_kv_log(events)
    # AND each step ends holding its layers' K and V of PROMPT + step - 1 tokens
    assert {step: sum(live.values()) for step, live in kv.step_live.items()} == {
        step: LAYERS * 2 * (PROMPT + step - 1) * TOKEN_BYTES for step in range(1, NEW + 2)
    }
    # AND every K and V of every step was allocated once
    assert kv.allocated_bytes_total == sum(
        LAYERS * 2 * t * TOKEN_BYTES for t in range(PROMPT, PROMPT + NEW + 1)
    )
    # AND the peak is at the last layer's V cat of the last step: every layer's new K/V, and that layer's
    # old K/V, still bound to the locals (the layer before's old ones were released when they were rebound)
    final = PROMPT + NEW
    assert kv.peak_bytes == (LAYERS * 2 * final + 2 * (final - 1)) * TOKEN_BYTES
    for layer in range(LAYERS):
        for name in ("k", "v"):
            slot = [e for e in events if e.layer == layer and e.kv == name and e.event != "freed"]
            assert [e.event for e in slot] == ["created"] + ["grown"] * NEW
            assert [e.prev_addr for e in slot[1:]] == [e.addr for e in slot[:-1]]


def test_a_storage_released_between_two_tracks_is_freed_before_its_address_is_reused(tmp_path: Path) -> None:
    # GIVEN layer 0's old K, held by a local after its regrowth, then released, and layer 1's new K made
    # in the very same memory (a bytearray's: two storages at one address, as malloc hands them out)
    memory = bytearray(1 * KV_HEADS * 4 * HEAD_DIM * 4)
    with torch.no_grad(), kvtrace.record(tmp_path / "run", profiler=False):
        old_k = torch.frombuffer(memory, dtype=torch.float32).view(1, KV_HEADS, 4, HEAD_DIM)
        kvtrace.track(old_k, layer=0, kind="k")
        layer1_k = torch.zeros(1, KV_HEADS, 4, HEAD_DIM)
        kvtrace.track(layer1_k, layer=1, kind="k")
        new_k = torch.cat([old_k, torch.zeros(1, KV_HEADS, 1, HEAD_DIM)], 2)
        kvtrace.track(new_k, layer=0, kind="k")
        del old_k
        reused = torch.frombuffer(memory, dtype=torch.float32).view(1, KV_HEADS, 4, HEAD_DIM)
        kvtrace.track(reused, layer=1, kind="k")
        addr = reused.untyped_storage().data_ptr()
    events = read_run(tmp_path / "run").kv_events
    assert_well_ordered(events)
    # THEN layer 0's old storage is freed before layer 1's new one appears at its address
    at_addr = [(e.event, e.layer) for e in events if e.addr == addr and e.phase != "end"]
    assert at_addr == [("created", 0), ("freed", 0), ("replaced", 1)]  # same bytes as its old one
    assert_addresses_freed_before_reuse(events)


def test_tracking_k_then_v_after_both_regrew_logs_v_grown_over_its_old_tensor(tmp_path: Path) -> None:
    # GIVEN K and V regrown by torch.cat, then track(K) and track(V), layer after layer
    _run(AttributeCacheLoop(), tmp_path / "run")
    events = read_run(tmp_path / "run").kv_events
    assert_well_ordered(events)
    assert_addresses_freed_before_reuse(events)
    # THEN V, like K, is grown from its previous tensor at every step, and each old one freed after it
    for layer in range(LAYERS):
        for name in ("k", "v"):
            slot = [e for e in events if e.layer == layer and e.kv == name and e.phase != "end"]
            assert [e.event for e in slot] == ["created"] + ["grown", "freed"] * NEW
            grown = [e for e in slot if e.event != "freed"]
            assert [e.prev_addr for e in grown[1:]] == [e.addr for e in grown[:-1]]
    kv = analyze_kv_log(events)
    final = PROMPT + NEW
    assert kv.final_bytes == LAYERS * 2 * final * TOKEN_BYTES
    # AND the peak has the last V's copy: every layer's K and V, and the last layer's old V besides
    assert kv.peak_bytes == (LAYERS * 2 * final + final - 1) * TOKEN_BYTES


def test_a_cache_dropped_and_made_again_in_its_own_memory_is_freed_before_the_new_one(tmp_path: Path) -> None:
    # GIVEN a hand-written cache dropped after a first generation, its memory reused by the next one's:
    # layer 0's new K where its old V was, its new V where its old K was, layer 1's shorter K where its
    # own old K was (a bytearray's memory: new storages at chosen addresses, as malloc hands them out)
    token_bytes = KV_HEADS * HEAD_DIM * 4  # one row
    memory = bytearray(3 * 8 * token_bytes)

    def at(slot: int, tokens: int) -> torch.Tensor:
        count = tokens * token_bytes // 4
        return torch.frombuffer(memory, dtype=torch.float32, count=count, offset=slot * 8 * token_bytes).view(
            1, KV_HEADS, tokens, HEAD_DIM
        )

    with torch.no_grad(), kvtrace.record(tmp_path / "run", profiler=False):
        first = {(0, "k"): at(0, 8), (0, "v"): at(1, 8), (1, "k"): at(2, 8)}
        for (layer, kind), tensor in first.items():
            kvtrace.track(tensor, layer=layer, kind=kind)
        addrs = [first[key].untyped_storage().data_ptr() for key in ((0, "k"), (0, "v"), (1, "k"))]
        del first, tensor  # the first generation's cache is dropped
        second = {(0, "k"): at(1, 8), (0, "v"): at(0, 8), (1, "k"): at(2, 5)}
        for (layer, kind), tensor in second.items():
            kvtrace.track(tensor, layer=layer, kind=kind)
    events = read_run(tmp_path / "run").kv_events
    assert_well_ordered(events)
    assert_addresses_freed_before_reuse(events)
    # THEN at each address the old storage is freed before the new one appears
    by_addr = [[(e.event, e.layer, e.kv) for e in events if e.addr == addr] for addr in addrs]
    assert by_addr == [
        [("created", 0, "k"), ("freed", 0, "k"), ("created", 0, "v")],
        [("created", 0, "v"), ("freed", 0, "v"), ("replaced", 0, "k")],
        [("created", 1, "k"), ("freed", 1, "k"), ("replaced", 1, "k")],
    ]
    # AND the replay holds the second cache: 8 + 8 + 5 tokens
    assert analyze_kv_log(events).final_bytes == (8 + 8 + 5) * token_bytes
