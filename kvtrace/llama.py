"""Llama 3 architecture models with random weights, and the caches kvtrace demonstrates.

Memory behaviour does not depend on weight values, so a randomly initialised model of the published
shape (GQA, llama3 RoPE scaling) shows exactly the KV-cache memory a trained one would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

# torch is imported inside the functions: the CLI reads SIZES and CACHE_KINDS to build --help.

CACHE_KINDS = ("dynamic", "static", "sliding", "static_sliding", "fp8", "quanto", "hqq", "offloaded")
SLIDING_KINDS = ("sliding", "static_sliding")
# The window a sliding cache keeps on a model whose config has none (`--window` overrides it)
DEFAULT_WINDOW = 16
# transformers' dynamic sliding layer keeps `states[..., -window + 1:, :]`: at a window of 1 that is every
# token (`-0:`), so its cache never slides
MIN_WINDOW = 2

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int = 128256  # the real Llama 3 tokenizer's vocabulary
    tie_embeddings: bool = True
    head_dim: int | None = None  # None: hidden_size // num_heads, as in the published Llama 3 shapes

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def parameters(self) -> int:
        """The parameters `build_model` makes (LlamaForCausalLM, no biases): known before it allocates any."""
        hidden, width = self.hidden_size, self.attention_head_dim
        attention = 2 * hidden * self.num_heads * width + 2 * hidden * self.num_kv_heads * width
        layer = attention + 3 * hidden * self.intermediate_size + 2 * hidden  # q, o, k, v; MLP; 2 norms
        embeddings = self.vocab_size * hidden * (1 if self.tie_embeddings else 2)
        return embeddings + self.num_layers * layer + hidden  # the final norm


SIZES: dict[str, ModelSize] = {
    # The demo's shape: Llama 3's architecture (GQA 2:1, llama3 RoPE) with a narrow residual stream and
    # wide KV (4 layers x 8 KV heads x head_dim 256 = 64 KiB per token in float32), so that the KV cache
    # is a large share of memory next to the 128K-vocabulary embedding, while few layers keep the
    # profiled run to seconds on two CPU cores.
    "demo": ModelSize(
        hidden_size=64, intermediate_size=256, num_layers=4, num_heads=16, num_kv_heads=8, head_dim=256
    ),
    "tiny": ModelSize(hidden_size=128, intermediate_size=384, num_layers=4, num_heads=8, num_kv_heads=2),
    "small": ModelSize(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2),
    "llama-3.2-1b": ModelSize(2048, 8192, 16, 32, 8),
    "llama-3-8b": ModelSize(4096, 14336, 32, 32, 8, tie_embeddings=False),
}


def llama3_config(size: ModelSize, sliding_window: int | None = None) -> Any:
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = {}
    if sliding_window is not None:
        # Llama attention ignores the window; the cache honours it, which is all memory depends on.
        kwargs.update(sliding_window=sliding_window, layer_types=["sliding_attention"] * size.num_layers)
    # The Llama 3 tokenizer's ids where the vocabulary is the real one; small test vocabularies use 0-2.
    real_vocab = size.vocab_size >= 128256
    special_ids: dict[str, Any] = {
        "bos_token_id": 128000 if real_vocab else 1,
        "eos_token_id": 128001 if real_vocab else 2,
        "pad_token_id": 128004 if real_vocab else 0,
    }
    return LlamaConfig(
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_kv_heads,
        head_dim=size.attention_head_dim,
        vocab_size=size.vocab_size,
        tie_word_embeddings=size.tie_embeddings,
        max_position_embeddings=131072,  # above 8192, as llama3 RoPE scaling expects
        rope_parameters=dict(LLAMA3_ROPE),
        **special_ids,
        **kwargs,
    )


def build_model(size: ModelSize | str, dtype: Any = None, device: str = "cpu", seed: int = 0) -> Any:
    """A Llama 3 architecture `LlamaForCausalLM` with random weights, in eval mode."""
    import torch
    from transformers import LlamaForCausalLM

    if isinstance(size, str):
        size = SIZES[size]
    torch.manual_seed(seed)
    dtype = dtype or torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no transient fp32 copy (48 GB for 8B)
    try:
        with torch.device(device):
            # cast: transformers' functools.wraps on `to` makes mypy expect the model as the first argument.
            model = cast(Any, LlamaForCausalLM(llama3_config(size))).to(dtype)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# The package each quantized cache backend imports, and what pip calls it.
_CACHE_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}


def device_unavailable(device: str) -> str | None:
    """Why `--device` cannot be used by this torch (said before a model is built), or None."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        return f"--device {device}: not a torch device (cpu, cuda, cuda:N, mps)"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {device}: this torch ({torch.__version__}) sees no CUDA device"
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        return f"--device {device}: MPS is not available here"
    return None


def cache_unavailable(kind: str, device: str) -> str | None:
    """Why a cache kind cannot run on this device (said before a model is built), or None.

    transformers fails deep inside the first layer update otherwise: the offloaded cache syncs CUDA streams
    ("Torch not compiled with CUDA enabled" on a CPU build)."""
    import torch

    if kind == "offloaded" and torch.device(device).type != "cuda":
        return (
            f"--cache offloaded needs a CUDA device (--device cuda, not {device}): transformers' offloaded "
            "cache moves each layer between the GPU and the CPU on CUDA streams"
        )
    return None


def cache_package_missing(kind: str) -> str | None:
    """What to install for a cache kind whose backend is not here (quanto, hqq: transformers imports it at
    the first layer update), or None. Apart from `cache_unavailable`: a part not installed is status 1."""
    import importlib.util

    if kind == "fp8":
        return _fp8_cache_missing()
    if kind not in _CACHE_PACKAGES:
        return None
    module, package = _CACHE_PACKAGES[kind]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package (optimum) is missing
        found = False
    return None if found else f"--cache {kind} needs the {package} package: pip install {package}"


def _fp8_cache_missing() -> str | None:
    """What to install where transformers has no fp8 quantized cache, or None. Its backend is transformers'
    own `Fp8QuantizedLayer` (5.17 has none: `QuantizedCache(backend="fp8")` raises deep in the demo), so the
    class's presence is the feature, not a version number."""
    import transformers
    import transformers.cache_utils

    if hasattr(transformers.cache_utils, "Fp8QuantizedLayer"):
        return None
    return (
        f"--cache fp8 needs a transformers with the fp8 quantized cache (Fp8QuantizedLayer), which "
        f"transformers {transformers.__version__} has not: pip install -U transformers"
    )


def make_cache(
    kind: str, model: Any, batch: int, max_len: int, window: int = DEFAULT_WINDOW
) -> tuple[Any, dict[str, Any]]:
    """(cache object or None, extra generate() kwargs) for a cache kind; `max_len` = prompt + new tokens."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    config = model.config
    if kind == "dynamic":
        return None, {}
    if kind == "static":
        # A cache object of this call's own, never `cache_implementation="static"`: generate() keeps that
        # one on the model (`model._cache`) and reuses it in later calls, so a second recording would see
        # an earlier call's cache (a sweep point reported another point's KV).
        # Sized as generate() sizes its own: the last new token is never fed back, so max_len - 1.
        return StaticCache(config=config, max_cache_len=_static_len(max_len)), {}
    if kind == "offloaded":
        return None, {"cache_implementation": "offloaded"}
    if kind in SLIDING_KINDS:
        sliding = llama3_config(_size_of(config), sliding_window=window)
        if kind == "sliding":
            return DynamicCache(config=sliding), {}
        # As `static`: each layer holds min(window, max_len - 1) tokens, so a window wider than the
        # context holds what `static` holds
        return StaticCache(config=sliding, max_cache_len=_static_len(max_len)), {}
    if kind in ("fp8", "quanto", "hqq"):
        return QuantizedCache(backend=kind, config=config), {}
    raise ValueError(f"unknown cache kind {kind!r}; choose from {', '.join(CACHE_KINDS)}")


@contextlib.contextmanager
def window_on_config(model: Any, kind: str, window: int) -> Iterator[None]:
    """For a sliding cache kind, the model's config says the window `make_cache` gives its cache, on every
    layer, as `llama3_config(size, sliding_window=window)` would; as it was again after the block. Enter
    `kvtrace.record()` inside it, and generate after it: the recording's start reads the config for the
    manifest's geometry and model_config.json (a plain Llama's has no window, so they said
    `sliding_window: null` of a cache that slid), while generate() must not see it, as it would build
    per-layer-type masks for a static cache, which Llama's forward cannot take."""
    if kind not in SLIDING_KINDS:
        yield
        return
    config = model.config
    fields = ("sliding_window", "layer_types")
    before = {name: vars(config)[name] for name in fields if name in vars(config)}
    config.sliding_window = window
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    try:
        yield
    finally:
        for name in fields:
            if name in before:
                setattr(config, name, before[name])
            else:
                delattr(config, name)


def _static_len(max_len: int) -> int:
    """generate()'s own static cache length (`generation_config.max_length - 1`): every token it feeds."""
    return max(max_len - 1, 1)


def cache_keyword() -> str:
    """`generate()`'s keyword for a cache: `cache` where transformers renamed it (5.25 did; 5.17 still takes
    `past_key_values` and refuses `cache` as an unused model kwarg). Read from the signature generate() passes
    it to, not from a version number: the rename's release is not one kvtrace can name."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _size_of(config: Any) -> ModelSize:
    return ModelSize(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        tie_embeddings=config.tie_word_embeddings,
        head_dim=getattr(config, "head_dim", None),
    )


def llama3_tokenizer() -> Any:
    """The real Llama 3 tokenizer (tiktoken BPE file shipped by `llama-models`)."""
    import llama_models
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")


DEFAULT_PROMPTS = (
    "The key-value cache stores the attention keys and values of every token seen so far, so that",
    "Out-of-memory errors at long context usually come from",
    "A sliding window keeps only the most recent tokens of each layer, which",
    "Grouped-query attention shares each key and value head among several query heads, and",
)


def encode_batch(tokenizer: Any, prompts: list[str], pad_id: int) -> tuple[Any, Any]:
    """Left-padded input ids and attention mask, as decoder-only generation expects."""
    import torch

    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return ids, mask
