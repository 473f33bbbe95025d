"""Light mode compares a forward's layers once, at its end, instead of at each layer update (issue 11).

The cache's update then runs unwrapped by kvtrace's bookkeeping; `HfCacheHooks.step_end` logs each layer
the forward changed as the update that changed it. Full mode (`profiler=True`) still follows every update
as it happens, so the two logs of the same `generate()` must be the same events, addresses and times
aside. Where something besides the cache's update may change KV tensors inside a forward (a hook on an
attention module, as eviction presses use), light mode follows every update too; a change it cannot
explain turns deferring off for the rest of the run and is named in the manifest's warnings.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import kv_bytes

import kvtrace
from kvtrace import planned_steps
from kvtrace.cli import main
from kvtrace.integrations.hf_caches import HfCacheHooks
from kvtrace.planned_steps import PlannedSteps
from kvtrace.run_reader import read_run
from tests.tiny import cache_arg

NEW_TOKENS = 6
_VARYING = ("seq", "t_ns", "addr", "prev_addr")


def _events(run: Path) -> list[dict[str, Any]]:
    lines = (run / "kv_events.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in _VARYING} for line in lines]


def _generate(model: Any, batch: Any, run: Path, profiler: bool, **extra: Any) -> None:
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
        _generate_plain(model, batch, **extra)


def _generate_plain(model: Any, batch: Any, **extra: Any) -> None:
    """The test's `generate()`, inside whatever recording the caller holds."""
    model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        **extra,
    )


@pytest.fixture
def step_ends(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The `written` flag of every forward's end that compared the cache's layers: a real `step_end` call,
    or a planned decode step's `log_planned` (never written) that logged them all; both run as they are."""
    calls: list[bool] = []
    original = HfCacheHooks.step_end
    planned = planned_steps.log_planned

    def counted(self: HfCacheHooks, *args: Any, **kwargs: Any) -> None:
        calls.append(bool(kwargs.get("written", args[2] if len(args) > 2 else False)))
        original(self, *args, **kwargs)

    def counted_plan(*args: Any) -> int:
        taken = planned(*args)
        if taken == len(args[2]):  # every layer (else `step_end` takes the rest, and is counted)
            calls.append(False)
        return taken

    monkeypatch.setattr(HfCacheHooks, "step_end", counted)
    monkeypatch.setattr(planned_steps, "log_planned", counted_plan)
    return calls


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"cache_implementation": "static"},
        {"num_beams": 2},
        {"cache_implementation": "static", "num_beams": 2},
    ],
    ids=["dynamic", "static", "beams", "static-beams"],
)
def test_light_mode_logs_what_full_mode_logs_update_by_update(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, step_ends: list[bool], extra: dict[str, Any]
) -> None:
    # GIVEN the same generate() recorded in full mode (every update followed as it happens) ...
    _generate(tiny_model, prompt_batch, tmp_path / "full", profiler=True, **extra)
    assert step_ends == []
    # ... and in light mode
    _generate(tiny_model, prompt_batch, tmp_path / "light", profiler=False, **extra)
    # THEN light mode compared every forward at its end (prefill and each decode step) ...
    assert step_ends == [False] * NEW_TOKENS
    # ... and logged the very same events: kinds, layers, K/V, bytes, shapes, tokens, steps, frees
    full, light = _events(tmp_path / "full"), _events(tmp_path / "light")
    assert light == full
    assert sum(e["event"] == "grown" for e in light) == (0 if "cache_implementation" in extra else 20)


def test_a_hook_on_an_attention_module_keeps_every_update_followed(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, step_ends: list[bool]
) -> None:
    # GIVEN a hook that rebinds its layer's K and V to copies after each attention, as eviction presses
    # rebind them to the tokens they keep
    def rebind(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.x
        layer = cache.layers[module.layer_idx]
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()

    attention = [layer.self_attn for layer in tiny_model.model.layers]
    handles = [m.register_forward_hook(rebind, with_kwargs=True) for m in attention]
    try:
        _generate(tiny_model, prompt_batch, tmp_path / "full", profiler=True)
        _generate(tiny_model, prompt_batch, tmp_path / "light", profiler=False)
    finally:
        for handle in handles:
            handle.remove()
    # THEN light mode did not defer: each update and each rebinding shows, as in full mode
    assert step_ends == []
    light = _events(tmp_path / "light")
    assert light == _events(tmp_path / "full")
    layers, steps = len(attention), NEW_TOKENS
    assert sum(e["event"] == "replaced" for e in light) == layers * 2 * steps


def test_a_change_the_updates_do_not_explain_turns_deferring_off_and_says_so(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, step_ends: list[bool], tiny_size: Any
) -> None:
    # GIVEN code that cuts layer 0 of the cache to its last 4 tokens from the final norm's forward (after
    # every layer; no hook), in the last forward of a generate()
    forwards: list[Any] = []

    def remember(module: Any, args: Any, kwargs: Any) -> None:
        forwards.append(kwargs.get("cache", kwargs.get("past_key_values")))  # renamed in transformers 5.x

    norm = tiny_model.model.norm
    norm_forward = norm.forward

    def cut(*args: Any) -> Any:  # the norm's forward itself, not a hook (a hook keeps every update followed)
        if len(forwards) == NEW_TOKENS:
            layer = forwards[-1].layers[0]
            layer.keys = layer.keys[:, :, -4:].clone()
            layer.values = layer.values[:, :, -4:].clone()
        return norm_forward(*args)

    norm.forward = cut
    handles = [tiny_model.register_forward_pre_hook(remember, with_kwargs=True)]
    run = tmp_path / "light"
    try:
        with torch.no_grad(), kvtrace.record(run, model=tiny_model, profiler=False):
            for _ in range(2):  # the second generate() comes after the change
                _generate_plain(tiny_model, prompt_batch)
    finally:
        del norm.forward
        for handle in handles:
            handle.remove()
    # THEN every forward of the first generate() was deferred, and none after the change ...
    assert step_ends == [False] * NEW_TOKENS
    recorded = read_run(run)
    (warning,) = [w for w in recorded.manifest["warnings"] if "besides the cache's update" in w]
    prompt = prompt_batch.prompt_len
    assert warning.startswith(
        f"step {NEW_TOKENS}: layer 0 held 4 tokens per row where its updates give {prompt + NEW_TOKENS - 1}"
    )
    # ... and the figures are exact: the first cache's layer 0 ends at 4 tokens (logged as an eviction of
    # the rest), and the second cache, followed update by update, holds all its tokens
    rows, kv_heads, head_dim = prompt_batch.rows, tiny_size.num_kv_heads, tiny_size.attention_head_dim
    final: dict[tuple[int, int, str], tuple[int, int]] = {}
    for event in recorded.kv_events:
        if event.event != "freed":
            final[(event.cache, event.layer, event.kv)] = (event.tokens, event.storage_bytes)
    first, second = sorted({cache for cache, _, _ in final})
    held = prompt + NEW_TOKENS - 1
    for kv in ("k", "v"):
        assert final[(first, 0, kv)] == (4, kv_bytes(kv_heads, head_dim, 4, rows, 4))
        assert final[(first, 1, kv)] == (held, kv_bytes(kv_heads, head_dim, held, rows, 4))
        for layer in (0, 1):
            assert final[(second, layer, kv)] == (held, kv_bytes(kv_heads, head_dim, held, rows, 4))
    # the cut step's event for layer 0 says how many tokens the cut took (an eviction by other code)
    (cut_k,) = [
        e
        for e in recorded.kv_events
        if e.cache == first and e.layer == 0 and e.kv == "k" and e.step == NEW_TOKENS and e.event != "freed"
    ]
    assert (cut_k.tokens, cut_k.evicted_tokens, cut_k.reason) == (4, held - 4, "")
    report = json.loads(_report_json(run))
    assert report["kv"]["evictions_by_reason"] == {"press": (held - 4) * rows}


def _report_json(run: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["report", str(run), "--json", "--no-export"]) == 0
    return out.getvalue()


def _raise_at(module: Any, call: int, error: BaseException) -> None:
    """Make `module`'s forward raise `error` at its `call`-th call: by its `forward` attribute, not a hook
    (a hook on any module keeps light mode following each update)."""
    calls = [0]
    original = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise error
        return original(*args, **kwargs)

    module.forward = forward


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode], ids=["no-grad", "inference"])
def test_a_forward_that_raises_logs_only_the_layers_it_reached(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, step_ends: list[bool], cache: str, grad_mode: Any
) -> None:
    # GIVEN the first layer's MLP raising in the third forward: layer 0 is updated, layer 1 never reached
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    for profiler in (True, False):
        _raise_at(tiny_model.model.layers[0].mlp, 3, RuntimeError("boom"))
        try:
            recording = kvtrace.record(tmp_path / str(profiler), model=tiny_model, profiler=profiler)
            with pytest.raises(RuntimeError), grad_mode(), recording:
                tiny_model.generate(
                    input_ids=prompt_batch.input_ids,
                    attention_mask=prompt_batch.attention_mask,
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    **extra,
                )
        finally:
            del tiny_model.model.layers[0].mlp.forward
    # THEN light mode deferred the two forwards and the failing one, and logged what full mode logged: no
    # event, and no eviction, for the layer the failing forward never reached (inference tensors included)
    assert step_ends == [False] * 3
    light = _events(tmp_path / "False")
    assert light == _events(tmp_path / "True")
    assert not any(e.get("evicted_tokens") for e in light)
    assert {e["layer"] for e in light if e["step"] == 3 and e["event"] != "freed"} == {0}


def test_a_static_cache_filled_before_the_recording_counts_what_it_held(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, step_ends: list[bool]
) -> None:
    from transformers import StaticCache

    runs = []
    for profiler in (True, False):
        # GIVEN a static cache filled by a generate() before the recording ...
        cache = StaticCache(config=tiny_model.config, max_cache_len=64)
        with torch.no_grad():
            out = tiny_model.generate(
                input_ids=prompt_batch.input_ids,
                attention_mask=prompt_batch.attention_mask,
                max_new_tokens=3,
                do_sample=False,
                past_key_values=cache,
            )
        # ... and continued inside it
        more = torch.cat([out, out[:, -2:]], dim=1)
        run = tmp_path / str(profiler)
        with torch.no_grad(), kvtrace.record(run, model=tiny_model, profiler=profiler):
            tiny_model.generate(
                input_ids=more,
                attention_mask=torch.ones_like(more),
                max_new_tokens=3,
                do_sample=False,
                past_key_values=cache,
            )
        runs.append(run)
    # THEN its tokens are what it held plus what came in, in light mode as in full mode
    assert step_ends == [False] * 3
    light = _events(runs[1])
    assert light == _events(runs[0])
    held = prompt_batch.prompt_len + 3 - 1 + 2 + 1 + 2  # kept by the first generate(), 3 in, 2 decoded
    assert max(e["tokens"] for e in light) == held


def test_a_keyboard_interrupt_caught_inside_the_block_ends_its_step(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path
) -> None:
    for profiler in (True, False):
        # GIVEN a generate() interrupted in its third forward (torch then skips the always-called end hook),
        # caught inside the block, and another generate() after it
        _raise_at(tiny_model.model.layers[0].mlp, 3, KeyboardInterrupt())
        try:
            run = tmp_path / str(profiler)
            with torch.no_grad(), kvtrace.record(run, model=tiny_model, profiler=profiler):
                with contextlib.suppress(KeyboardInterrupt):
                    _generate_plain(tiny_model, prompt_batch)
                gc.collect()  # the traceback's frames hold the interrupted cache in a cycle
                del tiny_model.model.layers[0].mlp.forward
                _generate_plain(tiny_model, prompt_batch)
        finally:
            vars(tiny_model.model.layers[0].mlp).pop("forward", None)
    # THEN both modes log the same events; the interrupted cache is not kept alive by kvtrace, and the next
    # generate() starts a step of its own, a prefill
    light = _events(tmp_path / "False")
    assert light == _events(tmp_path / "True")
    first_of_second = next(e for e in light if e["cache"] == 2)
    assert (first_of_second["step"], first_of_second["phase"]) == (4, "prefill")
    frees_of_first = [i for i, e in enumerate(light) if e["cache"] == 1 and e["event"] == "freed"]
    assert frees_of_first and max(frees_of_first) < light.index(first_of_second)


def test_a_hook_on_any_module_of_the_model_keeps_every_update_followed(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, step_ends: list[bool]
) -> None:
    # GIVEN a forward hook on a decoder layer (not an attention module), doing nothing
    handle = tiny_model.model.layers[1].register_forward_hook(lambda module, args, output: None)
    try:
        _generate(tiny_model, prompt_batch, tmp_path / "light", profiler=False)
    finally:
        handle.remove()
    # THEN light mode did not defer: the hook could have changed the cache
    assert step_ends == []


def _samples(run: Path) -> list[tuple[Any, ...]]:
    """Each step's memory sample: its step, phase and prompt end (the writer thread's `host` samples and
    the figures, the host's, vary)."""
    lines = (run / "memory_samples.jsonl").read_text().splitlines()
    samples = [(s["step"], s["phase"], s.get("prompt_end")) for s in map(json.loads, lines)]
    return [s for s in samples if s[1] not in ("start", "host", "end")]


@pytest.fixture
def short_steps(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What every offer of the decode steps' short path (`PlannedSteps._decode_step`) answered; the method
    runs as it is."""
    answers: list[bool] = []
    original = PlannedSteps._decode_step

    def counted(self: PlannedSteps, offer: Any, args: Any, kwargs: Any) -> bool:
        answers.append(original(self, offer, args, kwargs))
        return answers[-1]

    monkeypatch.setattr(PlannedSteps, "_decode_step", counted)
    return answers


def _general_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every offer refused: each forward takes the general path, as before the short path existed."""
    monkeypatch.setattr(PlannedSteps, "_decode_step", lambda self, offer, args, kwargs: False)


@pytest.mark.parametrize("extra", [{}, {"cache_implementation": "static"}], ids=["dynamic", "static"])
def test_decode_steps_take_the_short_path_and_log_what_the_general_path_logs(
    tiny_model: Any,
    prompt_batch: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    short_steps: list[bool],
    extra: dict[str, Any],
) -> None:
    # GIVEN a plain generate() recorded in light mode ...
    _generate(tiny_model, prompt_batch, tmp_path / "short", profiler=False, **extra)
    # THEN each decode step took the short path (the prefill offers it to the first)
    assert short_steps == [True] * (NEW_TOKENS - 1)
    # ... and WHEN the same generate() is recorded with the general path only
    _general_path_only(monkeypatch)
    _generate(tiny_model, prompt_batch, tmp_path / "general", profiler=False, **extra)
    # THEN the two logs are the same events and the same steps and phases
    short = _events(tmp_path / "short")
    assert short == _events(tmp_path / "general")
    assert _samples(tmp_path / "short") == _samples(tmp_path / "general")
    # ... each decode step one step of its own, and the cache's last figures those of the arithmetic:
    # prompt + new tokens - 1 positions (the last token is never written), 2 KV heads of 16, 2 rows, fp32
    rows, prompt = prompt_batch.input_ids.shape
    assert [s[:2] for s in _samples(tmp_path / "short")] == [(1, "prefill")] + [
        (step, "decode") for step in range(2, NEW_TOKENS + 1)
    ]
    last = {(e["layer"], e["kv"]): e for e in short if e["event"] != "freed" and e["phase"] != "end"}
    assert sorted(last) == [(layer, kv) for layer in range(2) for kv in ("k", "v")]
    tokens = prompt + NEW_TOKENS - 1
    for event in last.values():
        assert (event["step"], event["tokens"]) == (NEW_TOKENS, tokens)
        assert event["logical_bytes"] == kv_bytes(2, 16, event["shape"][2], rows, 4)
        if not extra:  # a dynamic layer's storage is its tokens exactly
            assert event["storage_bytes"] == kv_bytes(2, 16, tokens, rows, 4)


def test_a_generate_call_continuing_a_cache_takes_the_general_path_at_its_first_forward(
    tiny_model: Any,
    prompt_batch: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    short_steps: list[bool],
) -> None:
    # GIVEN two generate() calls on one cache (a chat's second turn feeds the whole conversation again)
    def two_turns(run: Path) -> None:
        with torch.no_grad(), kvtrace.record(run, model=tiny_model, profiler=False):
            first = tiny_model.generate(
                input_ids=prompt_batch.input_ids,
                attention_mask=prompt_batch.attention_mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                return_dict_in_generate=True,
            )
            tiny_model.generate(
                input_ids=first.sequences,
                attention_mask=torch.ones_like(first.sequences),
                **cache_arg(first.past_key_values),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )

    two_turns(tmp_path / "short")
    # THEN the second call's first forward, offered the short path by the first call's last step, wrote
    # its new prompt tokens as a prefill through the general path; its decode steps took the short path
    assert short_steps == [True] * (NEW_TOKENS - 1) + [False] + [True] * (NEW_TOKENS - 1)
    _general_path_only(monkeypatch)
    two_turns(tmp_path / "general")
    assert _events(tmp_path / "short") == _events(tmp_path / "general")
    assert _samples(tmp_path / "short") == _samples(tmp_path / "general")
    phases = [s[1] for s in _samples(tmp_path / "short")]
    assert phases == (["prefill"] + ["decode"] * (NEW_TOKENS - 1)) * 2
