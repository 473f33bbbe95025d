"""The recorded model's generate() on several threads inside one record(): a server's workers, a
TextIteratorStreamer's thread. A forward of the model that begins on another thread while a step is open is
not nested in that step (nesting is a forward called inside a forward, on one thread): it begins a step of
its own, and since the log holds one step at a time, the manifest says that the steps and phases of the
overlapping forwards are not reliable. A block that ends while such a thread is inside a forward says that
its last step is partial.

The threads' order is forced with events held inside a decoder layer's forward, so every figure is exact:
KV bytes = layers x (K, V) x KV heads x head_dim x tokens x rows x 4 (fp32).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import assert_addresses_freed_before_reuse, assert_well_ordered

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.tiny import HEAD_DIM, tiny_size

LAYERS, KV_HEADS = 2, 2
WAIT_S = 60.0  # a thread that never reaches its hold fails the test instead of hanging it


def _kv_bytes(tokens: int, rows: int) -> int:
    return LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * rows * 4


def _ids(rows: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 1000, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def _generate(model: Any, ids: torch.Tensor, new_tokens: int, out: dict[str, Any], name: str) -> None:
    with torch.no_grad():
        out[name] = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,  # keeps each call's cache alive: both are held at the end
        )


@contextmanager
def _held_in_layer_1(model: Any, hooked: bool, hold: Callable[[], None]) -> Iterator[None]:
    """Runs `hold()` as decoder layer 1 begins (layer 0 has updated the cache). `hooked`: from a forward
    pre-hook, which light mode takes as code that may change the cache (each update logged as it happens);
    else from the layer's own forward replaced on the instance (no hook: compared at the forward's end)."""
    layer = model.model.layers[1]
    if hooked:
        handle = layer.register_forward_pre_hook(lambda module, args: hold())
        try:
            yield
        finally:
            handle.remove()
        return
    original = layer.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        hold()
        return original(*args, **kwargs)

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward


def _report(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("hooked", [False, True], ids=["compared-at-forward-end", "each-update"])
def test_forwards_overlapping_on_two_threads_each_begin_a_step_and_are_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hooked: bool
) -> None:
    # GIVEN thread A's prefill held inside layer 1 while thread B runs its whole generate() on the same model
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    a_ids, b_ids = _ids(1, 5, seed=1), _ids(3, 7, seed=2)
    a_new, b_new = 3, 2
    a_inside, a_release = threading.Event(), threading.Event()
    outputs: dict[str, Any] = {}
    a_thread: list[threading.Thread] = []

    def hold() -> None:
        if threading.current_thread() is a_thread[0] and not a_inside.is_set():
            a_inside.set()
            assert a_release.wait(WAIT_S)

    def run_b() -> None:
        assert a_inside.wait(WAIT_S)
        try:
            _generate(model, b_ids, b_new, outputs, "b")
        finally:
            a_release.set()

    run = tmp_path / "run"
    with _held_in_layer_1(model, hooked, hold), kvtrace.record(run, model=model, profiler=False):
        a_thread.append(threading.Thread(target=_generate, args=(model, a_ids, a_new, outputs, "a")))
        b_thread = threading.Thread(target=run_b)
        a_thread[0].start()
        b_thread.start()
        a_thread[0].join(WAIT_S)
        b_thread.join(WAIT_S)
    assert set(outputs) == {"a", "b"}

    # THEN each of the 3 + 2 forwards began a step: B's two began while A's prefill was open
    events = read_run(run).kv_events
    assert max(e.step for e in events) == a_new + b_new
    manifest = json.loads((run / "manifest.json").read_text())
    (warning,) = manifest["warnings"]
    assert warning.startswith(
        f"2 of {a_new + b_new} forward passes of the model began while another of its forwards was running "
        "on another thread"
    )
    assert manifest["model_caches"] == [1, 2]  # A's cache was met first, at its prefill
    # AND B's prefill, alone in its step, is logged as one: its 3 rows x 7 tokens made at step 2
    b_prefill = [e for e in events if e.step == 2]
    assert {(e.cache, e.phase, e.event, e.tokens, e.shape[0]) for e in b_prefill} == {
        (2, "prefill", "created", 7, 3)
    }
    # AND every write is logged as the growth it was (none mistaken for an eviction or a replacement), in an
    # order the analyzers can replay: steps never go back, no address reused before its free
    assert {e.event for e in events} == {"created", "grown", "freed"}
    assert_well_ordered(events)
    assert_addresses_freed_before_reuse(events)

    # AND the report's KV figures are the two caches by arithmetic, the warning among its notes
    report = _report(run, capsys)
    a_tokens, b_tokens = 5 + a_new - 1, 7 + b_new - 1  # the last token generate() returns is never written
    assert report["kv"]["final_bytes"] == _kv_bytes(a_tokens, 1) + _kv_bytes(b_tokens, 3)  # 3,584 + 12,288
    caches = {c["cache"]: (c["tokens"], c["rows"], c["final_bytes"]) for c in report["kv"]["caches"]}
    assert caches == {1: (a_tokens, 1, _kv_bytes(a_tokens, 1)), 2: (b_tokens, 3, _kv_bytes(b_tokens, 3))}
    assert warning in report["notes"]
    # Compared at its end, A's held prefill is logged in the last step begun by then (B's decode, step 3):
    # step 1 holds no event and the report, which counts the steps of the log, counts 4 (as warned). Followed
    # update by update, its layer 0 was logged in step 1 before the hold.
    assert report["steps"] == (5 if hooked else 4)


def test_generate_calls_begun_on_two_threads_each_start_with_their_own_prefill(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN thread A inside generate() but held before its first forward (a hook on the model, which runs
    # before the forward) while thread B runs its whole generate(): calls overlap, forwards do not
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    a_ids, b_ids = _ids(1, 7, seed=3), _ids(1, 5, seed=4)
    a_new, b_new = 2, 3
    a_inside, a_release = threading.Event(), threading.Event()
    outputs: dict[str, Any] = {}
    a_thread: list[threading.Thread] = []

    def hold(module: Any, args: Any) -> None:
        if threading.current_thread() is a_thread[0] and not a_inside.is_set():
            a_inside.set()
            assert a_release.wait(WAIT_S)

    def run_b() -> None:
        assert a_inside.wait(WAIT_S)
        try:
            _generate(model, b_ids, b_new, outputs, "b")
        finally:
            a_release.set()

    handle = model.register_forward_pre_hook(hold)
    run = tmp_path / "run"
    try:
        with kvtrace.record(run, model=model, profiler=False):
            a_thread.append(threading.Thread(target=_generate, args=(model, a_ids, a_new, outputs, "a")))
            b_thread = threading.Thread(target=run_b)
            a_thread[0].start()
            b_thread.start()
            a_thread[0].join(WAIT_S)
            b_thread.join(WAIT_S)
    finally:
        handle.remove()
    assert set(outputs) == {"a", "b"}

    # THEN B's first forward is its own call's prefill (its 5-token prompt, not A's 7), and each forward is
    # a step of its own phase: B's prefill and 2 decodes, then A's prefill and decode
    events = read_run(run).kv_events
    phases = {e.step: e.phase for e in events if e.phase != "end"}
    assert phases == {1: "prefill", 2: "decode", 3: "decode", 4: "prefill", 5: "decode"}
    layer0_k = [(e.step, e.cache, e.event, e.tokens) for e in events if e.layer == 0 and e.kv == "k"]
    assert [x for x in layer0_k if x[2] != "freed"] == [
        (1, 1, "created", 5),
        (2, 1, "grown", 6),
        (3, 1, "grown", 7),
        (4, 2, "created", 7),
        (5, 2, "grown", 8),
    ]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["warnings"] == []  # no forward overlapped another
    samples = [json.loads(line) for line in (run / "memory_samples.jsonl").read_text().splitlines()]
    # each call's prefill sample says where its own prompt ends
    assert {s["step"]: s["prompt_end"] for s in samples if "prompt_end" in s} == {1: 5, 4: 7}
    report = _report(run, capsys)
    assert report["steps"] == a_new + b_new
    assert report["kv"]["final_bytes"] == _kv_bytes(5 + b_new - 1, 1) + _kv_bytes(7 + a_new - 1, 1)


@pytest.mark.parametrize("hooked", [False, True], ids=["compared-at-forward-end", "each-update"])
def test_a_block_ending_while_another_thread_is_inside_a_forward_says_the_last_step_is_partial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], hooked: bool
) -> None:
    # GIVEN generate() on a thread of its own (as beside a TextIteratorStreamer), its third forward held
    # between layer 0's cache update and layer 1's while the record() block ends
    model = build_model(tiny_size(LAYERS, KV_HEADS))
    ids = _ids(1, 6, seed=5)
    new_tokens = 4
    forwards = [0]
    inside, release = threading.Event(), threading.Event()
    outputs: dict[str, Any] = {}

    def hold() -> None:
        forwards[0] += 1
        if forwards[0] == 3:
            inside.set()
            assert release.wait(WAIT_S)

    run = tmp_path / "run"
    worker = threading.Thread(target=_generate, args=(model, ids, new_tokens, outputs, "out"))
    with _held_in_layer_1(model, hooked, hold):
        try:
            with kvtrace.record(run, model=model, profiler=False):
                worker.start()
                assert inside.wait(WAIT_S)
        finally:
            release.set()  # WHEN the block has ended, the forward goes on
            worker.join(WAIT_S)
    # THEN the generate() thread finished unharmed: all its tokens, its cache whole
    out = outputs["out"]
    assert out.sequences.shape == (1, 6 + new_tokens)
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [6 + new_tokens - 1] * LAYERS

    # AND the log holds steps 1-3, the third as far as it had got: layer 0 at 8 tokens, layer 1 at 7
    events = read_run(run).kv_events
    assert max(e.step for e in events) == 3
    last = {(e.layer, e.kv): e.tokens for e in events if e.event != "freed"}
    assert last == {(0, "k"): 8, (0, "v"): 8, (1, "k"): 7, (1, "v"): 7}
    assert {(e.layer, e.event) for e in events if e.step == 3 and e.phase == "decode"} == {
        (0, "grown"),
        (0, "freed"),
    }
    # AND the manifest, and so the report, says why, though the block itself ended without an error
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["ended"]["status"] == "ok"
    (warning,) = manifest["warnings"]
    assert warning.startswith(
        "the record() block ended while a forward of the model was running on another thread"
    )
    report = _report(run, capsys)
    assert warning in report["notes"]
    assert report["steps"] == 3
    assert report["kv"]["final_bytes"] == _kv_bytes(8, 1) // 2 + _kv_bytes(7, 1) // 2  # 2,048 + 1,792
