"""kvtrace's own `forward` around the recorded model's (kvtrace/model_forward.py): steps for that model
only, whatever else is made of it or of its class inside the block, and nothing of kvtrace's left after."""

from __future__ import annotations

import copy
import inspect
import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.tiny import tiny_size

LAYERS, PROMPT, NEW = 2, 6, 3


def _steps(run: Path) -> Counter[str]:
    """Forward steps by phase, from the run's KV events."""
    phases = {e.step: e.phase for e in read_run(run).kv_events if e.phase in ("prefill", "decode")}
    return Counter(phases.values())


def _generate(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip


def test_a_copy_made_inside_the_block_runs_its_own_weights_unrecorded(
    tmp_path: Path, watched_models: list[torch.nn.Module]
) -> None:
    # GIVEN a recorded model, and a deep copy of it made inside the block whose head is zeroed
    model = build_model(tiny_size(LAYERS), seed=0)
    watched_models.append(model)
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    signature = inspect.signature(model.forward)
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        assert inspect.signature(model.forward) == signature  # what generate() reads to pick its arguments
        twin = copy.deepcopy(model)
        twin.lm_head.weight.zero_()
        # WHEN the copy runs a forward of its own, and the model generates
        twin_logits = twin(ids).logits
        pickled = pickle.loads(pickle.dumps(model))  # a module with kvtrace's forward still pickles
        _generate(model, ids)
    # THEN the copy computed with its own weights, and only the model's forwards are steps
    assert torch.count_nonzero(twin_logits) == 0
    assert _steps(tmp_path / "run") == {"prefill": 1, "decode": NEW - 1}
    # AND neither the copies nor the model keep anything of kvtrace's
    for module in (model, twin, pickled):
        assert "forward" not in module.__dict__
    assert not getattr(type(model).__dict__["forward"], "kvtrace_wrapper", False)


@pytest.fixture
def two_models(watched_models: list[torch.nn.Module]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two models of one class, with their own weights: the recorded one, and another."""
    models = build_model(tiny_size(LAYERS), seed=0), build_model(tiny_size(LAYERS), seed=1)
    watched_models += models
    return models


def test_another_instance_of_the_class_is_not_recorded(tmp_path: Path, two_models: Any) -> None:
    # GIVEN two models of one class, one recorded
    model, other = two_models
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _generate(other, ids)
        with kvtrace.record(tmp_path / "run", model=model, profiler=False):
            # WHEN the other one generates inside the block
            got = _generate(other, ids)
            _generate(model, ids)
    # THEN it generated as it does outside, and the run's steps are the recorded model's only
    assert torch.equal(got, expected)
    events = read_run(tmp_path / "run").kv_events
    assert max(e.step for e in events) == NEW  # one prefill and NEW - 1 decode steps, of the model's call


def test_a_forward_set_on_the_instance_is_wrapped_and_put_back(
    tmp_path: Path, watched_models: list[torch.nn.Module]
) -> None:
    # GIVEN a model whose instance holds a forward of its own (as torch.compile's or accelerate's hooks do)
    model = build_model(tiny_size(LAYERS), seed=0)
    watched_models.append(model)
    calls = Counter[str]()
    class_forward = model.forward

    def own_forward(*args: Any, **kwargs: Any) -> Any:
        calls["own"] += 1
        return class_forward(*args, **kwargs)

    model.forward = own_forward
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        # WHEN it generates
        assert inspect.signature(model.forward) == inspect.signature(own_forward)
        _generate(model, ids)
    # THEN every forward went through its own forward and was a step, and its own forward is back
    assert calls["own"] == NEW
    assert _steps(tmp_path / "run") == {"prefill": 1, "decode": NEW - 1}
    assert model.__dict__["forward"] is own_forward


def test_a_run_where_another_model_generated_says_so(tmp_path: Path, two_models: Any) -> None:
    # GIVEN a block recording one model while another one generates
    model, other = two_models
    ids = torch.randint(3, 1000, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=model, profiler=False):
        _generate(other, ids)
    # THEN the run has no step, and its manifest says why rather than leaving tokens/s blank unexplained
    recorded = read_run(tmp_path / "run")
    assert {e.step for e in recorded.kv_events} == {0}
    (warning,) = recorded.manifest["warnings"]
    assert warning.startswith(f"the KV cache was updated at layer 0 {NEW} times, but never in a forward of")
