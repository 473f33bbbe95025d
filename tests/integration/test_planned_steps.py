"""A decode step on its planned path (`kvtrace.integrations.hf_decode_plan`, issue 11) logs what the general
path logs, hands a layer it does not fit to the general path, and leaves the cache as it found it.

Each test records the same real `generate()` twice, once as it runs and once with the planned path refused
(every forward then ends on the general path, as before the plan existed), and compares the two logs event by
event, addresses and times aside.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from kvlog_math import kv_bytes
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StaticCache
from transformers.cache_utils import DynamicLayer, StaticLayer

import kvtrace
from kvtrace import planned_steps
from kvtrace.planned_steps import PlannedSteps
from tests.tiny import cache_arg

NEW_TOKENS = 6
_VARYING = ("seq", "t_ns", "addr", "prev_addr")


def _events(run: Path) -> list[dict[str, Any]]:
    lines = (run / "kv_events.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in _VARYING} for line in lines]


def _samples(run: Path) -> list[tuple[Any, ...]]:
    samples = map(json.loads, (run / "memory_samples.jsonl").read_text().splitlines())
    return [
        (s["step"], s["phase"], s.get("raised"))
        for s in samples
        if s["phase"] not in ("start", "host", "end")
    ]


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each planned step's `log_planned` logged every layer of its cache; it runs as it is."""
    answers: list[bool] = []
    original = planned_steps.log_planned

    def counted(*args: Any) -> int:
        taken = original(*args)
        answers.append(taken == len(args[2]))
        return taken

    monkeypatch.setattr(planned_steps, "log_planned", counted)
    return answers


def _refuse_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PlannedSteps, "_decode_step", lambda self, plan, args, kwargs: False)


def _generate(model: Any, batch: Any, run: Path, cache: Any = None, **extra: Any) -> Any:
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        return model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            **({**cache_arg(cache)} if cache is not None else {}),
            **extra,
        )


class _LayerOfItsOwn(DynamicLayer):
    """A layer class of the caller's, which transformers' cache treats as any dynamic layer."""


class _StaticOfItsOwn(StaticLayer):
    """A static layer class of the caller's."""


class _RebindLayer(LogitsProcessor):
    """Between two forwards (a logits processor runs after each), at the `at`-th call, change one layer as
    code outside the cache's update may: rebind its K and V to copies (new storages no update made, the same
    tokens), or make it a layer of another class. The tensors it replaces are kept (`kept`): their storages
    stay alive, so no new storage of the run can take their addresses (which the allocator decides)."""

    def __init__(self, cache: Any, layer: int, at: int, change: str) -> None:
        self.cache, self.layer, self.at, self.change, self.calls = cache, layer, at, change, 0
        self.kept: tuple[torch.Tensor, ...] = ()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at:
            target = self.cache.layers[self.layer]
            if self.change == "copies":
                self.kept = (target.keys, target.values)
                target.keys, target.values = target.keys.clone(), target.values.clone()
            else:
                target.__class__ = _StaticOfItsOwn if isinstance(target, StaticLayer) else _LayerOfItsOwn
        return scores


ROOM = 32  # a static cache's positions


@pytest.mark.parametrize(
    ("cache_kind", "change", "answers"),
    # copies are new tensors the next update grows (or writes), as any; a layer of another class is handed
    # to the general path with those after it, after the plan has logged the layers before it, and the next
    # steps are the general path's (no plan fits the cache any more)
    [
        ("dynamic", "copies", [True] * (NEW_TOKENS - 1)),
        ("dynamic", "class", [True, True, False]),
        ("static", "copies", [True] * (NEW_TOKENS - 1)),
        ("static", "class", [True, True, False]),
    ],
)
def test_planned_steps_log_what_the_general_path_logs_with_a_layer_changed_between_steps(
    tiny_model: Any,
    prompt_batch: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    planned: list[bool],
    cache_kind: str,
    change: str,
    answers: list[bool],
) -> None:
    # GIVEN a generate() whose cache's layer 1 is changed after its third forward
    def run(path: Path) -> None:
        if cache_kind == "static":
            cache: Any = StaticCache(config=tiny_model.config, max_cache_len=ROOM)
        else:
            cache = DynamicCache(config=tiny_model.config)
        rebind = _RebindLayer(cache, layer=1, at=3, change=change)
        _generate(tiny_model, prompt_batch, path, cache, logits_processor=LogitsProcessorList([rebind]))
        assert rebind.calls == NEW_TOKENS

    run(tmp_path / "planned")
    # THEN the decode steps took the planned path as far as it fits
    assert planned == answers
    planned.clear()
    _refuse_plans(monkeypatch)
    run(tmp_path / "general")
    assert planned == []
    # ... and the two logs are the same events, steps and samples
    assert _events(tmp_path / "planned") == _events(tmp_path / "general")
    assert _samples(tmp_path / "planned") == _samples(tmp_path / "general")
    # ... each decode step growing (writing) every layer's storage to its tokens (2 KV heads of 16, 2 rows,
    # fp32; a static layer's storage its room), the static copies replacing the storages they were made from
    rows, prompt = prompt_batch.input_ids.shape
    kinds = ("grown", "written", "replaced")
    for step in range(2, NEW_TOKENS + 1):
        updated = [e for e in _events(tmp_path / "planned") if e["step"] == step and e["event"] in kinds]
        assert [(e["layer"], e["kv"]) for e in updated] == [(0, "k"), (0, "v"), (1, "k"), (1, "v")]
        for update in updated:
            copied = cache_kind == "static" and change == "copies" and step == 4 and update["layer"] == 1
            event = "replaced" if copied else "written" if cache_kind == "static" else "grown"
            assert update["event"] == event
            assert update["tokens"] == prompt + step - 1
            held = ROOM if cache_kind == "static" else prompt + step - 1
            assert update["storage_bytes"] == kv_bytes(2, 16, held, rows, 4)


def _failing_update(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """transformers' own `DynamicLayer.update` raising a CUDA OOM at its `at`-th call (counted over both
    recordings of a test from this call on): where a real OOM stops a step, in torch.cat."""
    original = DynamicLayer.update
    calls = [0]

    def update(self: DynamicLayer, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 MiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DynamicLayer, "update", update)


def test_an_oom_inside_a_planned_step_is_logged_as_the_general_path_logs_it(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planned: list[bool]
) -> None:
    def run(path: Path) -> None:
        # 2 layers: calls 1-2 are the prefill's, 3-4 step 2's; the 6th is step 3's layer 1
        _failing_update(monkeypatch, at=6)
        cache = DynamicCache(config=tiny_model.config)
        with pytest.raises(RuntimeError, match="out of memory"):
            _generate(tiny_model, prompt_batch, path, cache)

    run(tmp_path / "planned")
    # THEN step 2 took the planned path, step 3 raised inside its forward (its end is the general path's) ...
    assert planned == [True]
    _refuse_plans(monkeypatch)
    run(tmp_path / "general")
    # ... and the log is the general path's: step 3's layer 0 written, the step marked raised
    assert _events(tmp_path / "planned") == _events(tmp_path / "general")
    samples = _samples(tmp_path / "planned")
    assert samples == _samples(tmp_path / "general")
    assert samples[-1] == (3, "decode", True)
    step3 = [
        (e["layer"], e["kv"])
        for e in _events(tmp_path / "planned")
        if e["step"] == 3 and e["event"] == "grown"
    ]
    assert step3 == [(0, "k"), (0, "v")]


def test_a_planned_steps_cache_is_freed_as_soon_as_it_is_dropped(
    tiny_model: Any, prompt_batch: Any, tmp_path: Path, planned: list[bool]
) -> None:
    # GIVEN a generate() whose decode steps took the planned path
    out = _generate(tiny_model, prompt_batch, tmp_path / "run")
    assert planned == [True] * (NEW_TOKENS - 1)
    # THEN the plan holds its cache weakly: dropped, the cache goes at once (no cycle left for the collector)
    cache = out.past_key_values
    assert vars(cache).keys().isdisjoint({"update", "forward"})
    gone = weakref.ref(cache)
    gc.disable()
    try:
        del out, cache
        assert gone() is None
    finally:
        gc.enable()
