"""Skips for what an older transformers lacks: kvtrace's users run 5.17 beside 5.25, and a test of a part
5.17 has not (the fp8 quantized cache, a model family's config, a cache class) says so, not a traceback."""

from __future__ import annotations

import pytest
import transformers
import transformers.cache_utils

from kvtrace.llama import cache_package_missing

_FP8_MISSING = cache_package_missing("fp8")
HAS_FP8_CACHE = _FP8_MISSING is None
needs_fp8_cache = pytest.mark.skipif(not HAS_FP8_CACHE, reason=_FP8_MISSING or "")


def needs(module: object, name: str) -> pytest.MarkDecorator:
    """Skips where `module` (transformers or its cache_utils) has no `name`, naming the version."""
    where = getattr(module, "__name__", "transformers")
    reason = f"transformers {transformers.__version__} has no {where}.{name}"
    return pytest.mark.skipif(not hasattr(module, name), reason=reason)


needs_internlm3 = needs(transformers, "InternLM3Config")
needs_dummy_layer = needs(transformers.cache_utils, "DummyLayer")


def _reset_drops_storage() -> bool:
    """Whether `DynamicLayer.reset()` drops the keys and values (5.25) or zeroes them in place (5.17, which
    keeps every storage held)."""
    import torch
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    layer.reset()
    return layer.keys is None


RESET_DROPS_STORAGE = _reset_drops_storage()

HAS_DUMMY_LAYER = hasattr(transformers.cache_utils, "DummyLayer")


def _static_assisted_refused() -> str | None:
    """Why this transformers refuses assisted generation on a StaticCache (5.17 raises "assisted generate is
    not supported with Static cache classes"), or None where it runs it (5.25)."""
    import inspect

    import transformers.generation.utils

    if "not supported with Static cache" in inspect.getsource(transformers.generation.utils):
        return f"transformers {transformers.__version__} refuses assisted generation on a StaticCache"
    return None


_STATIC_ASSISTED_REFUSED = _static_assisted_refused()
needs_static_assisted = pytest.mark.skipif(
    _STATIC_ASSISTED_REFUSED is not None, reason=_STATIC_ASSISTED_REFUSED or ""
)
