"""The flag combinations `kvtrace plan` refuses before planning: those that would plan a cache the engine
cannot build, or that the engine planned has no use for. Refused in one line naming the flag to use, rather
than planned silently as something else (a plan of int4 KV in a DynamicCache, which keeps bf16). Pure
checks, no arithmetic."""

from __future__ import annotations

import argparse

from kvtrace.errors import KvtraceError

__all__ = ["refuse_transformers_flags", "refuse_unbuildable_kv"]

# transformers' classes behind plan's cache names: what the refusal names
_CACHE_CLASSES = {
    "dynamic": "DynamicCache",
    "static": "StaticCache",
    "sliding": "DynamicCache (DynamicSlidingWindowLayer)",
    "static_sliding": "StaticCache (StaticSlidingWindowLayer)",
}
# the KV dtypes only transformers' QuantizedCache stores: quanto's nbits 2/4, HQQ's 8, its fp8 backend
_QUANTIZED_ONLY = ("int2", "int4", "int8", "fp8")


def refuse_unbuildable_kv(typed_kv_dtype: str | None, cache: str) -> None:
    """Refuses a typed --kv-dtype that the cache planned cannot hold. A DynamicCache or StaticCache (sliding
    or not) stores K and V as attention computes them, in the model's compute dtype: int2/int4/int8 and fp8
    KV is transformers' QuantizedCache (--cache quantized), which has no static or sliding variant. A float
    KV dtype other than the weights' is kept: weight-only quantized weights compute in bf16, fp16 or fp32 as
    loaded (bitsandbytes' compute dtype, GPTQ's fp16), and so does a model under autocast."""
    if typed_kv_dtype not in _QUANTIZED_ONLY or cache == "quantized":
        return
    windowed = (
        " (transformers has no sliding QuantizedCache)" if cache in ("sliding", "static_sliding") else ""
    )
    raise KvtraceError(
        f"--kv-dtype {typed_kv_dtype} with --cache {cache}: a {_CACHE_CLASSES[cache]} holds K and V in the "
        f"model's compute dtype (bf16, fp16 or fp32); {typed_kv_dtype} KV is transformers' QuantizedCache: "
        f"add --cache quantized{windowed}"
    )


# transformers-only flags under --engine vllm: (args attribute, what the flag is, why vLLM has no use for it
# and what to use instead). Each is refused: planned silently without it, a user reads vLLM's figures as if
# it had been taken (a --reserve 0.2 that changed nothing).
_TRANSFORMERS_ONLY = (
    (
        "reserve",
        "--reserve is the transformers plan's margin",
        "vLLM keeps out what gpu_memory_utilization leaves: use --gpu-memory-utilization (default 0.92, 8% "
        "kept out)",
    ),
    (
        "cache",
        "--cache names a transformers cache",
        "vLLM's KV is a paged pool of blocks (--block-size); an fp8 pool is --kv-cache-dtype fp8",
    ),
    (
        "window",
        "--window sets a transformers sliding cache's window",
        "vLLM slides the layers the model's config slides, at its sliding_window (--config PATH)",
    ),
    (
        "encoder_tokens",
        "--encoder-tokens sizes an encoder-decoder's cross-attention KV in transformers",
        "vLLM's plan has none: plan it without --engine vllm",
    ),
)


def refuse_transformers_flags(args: argparse.Namespace) -> None:
    """Refuses, under --engine vllm, the flags that plan transformers' caches alone, and a --context that
    says another max_model_len than --max-model-len (both give it: which one the user meant is not known)."""
    for name, what, instead in _TRANSFORMERS_ONLY:
        if getattr(args, name, None) is not None:
            raise KvtraceError(f"{what}: with --engine vllm, {instead}")
    context, length = getattr(args, "context", None), getattr(args, "max_model_len", None)
    if context is not None and length is not None and context != length:
        raise KvtraceError(
            f"--context {context} and --max-model-len {length}: with --engine vllm both give max_model_len, "
            "tokens per request; give one"
        )
