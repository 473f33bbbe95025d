"""A vLLM layer view's bytes split into K and V from its shape, for each layout the recorder knows
(kvtrace.integrations.vllm.split_kv), and the per-layer figures adding up to the pool."""

from __future__ import annotations

from typing import Any

from analyzers.engine import EngineInfo
from analyzers.engine_report import _k_and_v, _pool_as_kv
from analyzers.summary import KvSummary

BLOCKS, BLOCK, HEADS, DIM = 16, 32, 2, 64
HALF = BLOCKS * BLOCK * HEADS * DIM * 2  # one layer's K (or V) in bfloat16


def _layer(shape: list[int], nbytes: int = 2 * HALF, layer: int = 0) -> dict[str, Any]:
    return {"layer": layer, "shape": shape, "bytes": nbytes}


def test_each_layout_splits_in_halves() -> None:
    assert _k_and_v(_layer([2, BLOCKS, BLOCK, HEADS, DIM]), BLOCKS, DIM) == (HALF, HALF)  # GPU backends
    assert _k_and_v(_layer([BLOCKS, 2, BLOCK, HEADS, DIM]), BLOCKS, DIM) == (HALF, HALF)  # 2 after blocks
    assert _k_and_v(_layer([BLOCKS, HEADS, BLOCK, 2 * DIM]), BLOCKS, DIM) == (HALF, HALF)  # CPU
    assert _k_and_v(_layer([BLOCKS, BLOCK, 576]), BLOCKS, DIM) == (2 * HALF, 0)  # one latent (MLA): all K


def _info(layers: list[dict[str, Any]], pool: int) -> EngineInfo:
    model = {"num_layers": len(layers), "num_kv_heads": HEADS, "head_dim": DIM}
    return EngineInfo(
        name="vllm", version="0", status="ok", process="inproc", model=model, config={},
        num_blocks=BLOCKS, block_size=BLOCK, bytes_per_block=pool // BLOCKS, kv_cache_bytes=pool,
        kv_dtype="bfloat16", layout="", layers=tuple(layers), storage=(), memory_profile={}, refused=None,
    )  # fmt: skip


def test_layers_that_do_not_cover_the_pool_are_named() -> None:
    shape = [2, BLOCKS, BLOCK, HEADS, DIM]
    kv = KvSummary(0, 0, 0, 0, [], "none", batch=BLOCKS)
    notes = _pool_as_kv(_info([_layer(shape, layer=i) for i in range(3)], 8 * HALF), kv)
    assert [(x.layer, x.k_bytes, x.v_bytes) for x in kv.per_layer] == [(i, HALF, HALF) for i in range(3)]
    assert notes == [f"the engine's 3 layer views cover {6 * HALF:,} B of its {8 * HALF:,} B KV pool"]
    assert (kv.batch, kv.tokens_held, kv.peak_bytes) == (None, BLOCKS * BLOCK, 8 * HALF)
    assert kv.bytes_per_token_measured == 8 * HALF / (BLOCKS * BLOCK)
    assert kv.bytes_per_token_expected == 3 * 2 * HEADS * DIM * 2
