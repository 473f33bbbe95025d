"""vLLM: record the paged KV pool of a V1 engine, its steps, its requests, preemptions and prefix evictions.

vLLM allocates the KV cache once, as one storage cut into fixed-size blocks, and gives each attention layer a
view of it. What kvtrace needs is spread over its objects, read here (vLLM 0.32; docs/vllm.md says which
figure comes from a public interface and which from an internal one):

- the pool: `KVCacheConfig` (public config object) and the model runner's per-layer KV tensors;
- per step: the `EngineCoreOutputs.scheduler_stats` a step returns (what vLLM's stat loggers read),
  the `SchedulerOutput` of `Scheduler.schedule()` (wrapped), and the block pool's free queue;
- per request: `Scheduler._preempt_request` (wrapped: blocks and tokens held just before the drop) and
  the coordinator's `req_to_blocks`;
- prefix-cache evictions: `BlockPool._maybe_evict_cached_block` (wrapped, counts True returns);
- a refused start: `kv_cache_utils._check_enough_kv_cache_memory` (wrapped: the exact bytes vLLM compared),
  and on CPU `CPUWorker.determine_available_memory` (kvtrace.integrations.vllm_node_refusal: a pool asked
  that the memory node cannot hold).

Every wrapper is an instance (or module) attribute set on install and removed on uninstall, in `finally`.
This module imports vllm only when a vLLM object is handed to it or vllm is already imported.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvtrace import format as fmt
from kvtrace.geometry import kv_heads_of
from kvtrace.integrations.vllm_stages import checkpoint_params, pipeline_stages
from kvtrace.integrations.vllm_weights import drafter_model, weight_facts
from kvtrace.json_writes import write_json_atomic

VLLM_CACHE_ID = fmt.VLLM_CACHE_ID  # the `cache` id of the pool's KV events
_REFUSED_PREFIX = "To serve at least one request with the model's max seq len"
_CHECK_MODULE = "vllm.v1.core.kv_cache_utils"
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def is_vllm_object(obj: Any) -> bool:
    """True for an object of a vllm class (LLM, LLMEngine), decided without importing vllm."""
    return obj is not None and type(obj).__module__.split(".")[0] == "vllm"


def engine_core_of(llm: Any) -> Any:
    """The in-process `EngineCore` of an `LLM` or `LLMEngine`; a one-line error for a multiprocess one, or
    for a vLLM object that is no engine (its torch model, SamplingParams)."""
    from kvtrace.errors import KvtraceError

    engine = getattr(llm, "llm_engine", llm)
    client = getattr(engine, "engine_core", None)
    if client is None:
        raise KvtraceError(
            f"record(model=...): a vllm.LLM (or LLMEngine) is needed, got vLLM's {type(llm).__name__}; "
            "pass the LLM whose generate() runs inside the block"
        )
    core = getattr(client, "engine_core", None)
    if core is None or not hasattr(core, "scheduler"):
        raise KvtraceError(
            f"record(model=...): the vLLM engine of {type(llm).__name__} runs in another process "
            f"({type(client).__name__}); set VLLM_ENABLE_V1_MULTIPROCESSING=0 before creating it, or record "
            "a multiprocess engine with the kvtrace plugin: KVTRACE_DIR=<dir> in its environment"
        )
    return core


def _vllm_version() -> str:
    with contextlib.suppress(Exception):
        import vllm

        return str(vllm.__version__)
    return "unknown"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def config_facts(vllm_config: Any) -> dict[str, Any]:
    """The knobs that size the pool, as the user set them (engine.json `config`)."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    sched, parallel = vllm_config.scheduler_config, vllm_config.parallel_config
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", None)
    return {
        "max_model_len": model.max_model_len,
        "max_num_seqs": sched.max_num_seqs,
        "max_num_batched_tokens": sched.max_num_batched_tokens,
        "block_size": cache.block_size,
        "gpu_memory_utilization": cache.gpu_memory_utilization,
        "kv_cache_memory_bytes": getattr(cache, "kv_cache_memory_bytes", None),
        "num_gpu_blocks_override": getattr(cache, "num_gpu_blocks_override", None),
        "kv_cache_dtype": cache.cache_dtype,
        "enable_prefix_caching": bool(cache.enable_prefix_caching),
        "tensor_parallel_size": parallel.tensor_parallel_size,
        "pipeline_parallel_size": parallel.pipeline_parallel_size,
        "device": str(device) if device is not None else None,
        # two batches in flight when on: what a sliding layer holds beyond its window (vllm_specs)
        "async_scheduling": getattr(sched, "async_scheduling", None),
        "fp8_kv_refused": _fp8_kv_refusal(vllm_config) if str(device) == "cpu" else None,
        **_speculative_facts(vllm_config),
    }


def _speculative_facts(vllm_config: Any) -> dict[str, Any]:
    """Speculative decoding, where on: its method, the draft tokens a step may propose (each takes a KV slot
    when scheduled) and the slots reserved past them for a drafter's own KV; `{}` when off, or where this
    vLLM names them otherwise."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return {}
    facts: dict[str, Any] = {"speculative_method": getattr(spec, "method", None)}
    with contextlib.suppress(Exception):
        facts["num_speculative_tokens"] = int(vllm_config.num_speculative_tokens)
    with contextlib.suppress(Exception):
        facts["num_lookahead_tokens"] = int(vllm_config.num_lookahead_tokens)
    return facts


def _fp8_kv_refusal(vllm_config: Any) -> str | None:
    """vLLM's CPU build refuses an fp8 KV cache on an x86 CPU without AVX-512 or AMX, or with a head size
    that is no multiple of 32: its own check's message for this model on this host, so `kvtrace diagnose`
    offers fp8 only where vLLM would start with it. None where it would, or where the check is not found
    (another vLLM version)."""
    model, cache = vllm_config.model_config, vllm_config.cache_config
    try:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        _get_attn_isa(model.dtype, cache.block_size, model.get_head_size(), "fp8")
    except NotImplementedError as refused:
        return str(refused)
    except Exception:  # a private check of one vLLM version: absent or changed in others
        return None
    return None


def _total_kv_heads(model_config: Any, text: Any, heads: Any) -> Any:
    """The model's KV heads as vLLM sizes its cache (all ranks together). vLLM's own reading of the config
    knows the layouts that have no `num_key_value_heads`: Falcon's multi-query (one KV head whatever
    `num_kv_heads` says) and its new decoder architecture (`num_kv_heads`), ChatGLM, DBRX. kvtrace's own
    reading of the HF config only where vLLM's model config has no answer."""
    with contextlib.suppress(Exception):
        return int(model_config.get_total_num_kv_heads())
    return kv_heads_of(lambda name: getattr(text, name, None), heads)


def _sliding_facts(vllm_config: Any, text: Any) -> dict[str, Any]:
    """The window and how many attention layers keep only it, as vLLM built them: its attention layers'
    own `sliding_window` (the static forward context, where the model lives in this process), else the
    config's `layer_types`; `sliding_layers` None: not known (every layer, if there is a window)."""
    window: Any = None
    with contextlib.suppress(Exception):
        window = vllm_config.model_config.get_sliding_window()
    sliding: int | None = None
    with contextlib.suppress(Exception):
        context = vllm_config.compilation_config.static_forward_context
        layers = [m for m in context.values() if hasattr(m, "sliding_window") and hasattr(m, "attn_type")]
        if layers:
            windows = [m.sliding_window for m in layers if m.sliding_window is not None]
            sliding, window = len(windows), (windows[0] if windows else None)
    if sliding is None and window is not None:
        kinds = getattr(text, "layer_types", None)
        if isinstance(kinds, list | tuple):
            sliding = sum(1 for kind in kinds if kind == "sliding_attention")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        window, sliding = None, 0 if sliding is not None else None
    return {"sliding_window": window, "sliding_layers": sliding}


def model_facts(vllm_config: Any) -> dict[str, Any]:
    hf = vllm_config.model_config.hf_config
    text = getattr(hf, "get_text_config", lambda: hf)()
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden and heads else None)
    architectures = getattr(hf, "architectures", None) or [None]
    return {
        "class": architectures[0],  # the HF class the checkpoint names (the manifest's `model.class`)
        "model_type": getattr(hf, "model_type", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "num_kv_heads": _total_kv_heads(vllm_config.model_config, text, heads),
        "head_dim": head_dim,
        "dtype": _dtype_name(vllm_config.model_config.dtype),
        "num_attention_heads": heads,
        "hidden_size": hidden,
        "vocab_size": getattr(text, "vocab_size", None),
        "intermediate_size": getattr(text, "intermediate_size", None),  # for plan --from-run's weights
        "tie_word_embeddings": bool(getattr(text, "tie_word_embeddings", False)),
        **_sliding_facts(vllm_config, text),
        "layer_types": _layer_types(text),
        "num_params": None,
    }


def _layer_types(text: Any) -> list[str] | None:
    """The config's `layer_types` ("sliding_attention", "full_attention", ... one a decoder layer): which
    layers vLLM groups together, on which pipeline stage; None where the config gives none."""
    kinds = getattr(text, "layer_types", None)
    if isinstance(kinds, list | tuple) and all(isinstance(kind, str) for kind in kinds):
        return list(kinds)
    return None


def _driver_worker(core: Any) -> Any:
    """The worker object when it lives in this process (UniProcExecutor), else None."""
    return getattr(core.model_executor, "driver_worker", None)


def _tensor_facts(tensor: Any) -> dict[str, Any]:
    storage = tensor.untyped_storage()
    addr = storage.data_ptr()
    return {
        "shape": list(tensor.shape),
        "dtype": _dtype_name(tensor.dtype),
        "bytes": tensor.numel() * tensor.element_size(),
        "storage_addr": addr,
        "storage_bytes": storage.nbytes(),
        "view_offset": tensor.data_ptr() - addr,
        "device": str(tensor.device),
    }


def worker_kv_facts(worker: Any, names: list[str], num_blocks: int, head_size: int) -> dict[str, Any]:
    """Runs where the KV tensors are (in this process, or in a worker through vLLM's public
    `collective_rpc`): each layer's KV tensor and its K and V views, as plain facts; weights too."""
    inner = getattr(worker, "worker", None) or worker
    runner = getattr(inner, "model_runner", None)
    if runner is None:
        return {"layers": {}}
    own = getattr(runner, "kv_cache_config", None)
    if own is not None:  # a pipeline stage's worker holds its own layers, not the scheduler's (the first's)
        names = [name for t in own.kv_cache_tensors for name in t.layers] or names
    context = runner.vllm_config.compilation_config.static_forward_context
    tensors: dict[str, Any] = {}
    for name in names:
        cache = getattr(context.get(name), "kv_cache", None)
        if isinstance(cache, (list, tuple)):
            cache = cache[0] if cache else None
        if cache is not None and hasattr(cache, "untyped_storage") and cache.numel():
            tensors[name] = cache
    if not tensors:  # fall back to the runner's list, in the config's layer order
        listed = list(getattr(runner, "kv_caches", []) or [])
        if len(listed) == len(names):
            tensors = dict(zip(names, listed, strict=True))
    layers: dict[str, Any] = {}
    for name, tensor in tensors.items():
        facts = _tensor_facts(tensor)
        k, v = split_kv(tensor, num_blocks, head_size)
        facts["parts"] = {"k": _tensor_facts(k)} | ({"v": _tensor_facts(v)} if v is not None else {})
        layers[name] = facts
    result: dict[str, Any] = {
        "layers": layers,
        "draft_layers": drafter_layer_names(runner),
        "num_params": None,
        "weights_bytes": None,
        "buffers_bytes": None,
        "draft_weights_bytes": None,
    }
    with contextlib.suppress(Exception):
        # on CPU the linear weights are held by each layer's `cpu_linear`, not its parameters (vllm_weights);
        # a drafter's model is held beside the target's, on the same worker
        result.update(weight_facts(runner.get_model(), drafter_model(runner)))
    return result


def drafter_layer_names(runner: Any) -> list[str] | None:
    """The attention layers of a speculative drafter (a draft model, an EAGLE or MTP head), which keep their
    KV in the target's pool, in its blocks: vLLM's own list (the forward context's layers less the target's,
    `SpecDecodeBaseProposer._draft_attn_layer_names`, private). [] without a drafter, or with one that keeps
    no KV (n-gram); None where this vLLM does not say."""
    drafter = getattr(runner, "drafter", None)
    if drafter is None:
        return []
    names = getattr(drafter, "_draft_attn_layer_names", None)
    if names is None:
        return [] if not hasattr(drafter, "model") else None
    return sorted(str(name) for name in names)


def split_kv(tensor: Any, num_blocks: int, head_size: int) -> tuple[Any, Any]:
    """K and V views of one layer's KV tensor, whatever the layout: a leading dimension of 2 (GPU
    backends' (2, blocks, ...)), a dimension of 2 right after the blocks ((blocks, 2, block, heads, dim)),
    or K and V side by side in the channels (CPU LBHNC: (blocks, heads, block, 2 x head_size)).
    (tensor, None) when none applies."""
    shape = tuple(tensor.shape)
    if len(shape) >= 2 and shape[0] == 2 and shape[1] == num_blocks:
        return tensor[0], tensor[1]
    if shape and shape[-1] == 2 * head_size:
        return tensor[..., :head_size], tensor[..., head_size:]
    if len(shape) >= 4 and shape[0] == num_blocks and shape[1] == 2:
        return tensor[:, 0], tensor[:, 1]
    return tensor, None


def gather_kv_facts(core: Any, kv_cache_config: Any) -> tuple[list[dict[str, Any]], str]:
    """The KV facts of every worker, the first one's first: called here when the worker is in this process,
    through `collective_rpc` when they are in others. ([], reason) when neither works."""
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if groups else None
    names = [name for t in kv_cache_config.kv_cache_tensors for name in t.layers]
    args = (names, kv_cache_config.num_blocks, getattr(spec, "head_size", 0))
    driver = _driver_worker(core)
    try:
        if driver is not None:
            return [worker_kv_facts(driver, *args)], "kv_tensors"
        return list(core.collective_rpc(worker_kv_facts, args=args) or []), "kv_tensors_rpc"
    except Exception as exc:  # the figures from the config remain
        return [], f"kv_cache_config ({type(exc).__name__}: {exc})"[:300]


def allocation_bytes(kv_cache_tensors: Any) -> int:
    """The bytes vLLM allocates for its `KVCacheTensor`s. Since vLLM placed every tensor in one backing
    allocation (they carry `layer_stride`), each one's `size` is that whole allocation: a hybrid model's cache
    groups overlay it, so summing them counted it once per group (2x for Gemma 2, 6x for Gemma 3). Older
    tensors (`shared_by`) were allocations of their own, which add up."""
    tensors = list(kv_cache_tensors)
    if tensors and all(hasattr(t, "layer_stride") for t in tensors):
        return max(int(t.size) for t in tensors)
    return sum(int(t.size) for t in tensors)


def layer_index(name: str, position: int) -> int:
    """The decoder layer a KV layer's name numbers (`model.layers.12.self_attn.attn`), else its position."""
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else position


def _layer_numbers(names: list[str], draft_layers: Any) -> dict[int, str]:
    """Each pool layer's number: a target layer's its own index (`model.layers.3` is 3), a drafter's after
    the target's (`draft_model.model.layers.0` of a 4-layer target is 4). vLLM lists the layers group by
    group, so in a hybrid model's pool the target's come out of order (0, 2, 1, 3): numbering a repeated
    index after those seen so far gave the drafter a target layer's number, and that layer another's.
    `draft_layers`: the worker's list of the drafter's layers (None: names under `draft_model.`)."""
    drafted = set(draft_layers) if isinstance(draft_layers, list) else None
    numbers: dict[int, str] = {}
    later: list[tuple[int, str]] = []
    for position, name in enumerate(names):
        index = layer_index(name, position)
        is_drafter = name in drafted if drafted is not None else name.startswith("draft_model.")
        if is_drafter or index in numbers:
            later.append((index, name))  # numbered once the target's layers all have theirs
        else:
            numbers[index] = name
    for _, name in sorted(later):
        numbers[max(numbers, default=-1) + 1] = name
    return numbers


def pool_facts(kv_cache_config: Any, worker_facts: dict[str, Any], source: str) -> dict[str, Any]:
    """engine.json's pool fields from the KV cache config and the worker's tensors (storage counted once)."""
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if groups else None
    configured_bytes = allocation_bytes(kv_cache_config.kv_cache_tensors)
    tensors = worker_facts.get("layers", {})
    layers: list[dict[str, Any]] = []
    storages: dict[int, dict[str, Any]] = {}
    names = [name for t in kv_cache_config.kv_cache_tensors for name in t.layers]
    for index, name in sorted(_layer_numbers(names, worker_facts.get("draft_layers")).items()):
        entry: dict[str, Any] = {"layer": index, "name": name}
        facts = tensors.get(name)
        if facts is not None:
            addr = facts["storage_addr"]
            storage = {"addr": addr, "bytes": facts["storage_bytes"], "device": facts["device"]}
            storages.setdefault(addr, storage)
            entry.update({k: facts[k] for k in ("shape", "dtype", "bytes", "storage_addr", "view_offset")})
        layers.append(entry)
    num_blocks = kv_cache_config.num_blocks
    return {
        "num_blocks": num_blocks,
        "block_size": getattr(spec, "block_size", None),
        # what one block id costs: the same id is a block of every cache group, all in the one allocation
        "bytes_per_block": configured_bytes // num_blocks if num_blocks else 0,
        "kv_cache_bytes": sum(s["bytes"] for s in storages.values()) if storages else configured_bytes,
        "configured_kv_cache_bytes": configured_bytes,
        "kv_dtype": _dtype_name(getattr(spec, "dtype", "")),
        "layout": kv_cache_config.kv_cache_layout,
        "layers": layers,
        "storage": list(storages.values()),
        "pool_source": source if storages else "kv_cache_config",
    }


def engine_document(core: Any, kv_cache_config: Any, process: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """engine.json for a started engine (its pool and weights the first worker's; under pipeline parallelism
    each stage's share too), and the first worker's KV facts it was built from."""
    workers, source = gather_kv_facts(core, kv_cache_config)
    worker_facts = workers[0] if workers else {}
    pool = pool_facts(kv_cache_config, worker_facts, source)
    if pool["layout"] is None:
        pool["layout"] = core.vllm_config.cache_config.kv_cache_layout
    model = model_facts(core.vllm_config)
    model["num_params"] = checkpoint_params(workers)
    model["draft_kv_layers"] = _draft_kv_layers(kv_cache_config, worker_facts.get("draft_layers"))
    available = getattr(core, "available_gpu_memory_for_kv_cache", -1)
    document: dict[str, Any] = {
        "name": "vllm",
        "version": _vllm_version(),
        "status": "ok",
        "process": process,
        "model": model,
        "config": config_facts(core.vllm_config),
        **pool,
        "memory_profile": {
            "weights_bytes": worker_facts.get("weights_bytes"),
            "buffers_bytes": worker_facts.get("buffers_bytes"),  # vLLM's own: rotary cache, packed copies
            # of the weights above, a speculative drafter's own (0 without one)
            "draft_weights_bytes": worker_facts.get("draft_weights_bytes"),
            "activation_peak_bytes": None,
            "non_torch_bytes": None,
            "total_device_bytes": None,
            "available_kv_bytes": available if available and available > 0 else None,
        },
        "refused": None,
    }
    if core.vllm_config.parallel_config.pipeline_parallel_size > 1:
        document["pipeline_stages"] = pipeline_stages(workers, layer_index)
    return document, worker_facts


def _draft_kv_layers(kv_cache_config: Any, draft_layers: Any) -> int | None:
    """How many of the pool's layers are a speculative drafter's (each a page of every block, as a target
    layer's): 0 without one; None where the worker did not say (its facts unread, another vLLM)."""
    if not isinstance(draft_layers, list):
        return None
    drafted = set(draft_layers)
    return sum(1 for t in kv_cache_config.kv_cache_tensors for name in t.layers if name in drafted)


# -- a refused start ---------------------------------------------------------------------------------------
def parse_refusal(message: str) -> dict[str, Any] | None:
    """max_model_len and vLLM's estimate from its refusal message (the GiB figures are rounded: not kept)."""
    if _REFUSED_PREFIX not in message:
        return None
    wanted = re.search(r"max seq len \((\d+)\)", message)
    estimate = re.search(r"estimated maximum model length is (\d+)", message)
    return {
        "message": message,
        "max_model_len": int(wanted.group(1)) if wanted else None,
        "needed_bytes": None,
        "available_bytes": None,
        "estimated_max_model_len": int(estimate.group(1)) if estimate else 0,
    }


def write_refused(path: Path, process: str, refused: dict[str, Any], vllm_config: Any = None) -> None:
    document: dict[str, Any] = {
        "name": "vllm",
        "version": _vllm_version(),
        "status": "refused_start",
        "process": process,
        "model": model_facts(vllm_config) if vllm_config is not None else None,
        "config": config_facts(vllm_config) if vllm_config is not None else None,
        "num_blocks": 0,
        "block_size": vllm_config.cache_config.block_size if vllm_config is not None else None,
        "bytes_per_block": refused.pop("bytes_per_block", None),
        "kv_cache_bytes": 0,
        "kv_dtype": None,
        "layout": None,
        "layers": [],
        "storage": [],
        "memory_profile": {"available_kv_bytes": refused.get("available_bytes")},
        "refused": refused,
    }
    write_json_atomic(path / fmt.ENGINE, document)


class RefusalWatch:
    """Catches vLLM's KV-memory check while installed: on a refusal, `on_refused(refused, vllm_config)` gets
    the exact bytes vLLM compared (needed for max_model_len, available after the null block) and its own
    estimate of the largest max_model_len, computed by vLLM's function before the error is raised.

    vllm is patched only if it is imported already, or when it gets imported (a `sys.meta_path` finder
    that waits for `vllm.v1.core.kv_cache_utils`); the finder is removed on uninstall."""

    def __init__(self, on_refused: Callable[[dict[str, Any], Any], None]) -> None:
        self._on_refused = on_refused
        self._module: Any = None
        self._original: Any = None
        self._finder: _AfterImport | None = None
        self._bound = self._wrapper  # one bound method, so that uninstall can recognise it
        from kvtrace.integrations.vllm_node_refusal import NodeMemoryWatch

        self._node = NodeMemoryWatch(on_refused)  # on CPU, the pool asked more than the memory node has

    def install(self) -> None:
        self._node.install()
        module = sys.modules.get(_CHECK_MODULE)
        if module is not None:
            self._patch(module)
        else:
            self._finder = _AfterImport(_CHECK_MODULE, self._patch)
            sys.meta_path.insert(0, self._finder)

    def uninstall(self) -> None:
        if self._finder is not None:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self._finder)
            self._finder = None
        if self._module is not None:
            if self._module._check_enough_kv_cache_memory is self._bound:
                self._module._check_enough_kv_cache_memory = self._original
            self._module = None
        self._node.uninstall()

    def _patch(self, module: Any) -> None:
        if self._module is not None:
            return
        self._module, self._original = module, module._check_enough_kv_cache_memory
        module._check_enough_kv_cache_memory = self._bound

    def _wrapper(
        self, available_memory: int, get_needed_memory: Any, max_model_len: int, estimate: Any
    ) -> None:
        try:
            self._original(available_memory, get_needed_memory, max_model_len, estimate)
        except ValueError as exc:
            vllm_config = (getattr(get_needed_memory, "args", None) or (None,))[0]
            refused = parse_refusal(str(exc)) or {"message": str(exc)}
            refused["max_model_len"] = max_model_len
            refused["available_bytes"] = int(available_memory)
            with contextlib.suppress(Exception):
                refused["needed_bytes"] = int(get_needed_memory())
            with contextlib.suppress(Exception):
                refused["estimated_max_model_len"] = int(estimate(available_memory))
            with contextlib.suppress(Exception):
                refused["bytes_per_block"] = _refused_block_bytes(self._module, *get_needed_memory.args[:2])
            with contextlib.suppress(Exception):
                self._on_refused(refused, vllm_config)
            raise


def _refused_block_bytes(module: Any, vllm_config: Any, groups: Any) -> int:
    """One block of the pool vLLM would have made: vLLM's own divisor where it has one, else the largest
    group's pages (cache groups share a block id, so their pages are not added up)."""
    pool_block = getattr(module, "_pool_bytes_per_block", None)
    if pool_block is not None:
        return int(pool_block(vllm_config, groups))
    return max(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in groups)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` right after `name` is imported; finds nothing itself."""

    def __init__(self, name: str, callback: Callable[[Any], None]) -> None:
        self._name = name
        self._callback = callback
        self._busy = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self._name or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        loader, callback = spec.loader, self._callback

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                callback(module)

        spec.loader = _Loader()
        return spec


def after_import(name: str, callback: Callable[[Any], None]) -> _AfterImport | None:
    """`callback(module)` now if `name` is imported, else once it is; the finder to remove, if any."""
    module = sys.modules.get(name)
    if module is not None:
        callback(module)
        return None
    finder = _AfterImport(name, callback)
    sys.meta_path.insert(0, finder)
    return finder
