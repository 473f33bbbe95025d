"""vLLM pipeline parallelism as engine.json records it: the figures are the first stage's worker's.

Each stage's worker holds the KV of its own layers, over the block ids the stages share (the same
`num_blocks` on every worker), and its share of the weights. engine.json's pool, layers and weights are the
first worker's, as under tensor parallelism, where a user debugging one GPU's memory looks; its
`pipeline_stages` (runs recorded since kvtrace kept it) gives every stage's layers and KV bytes, which add up
to the whole pool.
"""

from __future__ import annotations

from analyzers.engine import EngineInfo, draft_kv_layers
from analyzers.units import human_bytes


def pipeline_size(info: EngineInfo) -> int:
    """engine.json's `config.pipeline_parallel_size`, 1 where absent or not a count."""
    size = info.config.get("pipeline_parallel_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 1 else 1


def worker_kv_layers(info: EngineInfo) -> int | None:
    """The attention layers whose KV the worker engine.json describes holds, each a page of every block:
    the model's and a speculative drafter's; under pipeline parallelism the first stage's, the pool's layer
    views (vLLM's scheduler config is the first worker's). None where the model's layers are unknown."""
    if pipeline_size(info) > 1 and info.layers:
        return len(info.layers)
    layers = info.model.get("num_layers")
    if not isinstance(layers, int) or isinstance(layers, bool):
        return None
    return layers + draft_kv_layers(info.model)


def layer_text(layers: list[int]) -> str:
    """`0-39` for a run of layers, else the list."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ", ".join(str(layer) for layer in layers)


def _stages(info: EngineInfo) -> list[tuple[list[int], int]]:
    """(layers, KV bytes) of each recorded stage; [] where a stage's figures are missing or malformed."""
    stages = []
    for stage in info.pipeline_stages:
        layers, kv_bytes = stage.get("layers"), stage.get("kv_cache_bytes")
        if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
            return []
        if not isinstance(kv_bytes, int) or isinstance(kv_bytes, bool):
            return []
        stages.append((sorted(layers), kv_bytes))
    return stages


def recorded_stages(info: EngineInfo) -> list[tuple[list[int], int | None]] | None:
    """(layers, weights and vLLM's buffers, None where not recorded) of each stage's worker, in stage order,
    where engine.json records every stage's layers (runs since kvtrace kept `pipeline_stages`); None
    otherwise."""
    size, stages = pipeline_size(info), _stages(info)
    if size == 1 or len(stages) != size:
        return None
    staged: list[tuple[list[int], int | None]] = []
    for stage, (layers, _) in zip(info.pipeline_stages, stages, strict=True):
        weights, buffers = _count(stage.get("weights_bytes")), _count(stage.get("buffers_bytes") or 0)
        staged.append((layers, weights + buffers if weights is not None and buffers is not None else None))
    return staged


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def widest_stage(info: EngineInfo) -> tuple[int, int, int] | None:
    """(stage, bytes of one block, KV bytes) of the stage whose worker holds the most layers' pages a block,
    the first of those tied, where engine.json records every stage's figures and the pool's blocks; None
    otherwise. Every worker is given the same kv_cache_memory_bytes and keeps the same blocks, so this one
    needs the most memory for them."""
    stages, blocks = _stages(info), info.num_blocks
    if pipeline_size(info) == 1 or len(stages) != pipeline_size(info) or not blocks:
        return None
    stage, (_, kv_bytes) = max(enumerate(stages), key=lambda item: (item[1][1], -item[0]))
    return stage, kv_bytes // blocks, kv_bytes


def pipeline_note(info: EngineInfo, pool: int) -> str | None:
    """What a pipeline-parallel run's KV figures are: the first stage's worker's, with every stage's share
    and the whole pool; None without pipeline parallelism."""
    size = pipeline_size(info)
    if size == 1:
        return None
    held = sorted(int(layer.get("layer", i)) for i, layer in enumerate(info.layers))
    of_model = info.model.get("num_layers")
    first = f"layers {layer_text(held)} of the model's {of_model}" if held else "its stage's layers"
    blocks = f"the same {info.num_blocks:,} blocks" if info.num_blocks else "the same blocks"
    stages = _stages(info)
    tp = info.config.get("tensor_parallel_size")
    tp = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1 else 1
    if not stages:
        rest = (
            f"each of the {size} stages' workers holds the KV of its own layers over {blocks} (each stage's "
            "share not recorded: runs recorded before kvtrace kept `pipeline_stages`)"
        )
    else:
        shares = ", ".join(f"{human_bytes(kv)} (layers {layer_text(layers)})" for layers, kv in stages)
        ranks = f" on each of its {tp} tensor-parallel workers" if tp > 1 else ""
        total = sum(kv for _, kv in stages) * tp
        rest = f"the {len(stages)} stages hold {shares}{ranks} over {blocks}, {human_bytes(total)} in all"
    return (
        f"pipeline parallel {size}: the KV figures are the first stage's worker's (engine.json describes "
        f"it, {human_bytes(pool)}), holding the KV of {first}; {rest}"
    )


def all_workers_pool(info: EngineInfo) -> tuple[int, int] | None:
    """(workers, KV bytes over all of them) of a run whose pool engine.json gives for its first worker:
    each tensor-parallel rank holds a pool of that size (its share of the heads), each pipeline stage its
    own layers' (`pipeline_stages`). None without a pool, or where a stage's share was not recorded."""
    pool = info.kv_cache_bytes
    if not isinstance(pool, int) or isinstance(pool, bool) or pool <= 0:
        return None
    tp = info.config.get("tensor_parallel_size")
    tp = tp if isinstance(tp, int) and not isinstance(tp, bool) and tp > 1 else 1
    size = pipeline_size(info)
    if size == 1:
        return tp, pool * tp
    stages = _stages(info)
    if len(stages) != size:
        return None
    return tp * size, tp * sum(kv for _, kv in stages)
