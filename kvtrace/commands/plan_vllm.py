"""`kvtrace plan --engine vllm`: reads the flags (or a recorded run's measured memory and settings) into a
`VllmPlanRequest`; the arithmetic lives in `analyzers.planning.vllm_plan`.

Precedence, for every setting: a flag the user typed, then the recorded run's own value, then the flag's
default. The flags default to None so that a typed value equal to the default (--block-size 16) still wins.
A run's num_gpu_blocks_override is kept as any other setting (vLLM sized that pool by it, whatever the
memory); `--num-gpu-blocks-override 0` plans without it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvtrace.commands.base import gpu_memory_flag, require_input
from kvtrace.commands.output import print_result
from kvtrace.commands.plan_flags import refuse_transformers_flags
from kvtrace.errors import KvtraceError, UsageError

if TYPE_CHECKING:
    from analyzers.planning.presets import ModelGeometry

_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "half": "fp16", "float": "fp32"}


def _kv_cache_memory_flag(args: argparse.Namespace) -> str:
    """The name of the KV memory flag as typed: --kv-cache-memory, or vLLM's --kv-cache-memory-bytes."""
    return getattr(args, "kv_cache_memory_flag", None) or "--kv-cache-memory"


def _size(text: str | None, flag: str) -> int | None:
    from analyzers.planning.size_text import parse_size

    return None if text is None else parse_size(text, flag)


def _positive(value: Any) -> int | None:
    """A positive int from engine.json, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _count(value: Any) -> int | None:
    """A count (0 or more) from engine.json, else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _from_run(path: str) -> tuple[dict[str, Any], Any]:
    """(memory figures and settings, geometry or None) from a recorded vLLM run's engine.json."""
    from analyzers.engine import draft_kv_layers
    from analyzers.engine_stages import pipeline_size, recorded_stages, worker_kv_layers
    from analyzers.planning.engine_run_refusal import not_a_vllm_pool
    from analyzers.planning.presets import ModelGeometry
    from analyzers.readers.engine_files import read_engine

    require_input(Path(path))  # a path mistyped is said as every command says it, not as a run's lack
    run = read_engine(Path(path))
    if run is None:
        raise KvtraceError(f"{path}: not a vLLM run (no engine.json)")
    refusal = not_a_vllm_pool(Path(path), run.info)  # transformers' continuous batching: not vLLM's rules
    if refusal is not None:
        raise KvtraceError(refusal)
    profile, model, config = run.info.memory_profile, run.info.model, run.info.config
    refused = run.info.refused or {}
    figures = {
        "weights_bytes": profile.get("weights_bytes"),
        "buffers_bytes": profile.get("buffers_bytes"),  # null in runs recorded before kvtrace kept it apart
        # a speculative drafter's share of weights_bytes; null in runs recorded before kvtrace counted it
        "draft_weights_bytes": profile.get("draft_weights_bytes"),
        "activation_peak_bytes": profile.get("activation_peak_bytes"),
        "non_torch_bytes": profile.get("non_torch_bytes"),
        "gpu_memory_bytes": profile.get("total_device_bytes"),
        "model_dtype": _DTYPES.get(str(model.get("dtype")), "bf16"),
        "device": config.get("device"),
        "block_size": config.get("block_size") or run.info.block_size,
        "max_model_len": config.get("max_model_len"),
        "kv_cache_dtype": config.get("kv_cache_dtype"),
        "gpu_memory_utilization": config.get("gpu_memory_utilization"),
        "tensor_parallel_size": config.get("tensor_parallel_size"),
        # what the run configured: a refused start allocated nothing, yet vLLM sized its check by this
        "kv_cache_memory_bytes": config.get("kv_cache_memory_bytes"),
        "model": model,
        "config": config,
        "status": run.info.status,
        # vLLM's pool is this many blocks whatever the memory: the figures it logged at start came from it
        "num_gpu_blocks_override": config.get("num_gpu_blocks_override"),
        "kv_cache_bytes": run.info.kv_cache_bytes,
        # the KV memory vLLM measured (on CPU, the node's free memory or VLLM_CPU_KVCACHE_SPACE), before an
        # override, if any, replaced it with its blocks' bytes
        "available_kv_bytes": _positive(profile.get("available_kv_bytes")),
        # what a sliding layer holds beyond its window: the batches in flight (recorded since kvtrace kept
        # async_scheduling; before, vLLM's default: off on CPU, on elsewhere)
        "max_num_batched_tokens": config.get("max_num_batched_tokens"),
        "async_scheduling": config.get("async_scheduling"),
        # a start vLLM's CPU worker refused for its memory node: what it asked and what the node had free
        "node_refusal": refused if refused.get("kind") == "node_memory" else None,
        "pipeline_parallel_size": pipeline_size(run.info),
    }
    staged = recorded_stages(run.info)  # each stage's layers and weights: every stage's worker planned
    if staged is not None and _hybrid(model) and _layer_slides(model) is None:
        staged = None  # its groups on a stage depend on which layers slide, not recorded: the first worker's
    if staged is not None:
        figures["pp_layer_partition"] = tuple(len(layers) for layers, _ in staged)
        weights = [held for _, held in staged]
        if all(held is not None for held in weights):
            figures["stage_weights_bytes"] = tuple(weights)
    geometry = None
    try:
        geometry = ModelGeometry(
            name=str(model.get("name") or Path(path).name),
            # a speculative drafter's layers (a draft model's, an EAGLE head's) are a page of every block too;
            # under pipeline parallelism the first stage's worker, whose pool engine.json describes, holds
            # the KV of its own layers only
            num_layers=(
                int(model["num_layers"])
                if staged is not None
                else worker_kv_layers(run.info) or int(model["num_layers"]) + draft_kv_layers(model)
            ),
            num_attention_heads=int(model.get("num_attention_heads") or model["num_kv_heads"]),
            num_kv_heads=int(model["num_kv_heads"]),
            head_dim=int(model["head_dim"]),
            hidden_size=int(model.get("hidden_size") or 0),
            intermediate_size=int(model.get("intermediate_size") or 0),
            vocab_size=int(model.get("vocab_size") or 0),
            tie_word_embeddings=bool(model.get("tie_word_embeddings", False)),
            sliding_window=_positive(model.get("sliding_window")),
            sliding_layers=_count(model.get("sliding_layers")),
            layer_slides=_layer_slides(model),
        )
    except (KeyError, TypeError, ValueError):
        geometry = None
    return figures, geometry


def _hybrid(model: dict[str, Any]) -> bool:
    """Whether engine.json's model has sliding and full attention layers both."""
    sliding, layers = _count(model.get("sliding_layers")), _count(model.get("num_layers"))
    return (
        _positive(model.get("sliding_window")) is not None
        and sliding is not None
        and 0 < sliding < (layers or 0)
    )


def _layer_slides(model: dict[str, Any]) -> tuple[bool, ...] | None:
    """Which decoder layers slide, from engine.json's `model.layer_types` (runs since kvtrace kept it),
    where every layer is sliding or full attention and as many as the sliding layers recorded say."""
    kinds = model.get("layer_types")
    if not isinstance(kinds, list) or len(kinds) != model.get("num_layers"):
        return None
    if not all(kind in ("sliding_attention", "full_attention") for kind in kinds):  # == on any JSON value
        return None
    slides = tuple(kind == "sliding_attention" for kind in kinds)
    return slides if sum(slides) == model.get("sliding_layers") else None


def _pipeline_settings(
    args: argparse.Namespace, measured: dict[str, Any], layers: int, run_geometry: bool
) -> tuple[int, tuple[int, ...] | None, tuple[int, ...] | None, bool]:
    """(pipeline stages, each stage's layers, each stage's measured weights, whether the run is planned by
    its first stage's worker alone). A run's split and its stages' weights hold while the plan keeps its
    stages; a size or split typed drops them (the weights are then computed, or --weights-bytes's), and a
    run recorded before kvtrace kept every stage's figures is its first stage's worker alone."""
    typed_split = _partition(args.pp_layer_partition)
    run_stages = int(measured.get("pipeline_parallel_size") or 1)
    stages = args.pipeline_parallel_size if args.pipeline_parallel_size is not None else run_stages
    if stages < 1:
        raise KvtraceError(f"--pipeline-parallel-size must be at least 1, got {stages}")
    if typed_split is not None and len(typed_split) != stages:
        raise KvtraceError(
            f"--pp-layer-partition {args.pp_layer_partition} gives {len(typed_split)} stages: add "
            f"--pipeline-parallel-size {len(typed_split)}"
        )
    recorded = measured.get("pp_layer_partition")
    if run_geometry and run_stages > 1 and recorded is None:
        if args.pipeline_parallel_size is not None or typed_split is not None:
            raise KvtraceError(
                f"{args.from_run}: its engine.json has the first pipeline stage's layers alone (recorded "
                "before kvtrace kept every stage's): add --config PATH (the model's config.json) to plan the "
                "stages"
            )
        return 1, None, None, True
    kept = stages == run_stages and typed_split in (None, recorded)
    split = typed_split or (recorded if kept else None)
    if typed_split is None and split is not None and (sum(split) != layers or min(split) < 1):
        model = "" if run_geometry else " (--preset/--config gives another model than the run's)"
        raise KvtraceError(
            f"{args.from_run}: its pipeline stages hold {','.join(map(str, split))} layers, not a split of "
            f"the {layers} layers planned{model}"
        )
    measured_weights = measured.get("stage_weights_bytes") if kept and args.weights_bytes is None else None
    return stages, split, measured_weights, False


def _partition(text: str | None) -> tuple[int, ...] | None:
    """--pp-layer-partition's layer counts, as vLLM reads VLLM_PP_LAYER_PARTITION ("27,27,26")."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise KvtraceError(
            f"--pp-layer-partition {text!r}: give each stage's layers, e.g. 27,27,26"
        ) from None


def _drafter_weights(typed: str | None, measured: dict[str, Any]) -> str:
    """What the plan's weights hold of a drafting run: the worker holds the drafter's weights beside the
    target's, and a run since kvtrace counted them says its share."""
    if typed is not None:
        return "weights: --weights-bytes"
    weights, drafter = measured.get("weights_bytes"), _count(measured.get("draft_weights_bytes"))
    if drafter is None or not isinstance(weights, int):
        return "weights: the target model's only, recorded before kvtrace counted the drafter's"
    return f"weights: the target's {weights - drafter:,} B and the drafter's {drafter:,} B"


def _max_model_len(
    args: argparse.Namespace, measured: dict[str, Any], geometry: ModelGeometry
) -> tuple[int, str | None]:
    """(max_model_len, the note saying it was vLLM's default, or None): --max-model-len, else --context
    (tokens per request, as for transformers' plan), else the recorded run's (what vLLM served it at),
    else vLLM's own default for the model: its whole length, as `vllm serve` without --max-model-len."""
    from analyzers.planning.vllm_defaults import default_len_note, default_max_model_len

    typed = args.max_model_len if args.max_model_len is not None else args.context
    if typed is not None:
        return typed, None
    if measured.get("max_model_len") is not None:
        return int(measured["max_model_len"]), None
    default = default_max_model_len(geometry)
    if default is None:  # a run's engine.json without the length, and no config to derive vLLM's from
        raise KvtraceError(
            f"{args.from_run}: its engine.json does not give max_model_len, nor the model's length from "
            "which vLLM derives its default: add --max-model-len N or --config PATH (the model's config.json)"
        )
    return default[0], default_len_note(*default)


# The flags of vLLM's memory profile (`available_kv_bytes`), which a pool sized by kv_cache_memory_bytes or
# num_gpu_blocks_override leaves out: (args attribute, flag)
_PROFILE_FLAGS = (
    ("weights_bytes", "--weights-bytes"),
    ("activation_peak", "--activation-peak"),
    ("non_torch", "--non-torch"),
    ("gpu_memory_utilization", "--gpu-memory-utilization"),
)


def _ignored_profile_note(
    args: argparse.Namespace,
    kv_cache_memory: int | None,
    override: int | None,
    stages: int,
    default_batched: int | None,
    gpu_memory: int,
) -> str | None:
    """The note on profile flags typed where kv_cache_memory_bytes sizes the pool: vLLM then profiles no
    memory for it, and neither does the plan, so they change nothing; said, not left to look as if they
    were taken. None where none was typed, or the profile sizes the pool. Under pipeline parallelism a
    typed --weights-bytes is each stage's weights in the stages' table, so not ignored. --gpu-memory still
    picks vLLM's default max_num_batched_tokens on a GPU (`default_batched`, None where it is typed, the
    run's, or a CPU's): then it is said to do only that, not to be ignored."""
    if kv_cache_memory is None:
        return None
    typed = [
        flag
        for name, flag in _PROFILE_FLAGS
        if getattr(args, name, None) is not None and not (name == "weights_bytes" and stages > 1)
    ]
    gpu_typed = getattr(args, "gpu_memory", None) is not None
    if gpu_typed and default_batched is None:
        typed.insert(0, "--gpu-memory")
    if not typed and not gpu_typed:
        return None
    from analyzers.planning.vllm_plan import readable_bytes

    whose = _kv_cache_memory_flag(args) if args.kv_cache_memory is not None else f"the run's, {args.from_run}"
    sized = (
        f"num_gpu_blocks_override={override} sizes the pool"
        if override is not None
        else f"kv_cache_memory_bytes ({readable_bytes(kv_cache_memory)}, {whose}) sizes the pool"
    )
    why = (
        f"{sized}, as it does in vLLM, which then takes no share of the memory by gpu_memory_utilization "
        "less the weights, activation peak and non-torch memory"
    )
    if default_batched is None or not gpu_typed:
        return f"{', '.join(typed)} ignored: {why}"
    picks = (
        f"picks only vLLM 0.32's default max_num_batched_tokens, {default_batched:,} on a GPU of "
        f"{readable_bytes(gpu_memory)} (--max-num-batched-tokens sets it)"
    )
    if typed:
        return f"{', '.join(typed)} ignored: {why}; --gpu-memory {picks}"
    return f"--gpu-memory does not size the pool: {why}; it {picks}"


# The flags a vLLM plan takes at their default where neither typed nor the run's: (args attribute, its key
# in `_from_run`'s figures). --max-model-len (or --context) is said apart: its default is the model's.
_DEFAULTED_FLAGS = (
    ("dtype", "model_dtype"),
    ("gpu_memory", "gpu_memory_bytes"),
    ("gpu_memory_utilization", "gpu_memory_utilization"),
    ("block_size", "block_size"),
    ("kv_cache_dtype", "kv_cache_dtype"),
    ("tensor_parallel_size", "tensor_parallel_size"),
    ("pipeline_parallel_size", "pipeline_parallel_size"),
    ("activation_peak", "activation_peak_bytes"),
    ("non_torch", "non_torch_bytes"),
    ("max_num_batched_tokens", "max_num_batched_tokens"),
    ("async_scheduling", "async_scheduling"),
)


def _defaults(args: argparse.Namespace, measured: dict[str, Any], length_defaulted: bool) -> tuple[str, ...]:
    """The flags left at their default: neither typed nor taken from the run (whose GPU memory or stage
    count of 0 is taken as none, as `run_vllm_plan` takes them)."""
    left = ["max_model_len"] if length_defaulted else []
    for name, key in _DEFAULTED_FLAGS:
        value = measured.get(key)
        from_run = bool(value) if key in ("gpu_memory_bytes", "pipeline_parallel_size") else value is not None
        if getattr(args, name, None) is None and not from_run:
            left.append(name)
    return tuple(left)


# vLLM's settings that are whole numbers of at least 1: (args attribute, flag); --context gives
# max_model_len under --engine vllm
_AT_LEAST_ONE = (
    ("max_model_len", "--max-model-len"),
    ("context", "--context"),
    ("block_size", "--block-size"),
    ("tensor_parallel_size", "--tensor-parallel-size"),
    ("max_num_batched_tokens", "--max-num-batched-tokens"),
)


def _refuse_sizes_below_one(args: argparse.Namespace) -> None:
    """A setting typed as 0 or less, refused naming the flag typed: the plan's own check names the setting
    ("max model length"), which --context, its other name here, does not say."""
    for name, flag in _AT_LEAST_ONE:
        value = getattr(args, name, None)
        if isinstance(value, int) and value < 1:
            raise KvtraceError(f"{flag} must be at least 1, got {value}")


def run_vllm_plan(args: argparse.Namespace) -> int:
    from analyzers.engine import draft_kv_layers
    from analyzers.planning.hf_config import geometry_from_config
    from analyzers.planning.presets import get_preset
    from analyzers.planning.size_text import parse_device_memory, parse_size
    from analyzers.planning.vllm_plan import GPU_MEMORY_UTILIZATION, VllmPlanRequest, plan_vllm
    from analyzers.render.vllm_plan import format_vllm_text, vllm_to_json

    # transformers-side flags that vLLM's arithmetic has its own names for: refused rather than ignored
    refuse_transformers_flags(args)
    _refuse_sizes_below_one(args)
    if args.kv_dtype is not None:
        raise KvtraceError("--kv-dtype does not apply with --engine vllm: use --kv-cache-dtype (auto or fp8)")
    if getattr(args, "prompt", None) is not None:
        raise KvtraceError(
            "--prompt does not apply with --engine vllm: vLLM checks one request of --max-model-len tokens"
        )
    if args.dtype not in (None, "bf16", "fp16", "fp32"):
        raise KvtraceError(
            f"--dtype {args.dtype} with --engine vllm: vLLM's plan takes bf16, fp16 or fp32 weights; for "
            "quantized weights give --weights-bytes (per GPU)"
        )
    measured: dict[str, Any] = {}
    run_geometry = None
    if args.from_run:
        measured, run_geometry = _from_run(args.from_run)
    if args.preset is not None:
        geometry = get_preset(args.preset)
    elif args.config is not None:
        geometry = geometry_from_config(args.config)
    elif run_geometry is not None:
        geometry = run_geometry
    else:
        raise UsageError("give a model: --preset NAME, --config PATH or --from-run RUN")

    def pick(flag: str | None, key: str, default: int | None, name: str) -> int | None:
        """The size typed after flag `name`, else the run's value, else the default."""
        if flag is not None:
            return _size(flag, name)
        value = measured.get(key)
        return int(value) if value is not None else default

    def setting(flag: Any, key: str, default: Any) -> Any:
        """The typed flag, else the run's value, else the default."""
        if flag is not None:
            return flag
        value = measured.get(key)
        return value if value is not None else default

    def pick_count(flag: int | None, key: str) -> int | None:
        """A count typed, else the run's, else None (vLLM's default)."""
        value = flag if flag is not None else measured.get(key)
        return int(value) if value is not None else None

    if args.gpu_memory is not None:
        from kvtrace.gpu_names import DRIVER_RESERVE_BYTES, named_gpu

        gpu_memory = parse_device_memory(args.gpu_memory, gpu_memory_flag(args))
        if named_gpu(args.gpu_memory) is not None:  # nvidia-smi's total: vLLM multiplies CUDA's, less
            gpu_memory -= DRIVER_RESERVE_BYTES
    else:  # the run's device, else an 80 GiB GPU
        gpu_memory = int(measured.get("gpu_memory_bytes") or parse_size("80GiB"))
    max_model_len, length_note = _max_model_len(args, measured, geometry)
    if args.batch is not None and args.batch < 1:
        raise KvtraceError(f"--batch must be at least 1, got {args.batch}")
    kv_cache_memory = _size(args.kv_cache_memory, _kv_cache_memory_flag(args))
    typed_override = getattr(args, "num_gpu_blocks_override", None)
    if typed_override is not None and typed_override < 0:
        raise KvtraceError(f"--num-gpu-blocks-override must be at least 0 (0: none), got {typed_override}")
    override = setting(typed_override, "num_gpu_blocks_override", None)
    override = int(override) if override else None  # 0 typed: plan without the run's override
    profiled = args.gpu_memory is not None or args.gpu_memory_utilization is not None
    node_refusal: dict[str, Any] = measured.get("node_refusal") or {}  # {} but for a node refusal
    if kv_cache_memory is None and not profiled:
        # a GPU or utilization the user typed asks for the profile arithmetic; otherwise the run's own
        # kv_cache_memory_bytes sizes the pool, as it did in vLLM (on GPU and CPU alike)
        if measured.get("kv_cache_memory_bytes"):
            kv_cache_memory = int(measured["kv_cache_memory_bytes"])
        elif measured.get("device") == "cpu" and measured.get("num_gpu_blocks_override"):
            # the override made the pool, whatever the memory: the memory vLLM measured for KV before it
            # (engine.json's available_kv_bytes) is what a plan without the override sizes by
            kv_cache_memory = measured.get("available_kv_bytes") or None
            if kv_cache_memory is None and override is None:
                raise KvtraceError(
                    f"{args.from_run}: num_gpu_blocks_override sized its pool and its engine.json does not "
                    "give the KV memory vLLM measured on CPU: add --kv-cache-memory SIZE"
                )
        elif _count(node_refusal.get("requested_kv_bytes")) is not None:
            # kv_cache_memory_bytes unset: the CPU worker asked gpu_memory_utilization of the node less what
            # the process held, and sizes its pool by that as by an explicit kv_cache_memory_bytes
            kv_cache_memory = int(node_refusal["requested_kv_bytes"])
        elif isinstance(node_refusal.get("requested_kv_bytes"), int):
            kv_cache_memory = 0  # the process held more than the share asked: no KV space at all
        elif measured.get("device") == "cpu" and measured.get("kv_cache_bytes"):
            # an older run's engine.json without the setting: vLLM on CPU sizes its pool by it, not by a
            # GPU's memory, so the pool it allocated is that setting
            kv_cache_memory = int(measured["kv_cache_bytes"])
    # engine.json of an older kvtrace, or of a start vLLM refused: no MLP size. The weights matter only
    # where the profile arithmetic sizes the pool, not where kv_cache_memory_bytes does.
    unsized = geometry is run_geometry and not geometry.intermediate_size
    weights_given = args.weights_bytes is not None or bool(measured.get("weights_bytes"))
    if unsized and kv_cache_memory is None and override is None and not weights_given:
        raise KvtraceError(
            f"{args.from_run}: its engine.json does not give the model's MLP size, so the weights cannot "
            "be sized: add --config PATH (the model's config.json) or --weights-bytes"
        )
    activation_peak = pick(args.activation_peak, "activation_peak_bytes", 0, "--activation-peak")
    stages, partition, stage_weights, unstaged = _pipeline_settings(
        args, measured, geometry.num_layers, geometry is run_geometry
    )
    weights = pick(args.weights_bytes, "weights_bytes", None, "--weights-bytes")
    if stages > 1 and args.weights_bytes is None:
        weights = None  # the run's are its first stage's worker's: each stage's are measured or computed
        if (
            stage_weights is None
            and not geometry.intermediate_size
            and kv_cache_memory is None
            and not override
        ):
            raise KvtraceError(
                f"{args.from_run}: its engine.json does not give the model's MLP size nor every pipeline "
                "stage's weights, so each stage's cannot be sized: add --config PATH (the model's "
                "config.json) or --weights-bytes (each stage's worker's)"
            )
    request = VllmPlanRequest(
        geometry=geometry,
        model_dtype=setting(args.dtype, "model_dtype", "bf16"),
        gpu_memory_bytes=gpu_memory,
        gpu_memory_utilization=float(
            setting(args.gpu_memory_utilization, "gpu_memory_utilization", GPU_MEMORY_UTILIZATION)
        ),
        max_model_len=max_model_len,
        block_size=int(setting(args.block_size, "block_size", 16)),
        kv_cache_dtype=str(setting(args.kv_cache_dtype, "kv_cache_dtype", "auto")),
        tensor_parallel_size=int(setting(args.tensor_parallel_size, "tensor_parallel_size", 1)),
        pipeline_parallel_size=stages,
        pp_layer_partition=partition,
        stage_weights_bytes=stage_weights,
        weights_bytes=weights,
        buffers_bytes=int(measured.get("buffers_bytes") or 0),
        activation_peak_bytes=activation_peak or 0,
        non_torch_bytes=pick(args.non_torch, "non_torch_bytes", 0, "--non-torch") or 0,
        kv_cache_memory_bytes=kv_cache_memory,
        num_gpu_blocks_override=override,
        max_num_batched_tokens=pick_count(args.max_num_batched_tokens, "max_num_batched_tokens"),
        async_scheduling=setting(args.async_scheduling, "async_scheduling", None),
        device="cpu" if measured.get("device") == "cpu" else "cuda",
        batch=args.batch,
        defaults=_defaults(args, measured, length_note is not None),
    )
    result = plan_vllm(request)
    if length_note is not None:  # first: every figure below is at this length
        result = replace(result, notes=(length_note, *result.notes))
    node_free = _positive(node_refusal.get("node_available_bytes"))
    if node_free is not None and request.device == "cpu" and (kv_cache_memory is not None or not profiled):
        from analyzers.planning.vllm_node_plan import with_node_memory

        node = _count(node_refusal.get("node"))
        result = with_node_memory(result, node_free, node, str(args.from_run))
        if (
            kv_cache_memory is not None
            and args.kv_cache_memory is None
            and not measured.get("kv_cache_memory_bytes")
        ):
            result = replace(
                result,
                notes=(
                    *result.notes,
                    f"kv_cache_memory_bytes unset: vLLM's CPU worker asked gpu_memory_utilization="
                    f"{request.gpu_memory_utilization:g} of the node less what the process held "
                    f"({node_refusal.get('requested_kv_bytes'):,} B), planned as kv_cache_memory_bytes="
                    f"{kv_cache_memory}",
                ),
            )
    drafted = draft_kv_layers(measured.get("model"))
    if geometry is run_geometry and drafted:
        method = (measured.get("config") or {}).get("speculative_method")
        note = (
            f"speculative decoding ({method}): the drafter's {drafted} attention layer(s) keep KV in the "
            f"same blocks, counted with the model's: {geometry.num_layers} layers a block "
            f"({_drafter_weights(args.weights_bytes, measured)})"
        )
        result = replace(result, notes=(*result.notes, note))
    if unstaged:
        stages = int(measured["pipeline_parallel_size"])
        of_model = (measured.get("model") or {}).get("num_layers")
        note = (
            f"pipeline parallel {stages}: planned for the first stage's worker, whose pool holds the KV of "
            f"{geometry.num_layers} of the model's {of_model} layers (recorded before kvtrace kept every "
            f"stage's figures, or which layers slide); each of the {stages} stages' workers is given "
            "kv_cache_memory_bytes (or sizes its pool from its own memory) for its own layers, and vLLM "
            "keeps the fewest blocks of any stage"
        )
        result = replace(result, notes=(*result.notes, note))
    if geometry is run_geometry and "sliding_window" not in (measured.get("model") or {}):
        started = (
            "; vLLM started this run, which this plan refuses: its layers may slide"
            if measured.get("status") == "ok" and not result.starts and not result.refusals
            else ""
        )
        result = replace(
            result,
            notes=(
                *result.notes,
                f"{args.from_run}: engine.json does not say whether the model's attention slides (recorded "
                "before kvtrace kept `sliding_window`): planned as full attention; --config PATH (the "
                f"model's config.json) plans its window{started}",
            ),
        )
    # --gpu-memory picks vLLM's default max_num_batched_tokens on a GPU where none is typed or the run's
    default_batched = (
        result.max_num_batched_tokens
        if request.device != "cpu" and request.max_num_batched_tokens is None
        else None
    )
    ignored = _ignored_profile_note(
        args, kv_cache_memory, override, stages, default_batched, request.gpu_memory_bytes
    )
    if ignored is not None:
        result = replace(result, notes=(*result.notes, ignored))
    if args.gpu_memory is not None:
        from kvtrace.gpu_names import gpu_note

        named = gpu_note(args.gpu_memory, "--gpu-memory", vllm=True)
        if named is not None:
            result = replace(result, notes=(*result.notes, named))
    elif not measured.get("gpu_memory_bytes") and kv_cache_memory is None:
        # the GPU line's 80 GiB is a default, as the transformers plan's peak line says of it
        from analyzers.units import a_or_an, human_bytes

        default = (
            f"--gpu-memory not given: planned for {a_or_an(human_bytes(request.gpu_memory_bytes))} GPU, the "
            "default; name yours (--gpu-memory H100, L4, 24GiB)"
        )
        result = replace(result, notes=(*result.notes, default))
    from analyzers.planning.vllm_start_remedies import start_remedies

    remedies = start_remedies(result)
    print_result(
        args.json, lambda: vllm_to_json(result, remedies), lambda: format_vllm_text(result, remedies)
    )
    return 0 if result.starts and result.batch_fits is not False else 1
