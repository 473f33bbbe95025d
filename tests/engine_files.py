"""Hand-made vLLM engine files for the unit tests: a 5-block pool (block 0 is vLLM's null block) of 4-token
blocks, 2 layers x 1 KV head x head_dim 4 in bf16, so one block of one layer is 2*4*1*4*2 = 64 B and one
block of all layers 128 B; the pool is 5 * 128 = 640 B.

Two requests, max_num_seqs 2: A (prompt 6, 4 output tokens) and B (prompt 5, 4 output tokens). Each holds
2 blocks after its prefill, which fills the 4 usable blocks. At step 4, A needs a third block (9 tokens),
nothing is free, and the scheduler preempts B (2 blocks, 7 tokens). A finishes at step 4; B resumes at
step 5, recomputes its 8 tokens and finishes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ENGINE_JSON: dict[str, Any] = {
    "name": "vllm",
    "version": "0.32.0",
    "status": "ok",
    "process": "inproc",
    "prefix_stats": "vllm",  # its stats on: the steps' 0 hits are counted ones
    "model": {
        "num_layers": 2,
        "num_kv_heads": 1,
        "head_dim": 4,
        "dtype": "bfloat16",
        "num_attention_heads": 2,
    },
    "config": {
        "max_model_len": 16,
        "max_num_seqs": 2,
        "block_size": 4,
        "gpu_memory_utilization": 0.9,
        "kv_cache_memory_bytes": 640,
        "kv_cache_dtype": "auto",
        "enable_prefix_caching": True,
        "tensor_parallel_size": 1,
        "device": "cpu",
    },
    "num_blocks": 5,
    "block_size": 4,
    "bytes_per_block": 128,
    "kv_cache_bytes": 640,
    "kv_dtype": "bfloat16",
    "layout": "LBHNC",
    "layers": [],
    "storage": [{"addr": 1000, "bytes": 640, "device": "cpu"}],
    "memory_profile": {},
    "refused": None,
}


def _step(step: int, used: int, running: int, waiting: int, scheduled: int, **extra: Any) -> dict[str, Any]:
    row = {
        "step": step,
        "t_ns": 1_000_000 * step,
        "blocks_total": 5,
        "blocks_used": used,
        "blocks_free": 4 - used,  # block 0 is the null block: used + free + reserved = total
        "blocks_reserved": 1,
        "blocks_cached": 0,
        "running": running,
        "waiting": waiting,
        "tokens_scheduled": scheduled,
        "preempted": [],
        "prefix_evicted_blocks": 0,
        "prefix_hits": 0,
        "prefix_queries": 0,
    }
    row.update(extra)
    return row


STEPS = [
    _step(1, 4, 2, 0, 11),
    _step(2, 4, 2, 0, 2),
    _step(3, 4, 2, 0, 2),
    _step(4, 3, 1, 1, 1, preempted=["B"], prefix_evicted_blocks=1),
    _step(5, 2, 1, 0, 8, blocks_cached=2, prefix_evicted_blocks=2),
]


def _req(step: int, rid: str, event: str, blocks: int, tokens: int, prompt: int, output: int, **extra: Any):
    return {
        "t_ns": 1_000_000 * step + 1,
        "step": step,
        "request_id": rid,
        "event": event,
        "blocks": blocks,
        "tokens": tokens,
        "prompt_tokens": prompt,
        "output_tokens": output,
        **extra,
    }


REQUESTS = [
    _req(1, "A", "scheduled", 2, 6, 6, 1),
    _req(1, "B", "scheduled", 2, 5, 5, 1),
    _req(4, "B", "preempted", 0, 0, 5, 3, dropped_blocks=2, dropped_tokens=7),
    _req(4, "A", "blocks", 3, 9, 6, 4),
    _req(4, "A", "finished", 0, 9, 6, 4),
    _req(5, "B", "resumed", 2, 8, 5, 4, recomputed_tokens=8),
    _req(5, "B", "finished", 0, 8, 5, 4),
]


def write_engine_run(
    folder: Path,
    engine: dict[str, Any] | None = None,
    steps: list[dict[str, Any]] | None = None,
    requests: list[dict[str, Any]] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "engine.json").write_text(json.dumps(engine or ENGINE_JSON))
    rows = STEPS if steps is None else steps
    (folder / "engine_steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = REQUESTS if requests is None else requests
    (folder / "engine_requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in events))
    return folder


def refused_engine(**refused: Any) -> dict[str, Any]:
    """The FIELD_NOTES refusal: a 4-layer model, 2 KV heads of 64, bf16, max_model_len 512, in a pool of
    kv_cache_memory_bytes = 1 MiB: 32 blocks of 16 tokens at 32,768 B a block, less vLLM's null block leaves
    1,015,808 B = 31 blocks, which vLLM prints as "available" (and 31 * 16 = 496 tokens)."""
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine.update(
        status="refused_start",
        model={
            "num_layers": 4,
            "num_kv_heads": 2,
            "head_dim": 64,
            "dtype": "bfloat16",
            "num_attention_heads": 8,
        },
        num_blocks=None,
        bytes_per_block=None,
        kv_cache_bytes=None,
        storage=[],
    )
    engine["config"].update(max_model_len=512, block_size=16, kv_cache_memory_bytes=1_048_576, max_num_seqs=8)
    engine["refused"] = {
        "message": "To serve at least one request with the model's max seq len (512), (0.0 GiB KV cache is "
        "needed, which is larger than the available KV cache memory (0.0 GiB).",
        "max_model_len": 512,
        "needed_bytes": 1_048_576,
        "available_bytes": 1_015_808,
        "estimated_max_model_len": 496,
        **refused,
    }
    return engine


def first_stage_engine(stages: bool) -> dict[str, Any]:
    """ENGINE_JSON as the first of 2 pipeline stages' workers records it: the model has 4 layers, the pool
    (the same 640 B, 128 B a block) holds the KV of layers 0-1, 2 x 1 head x 4 x 2 B x 2 (K, V) = 32 B a
    token; `stages`: with each stage's share (runs recorded since kvtrace kept it), else without."""
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["model"]["num_layers"] = 4
    engine["config"]["pipeline_parallel_size"] = 2
    engine["layers"] = [
        {"layer": i, "name": f"model.layers.{i}.self_attn.attn", "shape": [5, 1, 4, 8], "dtype": "bfloat16",
         "bytes": 320, "storage_addr": 1000, "view_offset": 320 * i}
        for i in (0, 1)
    ]  # fmt: skip
    if stages:
        engine["pipeline_stages"] = [
            {"stage": s, "layers": [2 * s, 2 * s + 1], "kv_cache_bytes": 640, "weights_bytes": 10}
            for s in (0, 1)
        ]
    return engine
