"""A serving engine's pool as the report's KV figures: the glue between analyzers.engine and the summary.

Kept apart from the reader so that analyzers.summary can ask for it lazily, for run directories only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analyzers.engine import EngineFigures, EngineInfo, engine_figures, read_engine
from analyzers.units import human_bytes

__all__ = ["engine_of_source"]

# The `cache` id of an engine pool's KV events: vLLM's (kvtrace.integrations.vllm.VLLM_CACHE_ID) and
# transformers' continuous batching's (kvtrace.integrations.hf_paged.CB_CACHE_ID).
POOL_CACHE_IDS = {"transformers-cb": 3100}
VLLM_POOL_CACHE_ID = 3000


def engine_of_source(
    source: Any, kv: Any, devices: Sequence[Any] = (), notes: list[str] | None = None
) -> EngineFigures | None:
    """The engine figures of a run directory's source (None for other inputs and runs without an engine).
    Keeps the read files in `source.meta["engine"]` for the HTML panel, and makes the KV figures the pool's:
    its layers are views of one storage, so the pool is counted once (`kv.peak_bytes` = its bytes).
    Appends to `notes` what the device figures miss because vLLM allocated it before the trace began."""
    if getattr(source, "kind", None) != "run":
        return None
    run = source.meta.get("engine") or read_engine(source.path)
    if run is None:
        return None
    source.meta["engine"] = run
    figures = engine_figures(run)
    if run.info.kv_cache_bytes:
        pool_notes = _pool_as_kv(run.info, kv)
        if notes is not None:
            notes.extend(pool_notes + _before_trace_notes(run.info, devices))
        _split_pool_by_layer(source.meta.get("kv"), int(run.info.kv_cache_bytes), kv.per_layer)
    return figures


def _split_pool_by_layer(kv_log: Any, pool: int, per_layer: Sequence[Any]) -> None:
    """The KV log sees the pool as one storage, logged under the layer of its first view: in the per-step,
    per-layer figures (HTML heatmap, TensorBoard, counters) each layer gets its own view's bytes instead,
    as the report's per-layer table has them."""
    split = {layer.layer: layer.k_bytes + layer.v_bytes for layer in per_layer}
    if kv_log is None or not split or sum(split.values()) != pool:
        return
    for step, live in kv_log.step_live.items():
        if sum(live.values()) == pool:
            kv_log.step_live[step] = dict(split)


def _pool_as_kv(info: EngineInfo, kv: Any) -> list[str]:
    """The report's KV figures for a paged pool: its storage (once); per layer, the layer's view split into
    K and V by the layout (halves when it holds both, all K otherwise, as the recorder logs it), so that the
    layers add up to the pool. There is no batch (the pool is shared by whatever requests run): `batch` is
    None and `tokens_held` is the pool's token capacity (num_blocks x block_size); bytes per token measured =
    pool bytes / that capacity, beside vLLM's arithmetic layers x 2 x kv_heads x head_dim x dtype bytes.
    Returns the notes when the engine's layers do not add up to its pool."""
    from analyzers.summary import LayerSummary

    pool = int(info.kv_cache_bytes or 0)
    # Other caches (a plain generate() in the same block) may add to the KV log's peak: never below the pool
    kv.peak_bytes = max(int(kv.peak_bytes or 0), pool)
    if kv.measured_from == "none" or not kv.final_bytes:
        kv.final_bytes = pool
        kv.measured_from = "engine"
    capacity = (info.num_blocks or 0) * (info.block_size or 0)
    kv.batch = None
    kv.tokens_held = capacity or None
    kv.token_rows = None
    kv.bytes_per_token_measured = pool / capacity if capacity else None
    model = info.model
    element = _ELEMENT_BYTES.get(info.kv_dtype)
    kv.bytes_per_token_expected = None
    if element and all(isinstance(model.get(k), int) for k in ("num_layers", "num_kv_heads", "head_dim")):
        per_layer_token = 2 * model["num_kv_heads"] * model["head_dim"] * element
        kv.bytes_per_token_expected = model["num_layers"] * per_layer_token
    pool_cache = POOL_CACHE_IDS.get(str(info.name), VLLM_POOL_CACHE_ID)
    _caches_as_pool(kv, pool, capacity, pool_cache)
    layers = [layer for layer in info.layers if isinstance(layer.get("bytes"), int)]
    if not layers:
        return []
    head_dim = model.get("head_dim") if isinstance(model.get("head_dim"), int) else None
    kv.per_layer = []
    for i, layer in enumerate(layers):
        k_bytes, v_bytes = _k_and_v(layer, info.num_blocks, head_dim)
        kv.per_layer.append(
            LayerSummary(int(layer.get("layer", i)), k_bytes, v_bytes, 0, capacity, cache=pool_cache)
        )
    covered = sum(int(layer["bytes"]) for layer in layers)
    if covered != pool:
        return [f"the engine's {len(layers)} layer views cover {covered:,} B of its {pool:,} B KV pool"]
    return []


def _caches_as_pool(kv: Any, pool: int, capacity: int, pool_cache: int) -> None:
    """The per-cache figures of a paged pool: the KV log's shape[0] is the pool's blocks, not a batch, so its
    cache has no rows and holds the pool's bytes over its capacity; another cache (a plain generate() in the
    same block) keeps its own figures."""
    for cache in kv.caches:
        if cache.cache != pool_cache:
            continue
        cache.rows = None
        cache.final_bytes, cache.tokens = pool, capacity
        cache.bytes_per_token_measured = (
            cache.final_bytes / cache.tokens if cache.final_bytes and cache.tokens else None
        )


def _k_and_v(layer: dict[str, Any], num_blocks: int | None, head_dim: int | None) -> tuple[int, int]:
    """A layer view's bytes as (K, V), found from its shape the way the recorder splits the tensor
    (kvtrace.integrations.vllm.split_kv): a leading 2 before the blocks, K and V side by side in the
    channels (CPU), or a 2 right after the blocks. (bytes, 0) when none applies (e.g. MLA's one latent)."""
    nbytes = int(layer["bytes"])
    shape = [int(x) for x in layer.get("shape") or ()]
    halves = (
        (len(shape) >= 2 and shape[0] == 2 and shape[1] == num_blocks)
        or (bool(shape) and head_dim is not None and shape[-1] == 2 * head_dim)
        or (len(shape) >= 4 and shape[0] == num_blocks and shape[1] == 2)
    )
    if not halves:
        return nbytes, 0
    return nbytes // 2, nbytes - nbytes // 2


def _before_trace_notes(info: EngineInfo, devices: Sequence[Any]) -> list[str]:
    """One line per figure vLLM allocated before the trace began and the device's categories miss (they
    start from the first recorded allocation): the weights, and the pool when nothing logged it."""
    notes = []
    at_peak = [getattr(d, "categories_at_peak", None) or {} for d in devices]
    weights = info.memory_profile.get("weights_bytes")
    if isinstance(weights, int) and weights > 0 and not any(c.get("weights") for c in at_peak):
        notes.append(
            f"the model's weights ({human_bytes(weights)}, engine.json) were loaded before the trace "
            "began: the device figures leave them out"
        )
    if devices and not any(c.get("kv") for c in at_peak):
        pool = human_bytes(int(info.kv_cache_bytes or 0))
        if info.name == "vllm":
            notes.append(
                f"vLLM allocated its KV pool ({pool}) before the trace began: the device figures leave it "
                "out; the KV figures are the pool's"
            )
        else:  # transformers' continuous batching makes its pool inside the block, on its own thread
            notes.append(
                f"the {info.name} KV pool ({pool}) is not among the trace's KV allocations (made on another "
                "thread, or with no per-layer view for kvtrace to name it): the device figures count it "
                "as other, or leave it out; the KV figures are the pool's"
            )
    return notes


_ELEMENT_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "uint8": 1,
}
