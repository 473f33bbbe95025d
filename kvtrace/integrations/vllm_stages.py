"""vLLM pipeline parallelism: what each stage's worker holds.

Under `pipeline_parallel_size` > 1 the scheduler's one pool of block ids is shared by the stages, but each
stage's worker allocates the KV of its own layers only (vLLM's per-worker `KVCacheConfig`, all with the same
`num_blocks`) and loads its share of the weights; the scheduler's config is a copy of the first worker's
(`generate_scheduler_kv_cache_config`). engine.json's pool and weights are that first worker's, as under
tensor parallelism; `pipeline_stages` adds each stage's layers, KV bytes and weights, so that the whole
pool and the stage a GPU runs can both be read.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def checkpoint_params(workers: list[dict[str, Any]]) -> int | None:
    """The checkpoint's parameter count from every worker's parameters by name: a stage holds its layers'
    (the first the embedding, the last the norm and lm_head, a tied embedding again), tensor-parallel ranks
    the same names at their full sizes. None where no worker counted them."""
    numels: dict[str, int] = {}
    for facts in workers:
        numels.update(facts.get("param_numels") or {})
    if numels:
        return sum(numels.values())
    return workers[0].get("num_params") if workers else None


def pipeline_stages(
    workers: list[dict[str, Any]], layer_index: Callable[[str, int], int]
) -> list[dict[str, Any]]:
    """engine.json `pipeline_stages`: one entry per stage, in the workers' rank order (a stage's
    tensor-parallel ranks hold the same layer names: its first rank's figures), each with the decoder layers
    whose KV it holds, the bytes of its KV storage (each storage once), and its weights and buffers."""
    stages: list[dict[str, Any]] = []
    seen: set[tuple[str, ...]] = set()
    for facts in workers:
        layers = facts.get("layers") or {}
        names = tuple(sorted(layers))
        if not names or names in seen:
            continue
        seen.add(names)
        storages = {f["storage_addr"]: f["storage_bytes"] for f in layers.values()}
        stages.append(
            {
                "stage": len(stages),
                "layers": sorted(layer_index(name, position) for position, name in enumerate(layers)),
                "kv_cache_bytes": sum(storages.values()),
                "weights_bytes": facts.get("weights_bytes"),
                "buffers_bytes": facts.get("buffers_bytes"),
            }
        )
    return stages
