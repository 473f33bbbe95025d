"""DeepSeek-V4's remedies in `kvtrace diagnose`: only those its cache runs with, priced with the parts
`kvtrace plan` counts (analyzers.planning.compressed_kv). Pure, torch-free.

Why apart: in transformers 5.25 V4's cache layers (DeepseekV4HCACache, DeepseekV4CSACache) are registered
for the DynamicCache alone. A StaticCache of its config raises KeyError (no static layer for its layer
types), a QuantizedCache ValueError (full attention layers only), and its window is the config's, which the
model's masks follow: a static cache, a quantized cache or another sliding window is no remedy for it. Nor is
its KV K and V per token: the window and the compressor's state do not follow the context (they hold the
prompt's, whole, until the first decode step), the compressed entries and indexer keys grow by a fraction of
a token's K a layer. A shorter context is priced as the plan prices the cache at it; offloading (the
DynamicCache with offloading=True, which V4 runs with) moves each layer's keys and values, its window, and
leaves the compressed state on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyzers.planning.compressed_kv import compressed_growth_bytes, compressed_sizes
from analyzers.planning.diagnosis import Remedy, fits
from analyzers.planning.hf_config import geometry_from_config
from analyzers.planning.presets import CompressedShape
from analyzers.planning.run_cache_kind import PLAN_DTYPES
from analyzers.units import a_or_an, human_bytes
from kvtrace.errors import KvtraceError
from kvtrace.format import MODEL_CONFIG
from kvtrace.geometry import installed_transformers_version, major_minor
from kvtrace.json_reads import read_json_file

__all__ = ["NOT_ITS_CACHE", "CompressedRun", "compressed_remedies", "compressed_run", "prompt_and_written"]

_OFFLOAD_LAYERS_ON_DEVICE = 2  # the layer computing and the one being prefetched (as diagnose_remedies)

# The note diagnose adds where it leaves the other caches' remedies out
NOT_ITS_CACHE = (
    "DeepSeek-V4's cache layers (DeepseekV4HCACache, DeepseekV4CSACache) run in a DynamicCache only: a "
    "static cache, a quantized cache or another sliding window is not a cache it runs with, so none is "
    "offered; its KV is priced by part, as `kvtrace plan` counts it (window, compressed entries, indexer "
    "keys, compressor state)"
)


@dataclass(frozen=True)
class CompressedRun:
    """What prices a DeepSeek-V4 run's cache: its layers' kinds and rates, head_dim, window, and the plan's
    name of its dtype."""

    shape: CompressedShape
    head_dim: int
    window: int
    dtype: str


def compressed_run(run_path: str | Path, model_dtype: object) -> CompressedRun | None:
    """The run's model_config.json read as `plan --from-run` reads it, where it is DeepSeek-V4's, its cache
    as the manifest's transformers lays it out (a folder without a manifest: the installed one, as `plan
    --config`);
    None for any other model, a run without that file, or a config the planner refuses (the usual remedies
    stand)."""
    config = Path(run_path) / MODEL_CONFIG
    dtype = PLAN_DTYPES.get(str(model_dtype))
    if dtype is None or not config.is_file():
        return None
    try:
        manifest = read_json_file(Path(run_path) / "manifest.json", "not valid JSON")
    except (KvtraceError, OSError):
        manifest = None
    if isinstance(manifest, dict):  # as `plan --from-run` reads it (none named: the newest)
        named = manifest.get("transformers_version")
        version = major_minor(named) if isinstance(named, str) else None
    else:
        version = installed_transformers_version()
    try:
        geometry = geometry_from_config(config, version)
    except KvtraceError:
        return None
    if geometry.compressed is None or geometry.sliding_window is None:
        return None
    return CompressedRun(geometry.compressed, geometry.head_dim, geometry.sliding_window, dtype)


def prompt_and_written(
    memory_samples: list[dict[str, Any]], step_phase: dict[int, str], step: int, held_prompt: int | None
) -> tuple[int, int] | None:
    """(prompt, tokens written a row) at the end of `step`: the last prefill's prompt, as its memory sample
    says (`prompt_end`; else the tokens it left held, which a window caps), then one a decode step since it.
    V4's tokens held are its window's and say nothing of the compressed entries made. None without either."""
    prefills = [s for s, phase in step_phase.items() if phase == "prefill" and s <= step]
    if not prefills:
        return None
    since = max(prefills)
    ends = [
        sample.get("prompt_end")
        for sample in memory_samples
        if sample.get("phase") == "prefill" and sample.get("step") == since
    ]
    prompt = next((end for end in ends if isinstance(end, int) and end > 0), held_prompt)
    if not prompt:
        return None
    return prompt, prompt + sum(
        1 for s, phase in step_phase.items() if since < s <= step and phase == "decode"
    )


def _peak_at(run: CompressedRun, batch: int, prompt: int, context: int) -> int:
    """The plan's KV peak at `context` (prompt + new tokens), the prompt cut to fit it: `compressed_sizes`."""
    prompt = min(prompt, context - 1)
    return compressed_sizes(
        run.shape, run.head_dim, run.window, batch, prompt, context - prompt, run.dtype
    ).peak_bytes


def compressed_remedies(
    run: CompressedRun,
    kv: int,
    batch: int,
    prompt: int,
    written: int,
    need: int | None,
    num_layers: int | None,
    on_cuda: bool,
) -> list[Remedy]:
    """A shorter context and offloading for DeepSeek-V4's cache at a moment holding `kv` bytes, `batch`
    rows, after a `prompt`-token prefill and `written` tokens a row (the batch remedy and the allocator's
    are the usual ones)."""
    return [_context(run, kv, batch, prompt, written, need)] + (
        [_offloading(run, kv, batch, prompt, written, need, num_layers)] if on_cuda else []
    )


def _context(run: CompressedRun, kv: int, batch: int, prompt: int, written: int, need: int | None) -> Remedy:
    """The shortest cut of the context (prompt + new tokens, the new ones cut first) whose planned KV peak
    leaves room for `need`, else a quarter of it; priced as this moment's KV less that peak."""
    context = written + 1  # generate() never writes its last new token
    per_token = compressed_growth_bytes(run.shape, run.head_dim, run.dtype) * batch
    grows = (
        f"its window and compressor state do not follow the context (the prompt's, whole, until the first "
        f"decode step), its compressed entries and indexer keys grow {human_bytes(per_token)} a token across "
        "the batch"
    )
    if context < 3:
        said = f"No shorter context: {written:,} token{'s' if written > 1 else ''} written a row; {grows}."
        return Remedy("context", None, 0, fits(0, need), said)
    if need is not None and need > 0:
        # The longest context whose peak leaves room: the planned peak grows with the context
        low, high = 2, context - 1
        if kv - _peak_at(run, batch, prompt, low) < need:
            high = low
        while low < high:
            middle = (low + high + 1) // 2
            if kv - _peak_at(run, batch, prompt, middle) >= need:
                low = middle
            else:
                high = middle - 1
        shorter = low
    else:
        shorter = context - max(context // 4, 1)
    shorter = max(shorter, 2)
    peak = _peak_at(run, batch, prompt, shorter)
    saved = max(kv - peak, 0)
    cut_prompt = min(prompt, shorter - 1)
    kept = f"{a_or_an(format(cut_prompt, ','))}-token prompt"
    kept += f", {prompt:,} now" if cut_prompt < prompt else ""
    text = (
        f"A context of {shorter:,} tokens instead of {context:,} ({kept}) holds at most {human_bytes(peak)} "
        f"of KV, as `kvtrace plan` counts DeepSeek-V4's cache: {human_bytes(saved)} less than the "
        f"{human_bytes(kv)} at this moment; {grows}."
    )
    if need is not None and need > 0 and saved < need:
        text = f"No shorter context fits: {text[0].lower()}{text[1:]}"
    return Remedy("context", shorter, saved, fits(saved, need), text)


def _offloading(
    run: CompressedRun,
    kv: int,
    batch: int,
    prompt: int,
    written: int,
    need: int | None,
    num_layers: int | None,
) -> Remedy:
    """transformers' offloaded DynamicCache: each V4 layer's keys and values (its window) go to the CPU,
    about two layers' kept on the device; the compressed entries, indexer keys and compressor state stay."""
    layers = num_layers or len(run.shape.layer_kinds)
    if layers <= _OFFLOAD_LAYERS_ON_DEVICE:
        return Remedy("offloading", None, None, None, f"Offloading: {layers} layers, none to move.")
    sizes = compressed_sizes(
        run.shape, run.head_dim, run.window, batch, prompt, written - prompt + 1, run.dtype
    )
    window = min(dict(sizes.parts)["window"], kv)
    saved = math.floor(window * (1 - _OFFLOAD_LAYERS_ON_DEVICE / layers))
    text = (
        "Offloading the KV cache to CPU (cache_implementation='offloaded') moves each DeepSeek-V4 layer's "
        f"window, {human_bytes(window)} at this moment, keeping about {_OFFLOAD_LAYERS_ON_DEVICE} of "
        f"{layers} layers on the device: {human_bytes(saved)} less, paid in PCIe transfers every step; the "
        "compressed entries, indexer keys and compressor state stay on the device."
    )
    return Remedy("offloading", None, saved, fits(saved, need), text)
