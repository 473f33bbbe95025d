"""A serving engine's pool as the report's KV figures: the glue between analyzers.engine and the summary.

Kept apart from the reader so that analyzers.summary can ask for it lazily, for run directories only.
"""

from __future__ import annotations

from typing import Any

from analyzers.engine import EngineFigures, EngineInfo, engine_figures, read_engine

__all__ = ["engine_of_source"]


def engine_of_source(source: Any, kv: Any) -> EngineFigures | None:
    """The engine figures of a run directory's source (None for other inputs and runs without an engine).
    Keeps the read files in `source.meta["engine"]` for the HTML panel, and makes the KV figures the pool's:
    its layers are views of one storage, so the pool is counted once (`kv.peak_bytes` = its bytes)."""
    if getattr(source, "kind", None) != "run":
        return None
    run = source.meta.get("engine") or read_engine(source.path)
    if run is None:
        return None
    source.meta["engine"] = run
    figures = engine_figures(run)
    if run.info.kv_cache_bytes:
        _pool_as_kv(run.info, kv)
    return figures


def _pool_as_kv(info: EngineInfo, kv: Any) -> None:
    """The report's KV figures for a paged pool: its storage (once), each layer's view split into its K and
    V halves (dimension 1 of vLLM's per-layer tensor), and bytes per token = a block's bytes / block size,
    beside the arithmetic layers x 2 x kv_heads x head_dim x dtype bytes. Tokens are the pool's capacity."""
    from analyzers.summary import LayerSummary

    pool = int(info.kv_cache_bytes or 0)
    kv.peak_bytes = pool
    if kv.measured_from == "none" or not kv.final_bytes:
        kv.final_bytes = pool
        kv.measured_from = "engine"
    capacity = (info.num_blocks or 0) * (info.block_size or 0)
    if info.layers:
        kv.per_layer = [
            LayerSummary(
                int(layer.get("layer", i)), int(layer["bytes"]) // 2, int(layer["bytes"]) // 2, 0, capacity
            )
            for i, layer in enumerate(info.layers)
            if isinstance(layer.get("bytes"), int)
        ]
    if capacity and info.bytes_per_block and info.block_size:
        kv.tokens_held, kv.batch = capacity, 1
        kv.bytes_per_token_measured = info.bytes_per_block / info.block_size
        model = info.model
        element = _ELEMENT_BYTES.get(info.kv_dtype)
        if element and all(isinstance(model.get(k), int) for k in ("num_layers", "num_kv_heads", "head_dim")):
            kv.bytes_per_token_expected = (
                model["num_layers"] * 2 * model["num_kv_heads"] * model["head_dim"] * element
            )


_ELEMENT_BYTES = {
    "bfloat16": 2,
    "float16": 2,
    "float32": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "uint8": 1,
}
