"""What a recorded transformers run gives `kvtrace plan --from-run`: the model, the weights as measured,
and the cache, dtypes, batch, context, prompt and device memory it ran with. A flag the user types wins
over each.

Why from a run: the weights the device held are measured (quantized, tied, offloaded or not, whatever
family), where a config's arithmetic is an estimate for families the planner does not lay out; and a plan of
the run's own settings must give the run's own KV (final and peak), a check that the plan's other answers
(max batch, max context) rest on the cache the run really used.

The model is the run's model_config.json (the model's whole Hugging Face config, written by the recorder
since kvtrace 0.1's session 17), read as `plan --config` reads a config.json; a run recorded before it has
the manifest's geometry only, which plans the KV of a model whose layers are all alike or whose sliding
layers' order does not matter to the figure asked. A cache given a window the model's config lacks (a
sliding cache built from a config of its own, as `kvtrace demo --cache sliding` does) shows it in the log,
its window evictions: the model is planned as sliding at that window, as the run's cache did.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

from analyzers.budget import manifest_budget
from analyzers.caches import CROSS_ATTENTION, cache_roles, cross_attention_parts, layer_list, written_last
from analyzers.kv_events import BUFFER_PARTS, buffer_shape
from analyzers.kv_log import analyze_run_kv_log
from analyzers.kv_log_figures import CacheFigures, KvLogAnalysis
from analyzers.model import normal_device
from analyzers.planning.engine_run_refusal import not_a_vllm_pool
from analyzers.planning.hf_config import geometry_from_config
from analyzers.planning.presets import ModelGeometry
from analyzers.planning.rank_share import rank_geometry
from analyzers.planning.run_cache_kind import (
    PLAN_DTYPES,
    kv_dtype_of,
    logged_quantized_backend,
    logged_window,
    quantized_layout,
)
from analyzers.planning.run_calls import CallRequest, call_request, prompt_ends
from analyzers.planning.run_experts import run_experts
from analyzers.planning.run_padding import call_padded
from analyzers.readers.engine_files import read_engine
from analyzers.readers.run_dir import recorded_by_kvtrace_run
from analyzers.readers.run_files import kv_log_notes
from analyzers.readers.run_oom import limit_of
from analyzers.readers.sources import ProgressFn, next_stage
from analyzers.run_stop import interrupted_how
from kvtrace.errors import KvtraceError
from kvtrace.format import ENGINE, ENGINE_NOT_FOLLOWED_NOTE, ENGINE_NOT_RECORDED_NOTE, MODEL_CONFIG, Run
from kvtrace.geometry import major_minor
from kvtrace.run_lock import holder
from kvtrace.run_reader import read_run


@dataclass(frozen=True)
class RunDefaults:
    """A run's settings for a plan, each None where the run does not say (the flag's default applies)."""

    geometry: ModelGeometry
    weights_bytes: int  # every weight storage the run's devices held at its end
    weights_dtype: str | None  # the model's float dtype (bf16, fp16, fp32)
    kv_dtype: str | None  # what the cache stored (its last KV data event's dtype; int4/int8 packed)
    # dynamic, static, sliding, static_sliding or quantized: the transformers cache the log shows (the
    # sliding ones where every layer evicted for a window the model's config lacks, `logged_window`)
    cache: str
    batch: int | None  # rows of the run's main cache
    beams: int  # num_beams of a beam search (1 otherwise)
    # prompt + new tokens of the call that wrote the main cache (its static length); of a run cut short, the
    # length that call asked for
    context: int | None
    prompt: int | None  # that call's prompt, where its prefill sample says
    gpu_memory_bytes: int | None  # the CUDA device's memory (None for a run on the CPU)
    # the budget it was recorded with (record(gpu_memory=...), the manifest's options.gpu_memory): the
    # memory it was meant to fit, which report and diagnose check it against; it goes before the device's
    budget_bytes: int | None
    device: str  # the run's device type ("cuda", "cpu")
    notes: tuple[str, ...]
    quant_group_size: int | None = None  # a QuantizedCache's q_group_size, where the log shows it
    residual_length: int | None = None  # and its residual_length, where it requantized
    quant_backend: str | None = None  # and its backend ("quanto", "hqq"), as its packed parts' names say
    window: int | None = None  # a sliding cache's window (sliding, static_sliding), where the log shows it
    # The model as its config has it, where `geometry` carries a window only the run's cache slid at
    # (`logged_window`): a typed --cache of a kind that keeps every token plans it. None where the two are one
    config_geometry: ModelGeometry | None = None
    window_note: str | None = None  # the note (in `notes`) that says the run's cache slid at that window
    # an encoder-decoder run's encoder input length: the tokens a row of its cross-attention cache
    encoder_tokens: int | None = None
    # a tensor-parallel rank's shards (`rank_geometry` cut `geometry` to its share): its weights at another
    # dtype are its measured ones re-stored (`rank_weights_at`), not the whole model's geometry's
    rank_shards: int | None = None
    # the bytes of `weights_bytes` recorded in float32: a buffer the model keeps at fp32 (rotary inv_freq,
    # loaded with torch_dtype=) is there; one cast with its weights (`.to(torch.bfloat16)`) is not
    fp32_weights_bytes: int | None = None
    # whether that call's prompts were padded (the manifest's `generate_calls`); None: not told (its mask
    # freed before the recording ended, none passed, runs recorded before kvtrace wrote it)
    padded: bool | None = None
    # the transformers it was recorded under (the manifest's `transformers_version`), whose attention code
    # the planner prices; None where the manifest does not say
    transformers_version: str | None = None
    # the per-process cap (torch.cuda.set_per_process_memory_fraction) its OOM message names ("24.96 GiB
    # allowed;", two decimals): the memory the allocator could reserve, not the device's. Only an OOM's
    # message says it; None otherwise
    limit_bytes: int | None = None
    # the geometry is a model's cache buffers' (`_buffers_geometry`), which say no MLP nor vocabulary: its
    # weights are the measured ones alone, re-stored at another --dtype, never the geometry's
    measured_weights_only: bool = False


def run_defaults(
    path: str | Path,
    transformers_layout: tuple[int, int] | None = None,
    progress: ProgressFn | None = None,
) -> RunDefaults:
    """Read a transformers run directory (KvtraceError naming the file and the problem otherwise); its
    model's caches and weights laid out as `transformers_layout` (major, minor) does, else as the manifest's
    transformers (`plan --transformers` plans for another release than the run's). `progress`: the KV log's
    reading, then its replay (`read_run_source`'s)."""
    root = Path(path)
    engine = read_engine(root)
    if engine is not None:  # a serving engine's pool, which this planner of generate()'s caches does not size
        refusal = not_a_vllm_pool(root, engine.info)
        raise KvtraceError(
            refusal
            or f"{root}: a vLLM run, whose pool --engine hf does not plan: drop --engine hf (or give "
            "--engine vllm)"
        )
    run = read_run(root, progress=progress)
    engine_said = run.manifest.get("engine")
    if isinstance(engine_said, dict) and engine_said.get("name"):
        # A serving engine's run without its engine files (a partial copy): planned as generate()'s cache,
        # its pool would be sized as a dynamic cache of the requests' rows, silently wrong
        raise KvtraceError(
            f"{root / ENGINE}: missing, where the manifest says the run's KV was "
            f"{engine_said['name']}'s pool: plan --from-run reads the pool from it"
        )
    notes: list[str] = kv_log_notes(run)
    # What the recorder warned of (a weights table cut by a full disk, ...), as `report` says it
    notes.extend(str(warning) for warning in run.manifest.get("warnings") or ())
    main, kv, stopped = _main_cache(run, replay=next_stage(progress, "replaying KV log", "event"))
    geometry = _geometry(run, notes, main, transformers_layout)
    geometry, experts_note = run_experts(geometry, run.manifest.get("model"), run.path.name)
    if experts_note is not None:
        notes.append(experts_note)
    if main is None:
        raise KvtraceError(
            f"{root}: the run logged no KV cache, so it has no cache, batch or context to plan from; plan it "
            "with --preset or --config instead of --from-run"
        )
    whole = geometry
    geometry = rank_geometry(run, main, geometry, notes)  # one tensor-parallel rank: its share of the heads
    shards = whole.num_kv_heads // geometry.num_kv_heads if geometry is not whole else None
    weights, devices, fp32_weights = _weights(run)
    if len(devices) > 1:
        notes.append(
            f"the run's weights were on {len(devices)} devices ({', '.join(devices)}): the plan puts all "
            f"{weights:,} B on one GPU"
        )
    device = run.manifest.get("device")
    if not isinstance(device, dict):
        device = {}
    gpu = device.get("total_memory_bytes") if device.get("type") == "cuda" else None
    model = run.manifest.get("model") or {}
    prompt, context, _, padded, launched, _ = _planned_call(run, kv, main, stopped)
    if launched is not None:
        notes.append(launched)
    batch = main.rows or None
    cache, kv_dtype = "dynamic", kv_dtype_of(run)
    quantized = quantized_layout(run, main, geometry, notes) if kv_dtype != "fp8-quantized" else None
    if quantized is not None:
        cache, kv_dtype = "quantized", quantized[0]
    elif kv_dtype == "fp8-quantized":
        cache, kv_dtype = "quantized", "fp8"
    elif main.capacity_of == "buffers":
        # Meta's reference code: cache_k/cache_v made once for max_batch_size x max_seq_len, written in
        # place whatever the rows and positions used, as a StaticCache is
        cache, batch, context = "static", main.capacity_rows, main.capacity_tokens + 1
        notes.append(
            f"the run's cache is a module's preallocated buffers ({main.capacity_rows} rows x "
            f"{main.capacity_tokens} positions, max_batch_size x max_seq_len, written in place): planned as "
            "a static cache, the planner's closest kind, whose --batch is max_batch_size and --context "
            f"max_seq_len + 1 (this run's: --batch {batch} --context {context})"
        )
    elif main.capacity_of == "static_cache" or main.static_positions:
        cache = "static"
        length = main.capacity_tokens or main.static_positions
        if context is not None and length + 1 > context:
            notes.append(
                f"the run's static cache has room for {length} positions, beyond the {context - 1} tokens "
                f"its call wrote: planned at its length, a context of {length + 1}"
            )
            context = length + 1
    window = config_geometry = window_note = None
    if cache in ("dynamic", "static") and not geometry.windowed_layers:
        said: list[str] = []
        windowed, cache, window = logged_window(run, main, geometry, cache, said)
        if windowed is not geometry:
            config_geometry, geometry = geometry, windowed
            window_note = said[0] if said else None
        notes.extend(said)
    cross = _cross_attention_cache(run, kv, main)
    encoder_tokens = None
    if cross is not None and cross.tokens:
        encoder_tokens = cross.tokens
        if not geometry.cross_kv_layers:  # a run without model_config.json: the cache says its layers
            geometry = replace(geometry, cross_kv_layers=cross.layers)
    notes.extend(_other_caches(run, kv, main, cross))
    beams = main.beams if main.reordered and main.beams > 1 else 1
    return RunDefaults(
        geometry=geometry,
        weights_bytes=weights,
        weights_dtype=PLAN_DTYPES.get(str(model.get("dtype"))),
        kv_dtype=kv_dtype,
        cache=cache,
        batch=batch,
        beams=beams,
        context=context,
        prompt=prompt if prompt is not None and context is not None and prompt < context else None,
        gpu_memory_bytes=int(gpu) if isinstance(gpu, int) and gpu > 0 else None,
        budget_bytes=manifest_budget(run.manifest),
        device=str(device.get("type") or "an unknown device"),
        notes=tuple(notes),
        quant_group_size=quantized[1] if quantized else None,
        residual_length=quantized[2] if quantized else None,
        quant_backend=logged_quantized_backend(run, main.cache) if quantized else None,
        window=window,
        config_geometry=config_geometry,
        window_note=window_note,
        encoder_tokens=encoder_tokens,
        rank_shards=shards,
        fp32_weights_bytes=fp32_weights,
        padded=padded,
        transformers_version=_transformers_version(run.manifest),
        limit_bytes=_oom_limit(run.manifest),
        measured_weights_only=geometry.hidden_size == 0 and main.capacity_of == "buffers",
    )


def _oom_limit(manifest: dict[str, Any]) -> int | None:
    """The per-process cap the run's OOM message names, where it ran out under one (`limit_bytes`)."""
    ended = manifest.get("ended")
    message = ended.get("message") if isinstance(ended, dict) and ended.get("status") == "exception" else None
    return limit_of(message) if isinstance(message, str) else None


def _why_no_model(manifest: dict[str, Any]) -> str:
    """Why a run has no model to plan from, as its recording tells it: a vLLM engine it could not follow
    (its own process, or an `LLM` started in a `record(dir)` block), a `kvtrace run` script that made no
    generate() call, else a record() without model=. "recorded without model=" said of the first two
    named an argument their user never had to give."""
    notes = [note for note in manifest.get("notes") or () if isinstance(note, str)]
    if any(note.startswith(ENGINE_NOT_FOLLOWED_NOTE) for note in notes):
        return (
            "its vLLM engine ran in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1) and was not "
            "recorded; to record it, leave that variable unset under kvtrace run, or use kvtrace's vLLM "
            "plugin, KVTRACE_DIR=DIR"
        )
    if any(note.startswith(ENGINE_NOT_RECORDED_NOTE) for note in notes):
        return (
            "a vLLM LLM started in the block, which record(dir) without model= does not follow; record it "
            "with record(dir, model=llm)"
        )
    if recorded_by_kvtrace_run(manifest):
        return "kvtrace run found no generate() call, so no model was recorded"
    return "recorded without model="


def _geometry(
    run: Run, notes: list[str], main: CacheFigures | None, layout: tuple[int, int] | None = None
) -> ModelGeometry:
    """The run's model_config.json as a config.json (laid out as `layout`, else the run's transformers),
    else the manifest's geometry."""
    model = run.manifest.get("model")
    config = run.path / MODEL_CONFIG
    if config.is_file():
        version = layout or major_minor(_transformers_version(run.manifest))
        geometry = geometry_from_config(config, version)
        kind = model.get("class") if isinstance(model, dict) else None
        return replace(geometry, name=f"{run.path.name} ({kind})" if kind else run.path.name)
    fields = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim")
    unsaid = not isinstance(model, dict) or any(not isinstance(model.get(name), int) for name in fields)
    if unsaid and main is not None and main.capacity_of == "buffers":
        found = _buffers_geometry(run, main, notes)
        if isinstance(found, ModelGeometry):
            return found
        kind = model.get("class") if isinstance(model, dict) else None
        whose = f"its model ({kind})" if kind else "its model"
        raise KvtraceError(
            f"{run.path / 'manifest.json'}: no model geometry: {whose} has no Hugging Face config, and its "
            f"cache_k/cache_v buffers {found}: plan it with --preset or "
            "--config instead of --from-run"
        )
    if unsaid or not isinstance(model, dict):
        # A model passed as model= with no Hugging Face config or cache buffers (a hand-written decoder whose
        # KV came through kvtrace.track) has a class but no geometry: say so, not that model= was missing
        kind = model.get("class") if isinstance(model, dict) else None
        why = (
            f"its model ({kind}) has no Hugging Face config or cache_k/cache_v buffers to read it from"
            if isinstance(kind, str)
            else _why_no_model(run.manifest)
        )
        raise KvtraceError(
            f"{run.path / 'manifest.json'}: no model geometry ({why}): plan it with "
            "--preset or --config instead of --from-run"
        )
    zero = next((name for name in fields if model[name] == 0), None)
    if zero is not None:  # the manifest's checks take 0 as a count: a plan of it failed unnamed, or exit 70
        raise KvtraceError(
            f"{run.path / 'manifest.json'}: field 'model.{zero}' is 0, and no model with KV has none: "
            "plan it with --preset or --config instead of --from-run"
        )
    # A module cache (Meta's reference code) comes with a model that has no Hugging Face config to write
    why = (
        "its model has no Hugging Face config"
        if main is not None and main.capacity_of == "buffers"
        else "its model has no Hugging Face config, or kvtrace did not write it yet when it was recorded"
    )
    notes.append(
        f"{run.path.name} has no {MODEL_CONFIG} ({why}): the model is the manifest's geometry, whose "
        "sliding layers' order is not known"
    )
    return ModelGeometry(
        name=str(model.get("class") or run.path.name),
        num_layers=model["num_layers"],
        num_attention_heads=model["num_attention_heads"],
        num_kv_heads=model["num_kv_heads"],
        head_dim=model["head_dim"],
        hidden_size=int(model.get("hidden_size") or 0),
        intermediate_size=0,
        vocab_size=int(model.get("vocab_size") or 0),
        tie_word_embeddings=False,
        sliding_window=model.get("sliding_window"),
        kv_layers=model.get("kv_layers"),
        sliding_layers=model.get("sliding_layers"),
        # Unknown: the manifest's max_seq_len is Meta's Llama3.build setting, the length its buffers were made
        # for, not a length the model was trained to (Llama 3.1 takes 131,072 whatever it is built with)
        max_position_embeddings=None,
    )


def _buffers_geometry(run: Run, main: CacheFigures, notes: list[str]) -> ModelGeometry | str:
    """The KV geometry of a model with no Hugging Face config nor Meta's `params` (a hand-written decoder),
    read from its preallocated cache buffers as the log shows them: their layers (one K and V pair each),
    and their [max_batch_size, max_seq_len, kv_heads, head_dim] shape. That is all their KV needs, whose
    size is theirs whatever the batch and context; the rest of the model (hidden size, MLP, vocabulary) they
    do not say, so its weights are the run's measured ones and its activations the run's measured ones, or
    left out. Else what the buffers do not say, as the error's words."""
    shapes: dict[int, dict[str, list[int]]] = {}
    for ev in run.kv_events:
        if ev.cache == main.cache and ev.part in BUFFER_PARTS and ev.event != "freed" and ev.shape:
            shapes.setdefault(ev.layer, {})[ev.kv] = buffer_shape(ev)
    pairs = [layer for layer, kinds in shapes.items() if set(kinds) >= {"k", "v"}]
    kinds = {tuple(shape) for layer in pairs for shape in shapes[layer].values()}
    if not pairs:
        return "are logged without a K and V pair of any layer"
    if len(kinds) != 1 or len(next(iter(kinds))) != 4:
        said = ", ".join("x".join(map(str, shape)) for shape in sorted(kinds))
        return (
            f"are not all of one [max_batch_size, max_seq_len, kv_heads, head_dim] shape ({said}), so their "
            "KV heads and head_dim are unknown"
        )
    _, _, kv_heads, head_dim = next(iter(kinds))
    notes.append(
        f"{run.path.name} has no {MODEL_CONFIG} (its model has no Hugging Face config): the model is its "
        f"cache buffers' geometry, {len(pairs)} layers of K and V of {kv_heads} KV heads x {head_dim} "
        "head_dim; its hidden size, MLP and vocabulary they do not say, so the weights are the run's "
        "measured ones (re-stored at another --dtype) and the activations the run's measured ones "
        "where it recorded them, else left out of the plan (the reserve stands for them)"
    )
    return ModelGeometry(
        name=str((run.manifest.get("model") or {}).get("class") or run.path.name),
        num_layers=len(pairs),
        num_attention_heads=kv_heads,  # unknown: the KV's heads, which the buffers hold
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=0,
        intermediate_size=0,
        vocab_size=0,
        tie_word_embeddings=False,
        max_position_embeddings=None,
    )


class CallContext(NamedTuple):
    """The generate() call `plan --from-run` plans (the one that wrote the main cache last), as plan counts
    it."""

    cache: int  # the main cache's id
    prompt: int | None  # its prompt, where its prefill sample (else the prefill's tokens) says
    context: int | None  # prompt + new tokens: what it reached, or, cut short, the length it asked for
    step: int  # its prefill's step, 0 where the log shows none
    reached: int | None = None  # what it reached, as plan counts a context: below `context` when cut short
    live: bool = False  # a recording still writes it: `reached` is how far it has got, not where it stopped


def call_context(run: Run, kv: KvLogAnalysis) -> CallContext | None:
    """The prompt and context `plan --from-run` gives the run (`run_defaults`, before a preallocated cache's
    length replaces the context), so that `kvtrace diagnose` names a shorter context against the context plan
    takes, not against the tokens held at its moment; None where the run logged no cache."""
    main, kv, stopped = _main_cache(run, kv)
    if main is None:
        return None
    prompt, context, step, _, _, reached = _planned_call(run, kv, main, stopped)
    live = (run.manifest.get("ended") or {}).get("status") == "running" and holder(run.path) is not None
    return CallContext(main.cache, prompt, context, step, reached, live)


def _planned_call(
    run: Run, kv: KvLogAnalysis, main: CacheFigures, stopped: _Stop | None
) -> tuple[int | None, int | None, int, bool | None, str | None, int | None]:
    """(prompt, context, prefill step, padded, note, context reached) of the call a plan takes (`_call`),
    planned as launched where the run was cut short (`_as_launched`): the context it reached beside."""
    prompt, reached, asked, padded, call = _call(run, kv, main)
    if stopped is None and call and _prefill_unended(run, call):
        cut_short = f"the run was cut short in step {call}, its prefill, which never finished"
        stopped = _Stop(f"{cut_short} (its manifest still says running)", in_prefill=True)
    context, launched = _as_launched(run, stopped, prompt, reached, asked, main.capacity_of == "buffers")
    return prompt, context, call, padded, launched, reached


class _Stop(NamedTuple):
    """Where a run cut short stopped, as a note begins ("the run ran out of memory in step 4, ...")."""

    said: str
    in_prefill: bool = False  # in its call's prefill, before its first new token
    live: bool = False  # not stopped: a recording still writes it (the figures are what it wrote so far)


def _main_cache(
    run: Run, kv: KvLogAnalysis | None = None, replay: ProgressFn | None = None
) -> tuple[CacheFigures | None, KvLogAnalysis, _Stop | None]:
    """The cache written last: the model's own, where an assistant's or an earlier call's may sit beside.
    Its tokens and rows are those at the end of the last whole step: a run killed part-way through a step,
    or whose forward raised (an OOM, a Ctrl-C), never held the step's tokens on every layer (nor did it
    yield its token). With it, for a run whose forward raised, where it stopped and what of it the cache's
    figures are. `kv`: the run's KV log analysed already (a source's), else analysed here, with `replay`'s
    progress."""
    kv = kv if kv is not None else analyze_run_kv_log(run, progress=replay)
    # not a cross-attention cache (an encoder's output: its tokens are the encoder's, and a beam search
    # reorders it last, after the decoder's own)
    cross = {cid for cid, (role, _) in cache_roles(run.manifest).items() if role == CROSS_ATTENTION}
    # A module's preallocated buffers (Meta's cache_k/cache_v) are planned at their rows and positions, which
    # the log says from their creation: also where no forward wrote a token (killed or raised in its prefill)
    caches = [
        cache
        for cache in kv.caches
        if (cache.tokens or cache.capacity_of == "buffers") and cache.cache not in cross
    ]
    if not caches:
        return None, kv, None
    main = written_last(caches)
    cut = kv.cut
    if cut is None or not cut.raised:
        return main, kv, None  # a killed run's figures of the end are already its last whole step's
    what = _how_it_stopped(run.manifest.get("ended") or {})
    whole = cut.whole_step
    held = kv.step_tokens.get(whole, {}).get(main.cache) if whole is not None else None
    if whole is None or not held:  # no whole step before held this cache's KV: its prefill raised
        reached = cut.reached.get(main.cache, ())
        held_said = (
            f"{layer_list(reached)} held its {main.tokens} tokens a row"
            if reached and main.tokens
            else "no layer held a token of it"
        )
        stopped = (
            f"the run {what} in step {cut.step}, its prefill, which never finished (when it stopped "
            f"{held_said})"
        )
        return main, kv, _Stop(stopped, in_prefill=True)
    rows = kv.step_rows.get(whole, {}).get(main.cache) or main.rows
    stopped = (
        f"the run {what} in step {cut.step}, which never finished; step {whole} was the last whole one "
        f"({held} tokens a row held)"
    )
    return replace(main, tokens=held, rows=rows), kv, _Stop(stopped)


def _how_it_stopped(ended: dict[str, Any]) -> str:
    """What a block that stopped inside a step did, from the manifest's `ended`: "ran out of memory"."""
    kind = str(ended.get("type") or "")
    if ended.get("status") == "interrupted":
        return f"was {interrupted_how(ended)}"
    if "OutOfMemory" in kind or "out of memory" in str(ended.get("message") or "").lower():
        return "ran out of memory"
    return f"raised {kind or 'an exception'}"


def _transformers_version(manifest: dict[str, Any]) -> str | None:
    """The manifest's `transformers_version`, where it names one."""
    version = manifest.get("transformers_version")
    return version if isinstance(version, str) and version else None


def _call(
    run: Run, kv: KvLogAnalysis, main: CacheFigures
) -> tuple[int | None, int | None, CallRequest | None, bool | None, int]:
    """(prompt, context, request, padded, prefill step) of the generate() call that wrote the main cache last,
    not the run's first call: its prompt from its prefill sample (else the tokens the prefill left in the
    cache), its context that prompt plus the tokens the call yielded, never the tokens held + 1 alone, which
    a sliding window caps; but at least that (a quantized cache's packed parts, which the yields do not
    count, hold them). Its request: the length it was asked to reach, where the recorder noted it (its
    prefill sample, else the manifest: `run_calls`); padded: whether its prompts were (`call_padded`); its
    prefill's step, 0 where the log shows none."""
    cut = kv.cut.step if kv.cut is not None else None  # a step whose forward raised, or a kill cut
    written = [ev for ev in run.kv_events if ev.cache == main.cache and ev.event != "freed"]
    events = [ev for ev in written if ev.step != cut]
    # Its last whole prefill: a quantized cache's writes it in packed parts, which `call_step` does not count
    step = max((ev.step for ev in events if ev.phase == "prefill"), default=main.call_step)
    # The call's prefill, also one that raised: its sample says its prompt and request all the same
    call = max((ev.step for ev in written if ev.phase == "prefill"), default=step)
    prompt = prompt_ends(run).get(call) if call else None
    if prompt is None and step:
        prompt = kv.step_tokens.get(step, {}).get(main.cache) or None
    last = [ev.tokens for ev in events if ev.tokens]
    held = max(main.tokens, last[-1] if last else 0)
    yielded = prompt + main.call_generated_tokens if prompt is not None else 0
    context = max(held + 1 if held else 0, yielded)
    padded = call_padded(run.manifest, call) if call else None
    return prompt, context or None, call_request(run, call) if call else None, padded, call


def _prefill_unended(run: Run, call: int) -> bool:
    """Whether the call whose prefill is step `call` stopped inside it, in a run that never ended (its
    manifest still says running: a process killed, by the kernel's OOM killer perhaps): the log's last step,
    with no end sample. The log alone cannot tell a prefill cut between its layers (`cut_last_step`)."""
    if (run.manifest.get("ended") or {}).get("status") != "running":
        return False
    if max((ev.step for ev in run.kv_events), default=0) != call:
        return False
    return not any(s.get("step") == call and s.get("phase") == "prefill" for s in run.memory_samples)


def _as_launched(
    run: Run,
    stopped: _Stop | None,
    prompt: int | None,
    reached: int | None,
    asked: CallRequest | None,
    buffers: bool = False,
) -> tuple[int | None, str | None]:
    """The context to plan and a note. A run cut short (its forward raised, or the block raised, was
    interrupted or killed) is planned as launched: at the length its call asked for, where the recorder
    noted it, not the tokens it reached before it stopped, which is the run the user wants to fit. A
    whole run is planned at what it reached, which an end-of-sequence token may have made less. A module's
    preallocated `buffers` are planned whole (max_seq_len + 1, set by the caller) however far the run got:
    the note says that, not a context the plan does not use."""
    ended = run.manifest.get("ended") or {}
    status = ended.get("status")
    if stopped is None and status in ("exception", "interrupted"):
        stopped = _Stop(f"the run {_how_it_stopped(ended)}")
    elif stopped is None and status == "running":
        pid = holder(run.path)
        stopped = (
            _Stop("the run was cut short (its manifest still says running)")
            if pid is None
            else _Stop(
                f"the run is still being recorded by {f'pid {pid}' if pid else 'a process'}", live=True
            )
        )
    if stopped is not None and buffers:
        return reached, (
            f"{stopped.said}: its preallocated buffers are planned whole, as the model allocated them, "
            "whatever tokens it had written"
        )
    if stopped is None:  # a whole run
        if asked is None or reached is None or asked.max_length <= reached:
            return reached, None
        return reached, (
            f"its generate() call stopped at a context of {reached} tokens, before the {asked.max_length} "
            f"it asked for ({asked.said(prompt)}): an end-of-sequence token or a stopping criterion ended "
            f"it; planned at what it reached (--context {asked.max_length} plans the length asked for)"
        )
    if asked is None or reached is None or asked.max_length <= reached:
        where = (
            "as that prefill would have ended, its prompt and one new token"
            if stopped.in_prefill
            else ("as far as it has got" if stopped.live else "where it stopped")
        )
        return reached, (
            f"{stopped.said}: planned at a context of {reached} tokens, {where}; the tokens it was to "
            "generate are not in the recording (give --context)"
        )
    got = (
        "it stopped before its first new token"
        if stopped.in_prefill
        else (
            f"it has reached {reached} so far"
            if stopped.live
            else f"it had reached {reached} when it stopped"
        )
    )
    return asked.max_length, (
        f"{stopped.said}: planned as launched, at the context of {asked.max_length} tokens its generate() "
        f"call asked for ({asked.said(prompt)}); {got}"
    )


def _cross_attention_cache(run: Run, kv: KvLogAnalysis, main: CacheFigures) -> CacheFigures | None:
    """The cross-attention cache of the encoder-decoder cache holding `main` (the manifest's
    `encoder_decoder_caches`), which the plan holds at the encoder's length; None for any other run."""
    roles = cache_roles(run.manifest)
    _, owner = roles.get(main.cache, (None, None))
    if owner is None or main.cache in cross_attention_parts(run.manifest):
        return None
    partner = [cid for cid, (kind, of) in roles.items() if of == owner and kind == CROSS_ATTENTION]
    return next((c for c in kv.caches if c.cache in partner), None)


def _other_caches(run: Run, kv: KvLogAnalysis, main: CacheFigures, cross: CacheFigures | None) -> list[str]:
    """A note for each other cache still held at the run's end, which the plan leaves out: an assistant
    model's (written during the main cache's call: assisted decoding), the cross-attention layers of a
    model's cache (Mllama's image), or an earlier call's. Not the main cache's cross-attention partner in
    an encoder-decoder cache, which the plan holds."""
    notes = []
    parts = cross_attention_parts(run.manifest)
    for other in kv.caches:
        if other.cache == main.cache or not other.final_bytes or other is cross:
            continue
        if other.cache in parts and parts[other.cache][0] == main.cache:
            notes.append(
                f"the cross-attention layers ({layer_list(parts[other.cache][1])}) of the planned cache held "
                f"{other.final_bytes:,} B of KV at the run's end, the image's ({other.tokens} vision tokens "
                "a row): a fixed cost the plan leaves out"
            )
            continue
        steps = [ev.step for ev in run.kv_events if ev.cache == other.cache and ev.event != "freed"]
        whose = (
            "an assistant model's (assisted decoding), written during the planned cache's call"
            if steps and max(steps) > main.call_step
            else "an earlier generate() call's, still referenced"
        )
        notes.append(
            f"another cache held {other.final_bytes:,} B of KV at the run's end, {whose}: the plan is "
            "the main model's cache alone"
        )
    return notes


def _weights(run: Run) -> tuple[int, list[str], int]:
    """Bytes of the weight storages held at the run's end (those listed at its start, less the ones freed
    since, plus the ones added: a `.to()` inside the block), the devices holding them, and the bytes of
    those held in float32 (which of its buffers the model kept at fp32 beside weights of another dtype)."""
    held: dict[tuple[str, int], tuple[int, str]] = {}
    for line in [*run.weights, *run.weight_changes]:
        key = (normal_device(line.device), line.addr)
        if line.event == "freed":
            held.pop(key, None)
        elif key[0] != "meta":
            held[key] = (line.storage_bytes, line.dtype)
    fp32 = sum(size for size, dtype in held.values() if dtype == "float32")
    return sum(size for size, _ in held.values()), sorted({device for device, _ in held}), fp32
