"""A cache's layer updates are captured as facts and logged at the step's end (issue 11): the log keeps
the order, times, steps and frees of the moment of each update.

A real DynamicCache is updated in a loop under `record()` without a model (a layer-0 update starts a
step). The loop keeps one replaced K tensor alive for a step: its storage is not released by the update
that replaced it, so its `freed` comes from the step-end poll, later, while every other replaced storage
is freed at the very update that grew its slot.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import DynamicCache

import kvtrace
from kvtrace.llama import ModelSize, llama3_config

LAYERS, STEPS, PROMPT = 2, 5, 6
KV_HEADS, HEAD_DIM = 1, 16


def _events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]


def test_captured_updates_keep_order_times_and_frees(tmp_path: Path) -> None:
    config = llama3_config(
        ModelSize(hidden_size=32, intermediate_size=64, num_layers=LAYERS, num_heads=2, num_kv_heads=KV_HEADS)
    )
    cache = DynamicCache(config=config)
    prompt = torch.randn(1, KV_HEADS, PROMPT, HEAD_DIM)
    token = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    held: torch.Tensor | None = None
    held_addr = 0
    with torch.no_grad(), kvtrace.record(tmp_path / "run", profiler=False):
        for step in range(STEPS):
            for layer in range(LAYERS):
                cache.update(prompt if step == 0 else token, prompt if step == 0 else token, layer)
            if step == 1:  # kvtrace step 2: keep layer 1's K alive past the update that replaces it
                held = cache.layers[1].keys
                held_addr = held.untyped_storage().data_ptr()
            if step == 2:  # kvtrace step 3, after its updates: released now, found at that step's end
                held = None
    events = _events(tmp_path / "run")

    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(a["t_ns"] <= b["t_ns"] for a, b in itertools.pairwise(events))
    assert all(a["step"] <= b["step"] for a, b in itertools.pairwise(events))
    for layer in range(LAYERS):
        for kv in ("k", "v"):
            slot = [e for e in events if e["layer"] == layer and e["kv"] == kv and e["event"] != "freed"]
            assert [e["event"] for e in slot] == ["created"] + ["grown"] * (STEPS - 1)
            assert [e["step"] for e in slot] == list(range(1, STEPS + 1))
            # exact bytes: batch 1 x kv heads x tokens x head dim x float32
            assert [e["storage_bytes"] for e in slot] == [
                KV_HEADS * (PROMPT + s) * HEAD_DIM * 4 for s in range(STEPS)
            ]
            assert [e["tokens"] for e in slot] == [PROMPT + s for s in range(STEPS)]

    freed = [e for e in events if e["event"] == "freed"]
    # every storage but the last of each slot (the cache still holds those after the block)
    assert len(freed) == LAYERS * 2 * (STEPS - 1)
    by_seq = {e["seq"]: e for e in events}
    late = [e for e in freed if e["addr"] == held_addr and e["layer"] == 1 and e["kv"] == "k"]
    assert len(late) == 1
    for event in freed:
        grower = next(
            e for e in events
            if e["event"] == "grown" and e["prev_addr"] == event["addr"] and e["layer"] == event["layer"]
            and e["kv"] == event["kv"] and e["seq"] < event["seq"]
        )  # fmt: skip
        if event is late[0]:
            # replaced at step 3's layer-1 update, still held then; freed at that step's end
            assert grower["step"] == 3 and event["step"] == 3
            assert event["t_ns"] > grower["t_ns"]
            assert all(by_seq[s]["step"] == 3 for s in range(grower["seq"], event["seq"]))
        else:
            # released by the update itself: logged right after the event that replaced it, same time
            assert event["seq"] == grower["seq"] + 1 and event["t_ns"] == grower["t_ns"]
            assert event["step"] == grower["step"]


def test_the_writer_thread_drains_while_updates_are_captured(tmp_path: Path, monkeypatch: Any) -> None:
    # GIVEN a writer thread that flushes without pause, while 32 layers are updated for 120 steps
    import kvtrace.run_writer

    monkeypatch.setattr(kvtrace.run_writer, "FLUSH_INTERVAL_S", 0.0)
    layers, steps = 32, 120
    config = llama3_config(
        ModelSize(hidden_size=32, intermediate_size=64, num_layers=layers, num_heads=2, num_kv_heads=KV_HEADS)
    )
    cache = DynamicCache(config=config)
    prompt = torch.randn(1, KV_HEADS, PROMPT, HEAD_DIM)
    token = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    log = tmp_path / "run" / "kv_events.jsonl"
    written_during_block = 0
    with torch.no_grad(), kvtrace.record(tmp_path / "run", profiler=False):
        for step in range(steps):
            for layer in range(layers):
                cache.update(prompt if step == 0 else token, prompt if step == 0 else token, layer)
            if step == 10:
                time.sleep(0.05)  # the writer has run meanwhile: the first steps are on disk already
                written_during_block = len(log.read_text().splitlines())
    events = _events(tmp_path / "run")

    # THEN lines reached the file during the block, and the log is whole and in order
    assert written_during_block >= 10 * layers * 2
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert all(a["t_ns"] <= b["t_ns"] for a, b in itertools.pairwise(events))
    for layer in range(layers):
        for kv in ("k", "v"):
            slot = [e for e in events if e["layer"] == layer and e["kv"] == kv and e["event"] != "freed"]
            assert [e["step"] for e in slot] == list(range(1, steps + 1))
            assert [e["storage_bytes"] for e in slot] == [
                KV_HEADS * (PROMPT + s) * HEAD_DIM * 4 for s in range(steps)
            ]
    assert sum(e["event"] == "freed" for e in events) == layers * 2 * (steps - 1)


def test_a_captured_update_at_a_watched_storage_s_address_comes_after_its_free() -> None:
    # GIVEN a tracker whose two layers were seen once, so their next updates are only captured
    from kvtrace.kv_tracker import KvTracker

    tracker = KvTracker(time.time_ns)
    shape = (1, KV_HEADS, PROMPT, HEAD_DIM)
    memory = bytearray(KV_HEADS * PROMPT * HEAD_DIM * 4)  # two storages at one address, as malloc reuses it
    old_k = torch.frombuffer(memory, dtype=torch.float32).view(shape)
    layer1 = (torch.zeros(shape), torch.zeros(shape))
    tracker.update(1, 0, old_k, torch.zeros(shape), PROMPT)
    tracker.update(1, 1, *layer1, PROMPT)
    # WHEN layer 0's K is replaced while the caller still holds the old one (watched), the caller lets it
    # go, and layer 1's next K is made in the same memory
    tracker.update(1, 0, torch.zeros(shape), torch.zeros(shape), PROMPT)
    addr = old_k.untyped_storage().data_ptr()
    del old_k
    reused = torch.frombuffer(memory, dtype=torch.float32).view(shape)
    tracker.update(1, 1, reused, layer1[1], PROMPT)
    tracker.poll_frees()  # as at the step's end
    events = [json.loads(line) for line in tracker.take_lines()]
    tracker.close()
    # THEN the old storage's free is logged before the new storage at its address
    at_addr = [(e["event"], e["layer"]) for e in events if e["addr"] == addr]
    assert at_addr == [("created", 0), ("freed", 0), ("replaced", 1)]  # same bytes as its old one
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


def _loop_by(pass_update: Any, run: Path) -> list[dict[str, Any]]:
    """The same cache loop as above, each update made by `pass_update(cache, keys, values, layer)`."""
    config = llama3_config(
        ModelSize(hidden_size=32, intermediate_size=64, num_layers=LAYERS, num_heads=2, num_kv_heads=KV_HEADS)
    )
    cache = DynamicCache(config=config)
    prompt = torch.randn(1, KV_HEADS, PROMPT, HEAD_DIM)
    token = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    with torch.no_grad(), kvtrace.record(run, profiler=False):
        for step in range(STEPS):
            for layer in range(LAYERS):
                new = prompt if step == 0 else token
                keys, _ = pass_update(cache, new, new, layer)
                assert keys.shape[-2] == PROMPT + step  # the cache's own answer, passed back
    return [
        {k: v for k, v in e.items() if k not in ("seq", "t_ns", "addr", "prev_addr")} for e in _events(run)
    ]


def test_an_update_given_its_arguments_by_name_is_logged_as_one_given_them_in_order(tmp_path: Path) -> None:
    # GIVEN the wrapper of `Cache.update`, which reads the cache, keys and layer index of each call
    # WHEN the same loop passes them in order, by name, and half and half
    in_order = _loop_by(lambda cache, k, v, layer: cache.update(k, v, layer), tmp_path / "in_order")
    by_name = _loop_by(
        lambda cache, k, v, layer: cache.update(key_states=k, value_states=v, layer_idx=layer),
        tmp_path / "by_name",
    )
    mixed = _loop_by(lambda cache, k, v, layer: cache.update(k, v, layer_idx=layer), tmp_path / "mixed")
    # THEN each logs every layer's growth at its step, the same events
    grown = [e for e in in_order if e["event"] != "freed"]
    assert [(e["step"], e["layer"], e["kv"], e["tokens"]) for e in grown] == [
        (step + 1, layer, kv, PROMPT + step)
        for step in range(STEPS)
        for layer in range(LAYERS)
        for kv in "kv"
    ]
    assert by_name == in_order
    assert mixed == in_order


def test_an_update_missing_an_argument_raises_as_the_cache_s_own_does(tmp_path: Path) -> None:
    config = llama3_config(
        ModelSize(hidden_size=32, intermediate_size=64, num_layers=LAYERS, num_heads=2, num_kv_heads=KV_HEADS)
    )
    cache = DynamicCache(config=config)
    token = torch.randn(1, KV_HEADS, 1, HEAD_DIM)
    with torch.no_grad(), kvtrace.record(tmp_path / "run", profiler=False):
        with pytest.raises(TypeError):
            cache.update(token, token)  # no layer index
        cache.update(token, token, 0)
    events = _events(tmp_path / "run")
    assert [(e["event"], e["layer"], e["kv"], e["tokens"]) for e in events] == [
        ("created", 0, "k", 1),
        ("created", 0, "v", 1),
    ]
