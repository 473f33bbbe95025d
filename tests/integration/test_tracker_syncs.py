"""The recorder's bookkeeping never waits for the device (issue 11).

On CUDA, reading a tensor's value from the host (`.item()`, `int(t)`, `bool(t)`, `.tolist()`, `.cpu()`)
waits for every kernel queued before it: one such call per layer update would serialise a GPU decode
step. There is no GPU here, so a CUDA-free stand-in counts them: a `TorchFunctionMode` sees every one of
these calls on CPU tensors and records the ones made from kvtrace's own code (the first caller frame
outside torch). A real generate() runs under it with each cache kind; kvtrace must make none.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

import kvtrace
from kvtrace.integrations.hf_layers import layer_tokens
from kvtrace.llama import make_cache
from tests.tiny import cache_arg

NEW_TOKENS = 6
# Everything that copies a value to the host (and so synchronises on CUDA).
_SYNCING = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
    torch.Tensor.__format__,
}


def _caller_module() -> str:
    """The module of the first frame below this mode that is not torch's own."""
    frame: Any = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not (name == "torch" or name.startswith("torch.")):
            return name
        frame = frame.f_back
    return ""


class SyncCounter(TorchFunctionMode):
    """Counts host reads of tensor values, by the calling module."""

    def __init__(self) -> None:
        super().__init__()
        self.by_module: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        to_host = getattr(func, "__name__", "") in ("to", "_to_copy") and _to_cpu(args, kwargs)
        if func in _SYNCING or to_host:
            self.by_module[_caller_module()] += 1
        return func(*args, **(kwargs or {}))

    def from_kvtrace(self) -> dict[str, int]:
        return {m: n for m, n in self.by_module.items() if m == "kvtrace" or m.startswith("kvtrace.")}


def _to_cpu(args: Any, kwargs: Any) -> bool:
    wanted = [a for a in args[1:] if isinstance(a, (str, torch.device))]
    wanted += [v for k, v in (kwargs or {}).items() if k == "device"]
    return any(str(w).startswith("cpu") for w in wanted)


def test_the_counter_sees_a_sync_made_by_kvtrace(tiny_model):
    # GIVEN a static layer that holds 5 tokens, whose count is a tensor
    from transformers import StaticCache

    cache = StaticCache(config=tiny_model.config, max_cache_len=8)
    cache.update(torch.zeros(1, 2, 5, 16), torch.zeros(1, 2, 5, 16), 0)
    # WHEN kvtrace reads it without knowing the count (a crop or reset does) THEN the counter sees it
    with SyncCounter() as counter:
        assert layer_tokens(cache.layers[0]) == 5
        assert layer_tokens(cache.layers[0], known=5) == 5  # with the tracker's own count: no read
    assert counter.from_kvtrace() == {"kvtrace.integrations.hf_layers": 1}


@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding", "static_sliding"])
@pytest.mark.parametrize("profiler", [False, True])
def test_no_host_read_from_kvtrace_during_generate(tiny_model, prompt_batch, tmp_path, kind, profiler):
    rows, prompt_len = prompt_batch.rows, prompt_batch.prompt_len
    cache, extra = make_cache(kind, tiny_model, rows, prompt_len + NEW_TOKENS, window=8)
    if cache is not None:
        extra.update(cache_arg(cache))
    updates = 0
    original = tiny_model.model.layers[0].self_attn.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal updates
        updates += 1
        return original(*args, **kwargs)

    tiny_model.model.layers[0].self_attn.forward = counting
    try:
        with (
            torch.no_grad(),
            kvtrace.record(tmp_path / "run", model=tiny_model, profiler=profiler, snapshots=False),
            SyncCounter() as counter,
        ):
            tiny_model.generate(
                input_ids=prompt_batch.input_ids,
                attention_mask=prompt_batch.attention_mask,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                **extra,
            )
    finally:
        del tiny_model.model.layers[0].self_attn.forward
    # THEN the layer was updated once per step, transformers itself read values (the counter works on
    # this run), and kvtrace read none: not per update, not per step.
    assert updates == NEW_TOKENS
    assert sum(counter.by_module.values()) > 0
    assert counter.from_kvtrace() == {}
    del cache
