"""A serving engine's pool as the report's KV figures: the glue between analyzers.engine and the summary.

Kept apart from the reader so that analyzers.summary can ask for it lazily, for run directories only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analyzers.engine import ENGINE_REQUESTS, EngineFigures, EngineInfo, engine_figures
from analyzers.engine_stages import pipeline_note, pipeline_size, worker_kv_layers
from analyzers.readers.engine_files import read_engine
from analyzers.units import human_bytes
from kvtrace.format import CB_CACHE_ID, VLLM_CACHE_ID

__all__ = ["bytes_before_trace", "engine_of_source"]

# The `cache` id of an engine pool's KV events: transformers' continuous batching's, else vLLM's.
POOL_CACHE_IDS = {"transformers-cb": CB_CACHE_ID}
VLLM_POOL_CACHE_ID = VLLM_CACHE_ID


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
    requests_log = str(Path(run.path) / ENGINE_REQUESTS)
    if (
        run.requests_missing is not None
        and notes is not None
        and not any(
            n.startswith(requests_log)
            for n in notes  # a missing file listed in the manifest is noted already
        )
    ):
        notes.append(run.requests_missing)
    if figures.status == "refused_start" and not kv.per_layer:
        kv.measured_from = "none"  # no pool was made: the KV log was read, but it measured no KV
    if run.info.kv_cache_bytes:
        pool_notes = _pool_as_kv(run.info, kv)
        if notes is not None:
            notes.extend(pool_notes + _before_trace_notes(run.info, devices))
        _split_pool_by_layer(source.meta.get("kv"), int(run.info.kv_cache_bytes), _pool_layers(run.info))
    return figures


def bytes_before_trace(source: Any, devices: Sequence[Any]) -> int:
    """What a vLLM engine allocated before the trace began and its device figures miss, as
    `_before_trace_notes` names it: its weights (engine.json) and its pool. 0 for other runs, and for
    transformers' continuous batching, whose pool and weights are made inside the block."""
    if getattr(source, "kind", None) != "run":
        return 0
    run = source.meta.get("engine") or read_engine(source.path)
    if run is None or run.info.name != "vllm" or run.info.status != "ok":
        return 0
    source.meta["engine"] = run
    at_peak = [getattr(d, "categories_at_peak", None) or {} for d in devices]
    missing = 0
    if not any(c.get("weights") for c in at_peak):
        missing += sum(_loaded_with_model(run.info))
    if devices and not any(c.get("kv") for c in at_peak):
        missing += int(run.info.kv_cache_bytes or 0)
    return missing


def _loaded_with_model(info: EngineInfo) -> tuple[int, int]:
    """(weights, vLLM's own buffers) engine.json gives, in bytes; 0 for a figure it lacks (buffers: runs
    recorded before kvtrace kept them apart, whose weights figure may hold them)."""
    weights, buffers = (info.memory_profile.get(key) for key in ("weights_bytes", "buffers_bytes"))
    return (
        weights if isinstance(weights, int) and weights > 0 else 0,
        buffers if isinstance(buffers, int) and buffers > 0 else 0,
    )


def _drafter_weights(info: EngineInfo, weights: int) -> str:
    """How the weights split between the target and a speculative drafter loaded beside it (a draft model,
    an EAGLE head), as `: the target's X and the drafter's Y`; "" without a drafter's share."""
    drafter = info.memory_profile.get("draft_weights_bytes")
    if not isinstance(drafter, int) or isinstance(drafter, bool) or not 0 < drafter <= weights:
        return ""
    return f": the target's {human_bytes(weights - drafter)} and the drafter's {human_bytes(drafter)}"


def _split_pool_by_layer(kv_log: Any, pool: int, layers: Sequence[tuple[int, int, int]]) -> None:
    """The KV log sees the pool as one storage, logged under the layer of its first view: in the per-step,
    per-layer figures (HTML heatmap, TensorBoard, counters) each layer gets its own view's bytes instead,
    as the report's per-layer table has them. `layers`: (layer, K bytes, V bytes) of each view."""
    split = {layer: k_bytes + v_bytes for layer, k_bytes, v_bytes in layers}
    if kv_log is None or not split or sum(split.values()) != pool:
        return
    for step, live in kv_log.step_live.items():
        if sum(live.values()) == pool:
            kv_log.step_live[step] = dict(split)


def _pool_as_kv(info: EngineInfo, kv: Any) -> list[str]:
    """The report's KV figures for a paged pool: its storage (once); per layer, the layer's view split into
    K and V by the layout (halves when it holds both, all K otherwise, as the recorder logs it), so that the
    layers add up to the pool. There is no batch (the pool is shared by whatever requests run): `batch` is
    None and `tokens_held` is the pool's token capacity (num_blocks x block_size, over a hybrid model's cache
    groups: each token takes a slot in every group); bytes per token measured = pool bytes / that capacity,
    beside vLLM's arithmetic layers x 2 x kv_heads x head_dim x dtype bytes.

    The final figures are the KV log's, as for any cache: a pool held at the end of the run's last step
    counts (freed at the block's end, in phase `end`, as a returned generate()'s cache is), one the log saw
    freed before then holds 0, and the caches held at the end (a plain generate() after generate_batch) then
    make the headline. Returns the notes when the engine's layers do not add up to its pool."""
    from analyzers.summary import LayerSummary

    pool = int(info.kv_cache_bytes or 0)
    pool_cache = POOL_CACHE_IDS.get(str(info.name), VLLM_POOL_CACHE_ID)
    logged = next((cache for cache in kv.caches if cache.cache == pool_cache), None)
    freed = logged is not None and not logged.final_bytes  # gone before the run's last step ended
    # Other caches (a plain generate() in the same block) may add to the KV log's peak: never below the pool
    kv.peak_bytes = max(int(kv.peak_bytes or 0), pool)
    capacity = (info.num_blocks or 0) * (info.block_size or 0)
    groups, group_layers, padding = _cache_groups(info)
    _caches_as_pool(kv, pool, capacity // groups, pool_cache)
    layers = _pool_layers(info)
    covered = sum(k_bytes + v_bytes for _, k_bytes, v_bytes in layers)
    notes = []
    # a hybrid model's groups overlay the one storage, each `group_layers` pages a block, padding left empty
    if layers and covered * group_layers != pool * (groups * group_layers - padding):
        notes.append(f"the engine's {len(layers)} layer views cover {covered:,} B of its {pool:,} B KV pool")
    if freed and kv.final_bytes:  # other caches held KV at the end: the headline figures are theirs
        return notes
    if not freed and (kv.measured_from == "none" or not kv.final_bytes):  # the log never saw the pool
        kv.final_bytes = pool
        kv.measured_from = "engine"
    kv.batch = None
    kv.tokens_held = capacity // groups or None
    kv.token_rows = None
    kv.bytes_per_token_measured = pool * groups / capacity if capacity else None
    model = info.model
    element = _ELEMENT_BYTES.get(info.kv_dtype)
    kv.bytes_per_token_expected = None
    held_layers = worker_kv_layers(info)
    if (
        element
        and held_layers is not None
        and all(isinstance(model.get(k), int) for k in ("num_kv_heads", "head_dim"))
    ):
        from analyzers.planning.vllm_plan import kv_heads_per_worker

        # engine.json is the first worker's: under tensor parallelism its pool holds its share of the heads,
        # under pipeline parallelism its stage's layers (a speculative drafter's layers, a draft model's or
        # an EAGLE head's, hold KV in the same blocks)
        tp = info.config.get("tensor_parallel_size")
        tp = tp if isinstance(tp, int) and tp > 1 else 1
        heads = kv_heads_per_worker(model["num_kv_heads"], tp)
        per_layer_token = 2 * heads * model["head_dim"] * element
        kv.bytes_per_token_expected = held_layers * per_layer_token
        if tp > 1:
            # under pipeline parallelism too, the tp ranks are one stage's: the pipeline note gives the whole
            workers, whole = (
                (f"its pipeline stage's {tp} workers", "a stage")
                if pipeline_size(info) > 1
                else (f"the {tp} workers", "in all")
            )
            notes.insert(
                0,
                f"tensor parallel {tp}: the KV figures are one worker's (engine.json describes the first), "
                f"holding {heads} of the model's {model['num_kv_heads']} KV heads; each of {workers} "
                f"holds a pool of this size, {human_bytes(pool * tp)} {whole}",
            )
    staged = pipeline_note(info, pool)
    if staged is not None:
        notes.insert(0, staged)
    if layers:
        held = 0 if freed else 1  # a freed pool's layers hold nothing at the end
        kv.per_layer = [
            LayerSummary(
                layer,
                k_bytes * held,
                v_bytes * held,
                0,
                capacity,
                cache=pool_cache,
                k_tokens=capacity,
                v_tokens=capacity,
            )
            for layer, k_bytes, v_bytes in layers
        ]
    return notes


def _cache_groups(info: EngineInfo) -> tuple[int, int, int]:
    """(groups, layers a group, padding layers) of vLLM's KV cache groups; (1, 1, 0) for one attention type
    and other engines. A hybrid model's groups (Gemma 2: 2, sliding and full) share the pool's block ids, so
    a token of a request holds a block's slot in each, and the pool holds its slots' tokens over the groups.
    A drafter's layers join them: with a 1-layer draft model, 3 groups of 2 pages, one page no layer fills."""
    if info.name != "vllm":
        return 1, 1, 0
    from analyzers.planning.vllm_specs import engine_kv_groups

    groups, _ = engine_kv_groups(info.model, info.config)
    count = max(groups.full_groups + groups.sliding_groups, 1)
    if count == 1:
        return 1, 1, 0
    return count, groups.layers_per_group, groups.padding_layers


def _pool_layers(info: EngineInfo) -> list[tuple[int, int, int]]:
    """(layer, K bytes, V bytes) of each of the pool's layer views (none when engine.json has no sizes)."""
    layers = [layer for layer in info.layers if isinstance(layer.get("bytes"), int)]
    head_dim = info.model.get("head_dim") if isinstance(info.model.get("head_dim"), int) else None
    return [
        (int(layer.get("layer", i)), *_k_and_v(layer, info.num_blocks, head_dim))
        for i, layer in enumerate(layers)
    ]


def _caches_as_pool(kv: Any, pool: int, capacity: int, pool_cache: int) -> None:
    """The per-cache figures of a paged pool: the KV log's shape[0] is the pool's blocks, not a batch, so its
    cache has no rows and holds the pool's bytes over its capacity; another cache (a plain generate() in the
    same block) keeps its own figures. A pool the log saw freed holds 0 at the end."""
    for cache in kv.caches:
        if cache.cache != pool_cache:
            continue
        cache.rows = None
        cache.final_bytes, cache.tokens = (pool if cache.final_bytes else 0), capacity
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
    weights, buffers = _loaded_with_model(info)
    if (weights or buffers) and not any(c.get("weights") for c in at_peak):
        own = (
            f" and vLLM's own buffers ({human_bytes(buffers)}: the rotary cos/sin cache, attention scales, "
            "packed copies of weights it also keeps)"
            if buffers
            else ""
        )
        drafter = _drafter_weights(info, weights)
        # under pipeline parallelism engine.json's weights are the first stage's worker's, as its pool; under
        # tensor parallelism the first rank's share
        tp = info.config.get("tensor_parallel_size")
        split = isinstance(tp, int) and not isinstance(tp, bool) and tp > 1
        stage = "the first pipeline stage's " if pipeline_size(info) > 1 else ""
        if split:
            whose = f"{stage or 'the '}first worker's share of the weights"
        else:
            whose = f"{stage}weights" if stage else "the model's weights"
        notes.append(
            f"{whose} ({human_bytes(weights)}, engine.json{drafter}){own} were loaded before the trace "
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
