"""Fixtures of the recorder's integration tests: a tiny real Llama 3, a real left-padded batch, and a guard
that every test leaves no hook behind (the recorder patches `Cache` methods and hooks the model); for the
analyzers' tests, files and folders made unreadable."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers.cache_utils
from transformers.generation.continuous_batching import cache as cb_cache
from transformers.generation.continuous_batching import continuous_api, offloading_manager
from transformers.generation.utils import GenerationMixin

import kvtrace.recorder
from kvtrace.llama import DEFAULT_PROMPTS, ModelSize, build_model, encode_batch, llama3_tokenizer

# The methods the recorder may wrap, as transformers defines them, captured before any recording ran.
_CACHE_METHODS = (
    "update",
    "crop",
    "reset",
    "reorder_cache",
    "batch_select_indices",
    "batch_repeat_interleave",
    "offload",
    "prefetch",
)
ORIGINAL_CACHE_METHODS = {name: transformers.cache_utils.Cache.__dict__.get(name) for name in _CACHE_METHODS}
# Continuous batching's, which kvtrace.integrations.hf_paged wraps on the classes.
_CB_METHODS = (
    (cb_cache.PagedAttentionCache, "__init__"),
    (cb_cache.PagedAttentionCache, "evict_cached_blocks"),
    (cb_cache.PagedAttentionCache, "search_prefix_match"),
    (continuous_api.ContinuousBatchProcessor, "prepare_next_batch"),
    (continuous_api.ContinuousBatchProcessor, "update_batch"),
    (offloading_manager.OffloadingManager, "offload_requests"),
)
ORIGINAL_CB_METHODS = {(cls, name): cls.__dict__.get(name) for cls, name in _CB_METHODS}
# The generate() the recorder wraps to see where each call begins (kvtrace.integrations.hf_generate).
ORIGINAL_GENERATE = GenerationMixin.__dict__["generate"]

# Small enough that a whole test file runs in seconds on two cores; the real Llama 3 vocabulary so that
# the real tokenizer's ids index the embedding.
TINY = ModelSize(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
PAD_ID = 128004  # <|finetune_right_pad_id|>, the pad id `build_model` configures


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        """Tokens per row after left padding: what the cache holds after prefill."""
        return int(self.input_ids.shape[1])


@pytest.fixture(scope="session")
def watched_models() -> list[torch.nn.Module]:
    """Models whose modules the leak guard checks after every test; fixtures add theirs."""
    return []


@pytest.fixture(scope="module")
def cb_model(request: pytest.FixtureRequest, watched_models: list[torch.nn.Module]) -> torch.nn.Module:
    """The continuous-batching tests' model: a tiny Llama 3 in fp32 of the test module's own `LAYERS` and
    `KV_HEADS` (its arithmetic's), one per module, watched by the leak guard."""
    from tests.tiny import tiny_size as size_of

    model = build_model(size_of(request.module.LAYERS, request.module.KV_HEADS), dtype=torch.float32)
    watched_models.append(model)
    return model


@pytest.fixture(scope="session")
def tiny_size() -> ModelSize:
    return TINY


@pytest.fixture(scope="session")
def tiny_model(watched_models: list[torch.nn.Module]) -> torch.nn.Module:
    model = build_model(TINY)
    watched_models.append(model)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return llama3_tokenizer()


@pytest.fixture(scope="session")
def prompt_batch(tokenizer) -> Batch:
    """Two real prompts of different lengths, left-padded to the longer one."""
    ids, mask = encode_batch(tokenizer, list(DEFAULT_PROMPTS[:2]), PAD_ID)
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] != lengths[1], "the batch must need padding to test left padding"
    assert (ids[:, -1] != PAD_ID).all(), "padding must be on the left"
    return Batch(ids, mask)


def _hook_leaks(models: list[torch.nn.Module]) -> list[str]:
    leaks: list[str] = []
    for name, original in ORIGINAL_CACHE_METHODS.items():
        current = transformers.cache_utils.Cache.__dict__.get(name)
        if current is not original:
            leaks.append(f"transformers Cache.{name} is still patched ({current!r})")
    for (cls, name), original in ORIGINAL_CB_METHODS.items():
        if cls.__dict__.get(name) is not original:
            leaks.append(f"transformers {cls.__name__}.{name} is still patched")
    if GenerationMixin.__dict__["generate"] is not ORIGINAL_GENERATE:
        leaks.append("transformers GenerationMixin.generate is still patched")
    for model in models:
        for owner in (model, type(model)):
            for method in ("forward", "_apply"):
                if getattr(owner.__dict__.get(method), "kvtrace_wrapper", False):
                    leaks.append(f"{owner!r:.60}.{method} is still kvtrace's wrapper")
        for module_name, module in model.named_modules():
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_forward_hooks_with_kwargs",
                "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_always_called",
            ):
                hooks = getattr(module, attr, None)
                if hooks:
                    leaks.append(f"{type(model).__name__}.{module_name or '<root>'}.{attr} = {dict(hooks)!r}")
    if kvtrace.recorder._ACTIVE is not None:
        leaks.append(f"kvtrace.recorder._ACTIVE is still {kvtrace.recorder._ACTIVE!r}")
    return leaks


@pytest.fixture(autouse=True)
def no_hook_leaks(watched_models: list[torch.nn.Module]) -> Iterator[None]:
    before = _hook_leaks(watched_models)
    assert not before, f"hooks leaked before this test: {before}"
    yield
    leaks = _hook_leaks(watched_models)
    # Put things right so that one leak fails one test, not every test after it.
    for name, original in ORIGINAL_CACHE_METHODS.items():
        if original is not None:
            setattr(transformers.cache_utils.Cache, name, original)
    for (cls, name), original in ORIGINAL_CB_METHODS.items():
        setattr(cls, name, original)
    GenerationMixin.generate = ORIGINAL_GENERATE  # type: ignore[method-assign]
    for model in watched_models:
        for method in ("forward", "_apply"):
            if getattr(model.__dict__.get(method), "kvtrace_wrapper", False):
                del model.__dict__[method]
            wrapper = type(model).__dict__.get(method)
            if wrapper is not None and getattr(wrapper, "kvtrace_wrapper", False):
                setattr(type(model), method, wrapper.__wrapped__)
        for module in model.modules():
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
    kvtrace.recorder._ACTIVE = None
    assert not leaks, f"the test left hooks behind: {leaks}"


@pytest.fixture()
def make_unreadable() -> Iterator[Callable[[Path], None]]:
    """A function that takes every permission off a file or folder (`chmod 000`), given back after the test.
    It skips the test where that does not stop this process from reading (root, or a file system that
    ignores modes): what such a test checks cannot happen there."""
    taken: list[tuple[Path, int]] = []

    def take_permissions(path: Path) -> None:
        taken.append((path, stat.S_IMODE(path.stat().st_mode)))
        path.chmod(0)
        try:
            if path.is_dir():
                os.listdir(path)
            else:
                path.open("rb").close()
        except PermissionError:
            return
        pytest.skip(f"{path} is still readable after chmod 000 (run as root?)")

    yield take_permissions
    for path, mode in reversed(taken):
        path.chmod(mode)
