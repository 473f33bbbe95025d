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
layers' order does not matter to the figure asked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from analyzers.caches import layer_list
from analyzers.kv_log import CacheFigures, analyze_run_kv_log, is_kv_data
from analyzers.model import normal_device
from analyzers.planning.presets import ModelGeometry, geometry_from_config
from kvtrace.errors import KvtraceError
from kvtrace.format import ENGINE, MODEL_CONFIG, Run, read_run

# The model's float dtypes as the planner names them; others (int8 weights) plan their KV in bf16
_PLAN_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class RunDefaults:
    """A run's settings for a plan, each None where the run does not say (the flag's default applies)."""

    geometry: ModelGeometry
    weights_bytes: int  # every weight storage the run's devices held at its end
    weights_dtype: str | None  # the model's float dtype (bf16, fp16, fp32)
    kv_dtype: str | None  # what the cache stored (its last KV data event's dtype)
    cache: str  # dynamic, static or quantized: the transformers cache the log shows
    batch: int | None  # rows of the run's main cache
    beams: int  # num_beams of a beam search (1 otherwise)
    context: int | None  # prompt + new tokens: the cache's tokens + 1 (generate() never writes its last)
    prompt: int | None  # the first generate() call's prompt, where its prefill sample says
    gpu_memory_bytes: int | None  # the CUDA device's memory (None for a run on the CPU)
    device: str  # the run's device type ("cuda", "cpu")
    notes: tuple[str, ...]


def run_defaults(path: str | Path) -> RunDefaults:
    """Read a transformers run directory (KvtraceError naming the file and the problem otherwise)."""
    root = Path(path)
    if (root / ENGINE).exists():
        raise KvtraceError(f"{root}: a vLLM run; plan its pool with --engine vllm --from-run")
    run = read_run(root)
    notes: list[str] = []
    geometry = _geometry(run, notes)
    main = _main_cache(run, notes)
    if main is None:
        raise KvtraceError(
            f"{root}: the run logged no KV cache, so it has no cache, batch or context to plan from; give "
            "--preset or --config instead"
        )
    weights, devices = _weights(run)
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
    cache = "static" if main.capacity_of == "static_cache" else "dynamic"
    kv_dtype = _kv_dtype(run)
    if kv_dtype == "quantized":
        cache, kv_dtype = "quantized", None
        notes.append("a quantized cache: its bits are not in the log; planned at int4 unless --kv-dtype says")
    elif kv_dtype == "fp8-quantized":
        cache, kv_dtype = "quantized", "fp8"
    beams = main.beams if main.reordered and main.beams > 1 else 1
    return RunDefaults(
        geometry=geometry,
        weights_bytes=weights,
        weights_dtype=_PLAN_DTYPES.get(str(model.get("dtype"))),
        kv_dtype=kv_dtype,
        cache=cache,
        batch=main.rows or None,
        beams=beams,
        context=main.tokens + 1 if main.tokens else None,
        prompt=_prompt(run),
        gpu_memory_bytes=int(gpu) if isinstance(gpu, int) and gpu > 0 else None,
        device=str(device.get("type") or "an unknown device"),
        notes=tuple(notes),
    )


def _geometry(run: Run, notes: list[str]) -> ModelGeometry:
    """The run's model_config.json as a config.json, else the manifest's geometry."""
    model = run.manifest.get("model")
    config = run.path / MODEL_CONFIG
    if config.is_file():
        geometry = geometry_from_config(config)
        kind = model.get("class") if isinstance(model, dict) else None
        return replace(geometry, name=f"{run.path.name} ({kind})" if kind else run.path.name)
    fields = ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim")
    if not isinstance(model, dict) or any(not isinstance(model.get(name), int) for name in fields):
        raise KvtraceError(
            f"{run.path / 'manifest.json'}: no model geometry (recorded without model=): give --preset or "
            "--config"
        )
    notes.append(
        f"{run.path.name} has no {MODEL_CONFIG} (recorded before kvtrace wrote it): the model is the "
        "manifest's geometry, whose sliding layers' order is not known"
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
        max_position_embeddings=model.get("max_seq_len"),
    )


def _main_cache(run: Run, notes: list[str]) -> CacheFigures | None:
    """The cache written last: the model's own, where an assistant's or an earlier call's may sit beside.
    Its tokens and rows are those at the end of the last whole step: a run killed part-way through a step,
    or whose forward raised (an OOM, a Ctrl-C), never held the step's tokens on every layer (nor did it
    yield its token), and the tokens it would have gone on to are not in the recording."""
    kv = analyze_run_kv_log(run)
    caches = [cache for cache in kv.caches if cache.tokens]
    if not caches:
        return None
    main = max(caches, key=lambda cache: cache.last_seq)
    cut = kv.cut
    if cut is None or not cut.raised:
        return main  # a killed run's figures of the end are already its last whole step's
    what = _how_it_stopped(run.manifest.get("ended") or {})
    whole = cut.whole_step
    held = kv.step_tokens.get(whole, {}).get(main.cache) if whole is not None else None
    if whole is None or not held:  # no whole step before held this cache's KV: its prefill raised
        reached = cut.reached.get(main.cache, ())
        notes.append(
            f"the run {what} in step {cut.step}, its prefill, which never finished: planned as that prefill "
            f"would have ended, its {main.tokens} tokens a row on every layer (when it stopped "
            f"{layer_list(reached) if reached else 'no layer'} held them) and one new token; the tokens it "
            "was to generate are not in the recording (give --context)"
        )
        return main
    rows = kv.step_rows.get(whole, {}).get(main.cache) or main.rows
    notes.append(
        f"the run {what} in step {cut.step}, which never finished: planned as at the end of step "
        f"{whole}, the last whole one ({held} tokens a row held); the tokens it was to generate "
        "are not in the recording (give --context)"
    )
    return replace(main, tokens=held, rows=rows)


def _how_it_stopped(ended: dict[str, Any]) -> str:
    """What a block that stopped inside a step did, from the manifest's `ended`: "ran out of memory"."""
    kind = str(ended.get("type") or "")
    if ended.get("status") == "interrupted":
        return "was interrupted (Ctrl-C)"
    if "OutOfMemory" in kind or "out of memory" in str(ended.get("message") or "").lower():
        return "ran out of memory"
    return f"raised {kind or 'an exception'}"


def _weights(run: Run) -> tuple[int, list[str]]:
    """Bytes of the weight storages held at the run's end (those listed at its start, less the ones freed
    since, plus the ones added: a `.to()` inside the block), and the devices holding them."""
    held: dict[tuple[str, int], int] = {}
    for line in [*run.weights, *run.weight_changes]:
        key = (normal_device(line.device), line.addr)
        if line.event == "freed":
            held.pop(key, None)
        elif key[0] != "meta":
            held[key] = line.storage_bytes
    return sum(held.values()), sorted({device for device, _ in held})


def _kv_dtype(run: Run) -> str | None:
    """The planner's name of what the cache stored, from its last KV data event: a float dtype, "fp8"
    (a plain cache in fp8), "quantized" (a QuantizedCache's packed data) or "fp8-quantized" (its fp8
    backend), None when the log says nothing."""
    data = [event for event in run.kv_events if is_kv_data(event) and event.dtype]
    if not data:
        return None
    last = data[-1]
    dtype = str(last.dtype)
    if str(last.part).startswith("q."):
        return "fp8-quantized" if dtype.startswith("float8") else "quantized"
    if dtype.startswith("float8"):
        return "fp8"
    return _PLAN_DTYPES.get(dtype)


def _prompt(run: Run) -> int | None:
    """The prompt's tokens of the run's first generate() call (its prefill sample's `prompt_end`)."""
    for sample in run.memory_samples:
        end: Any = sample.get("prompt_end")
        if sample.get("phase") == "prefill" and isinstance(end, int) and end > 0:
            return end
    return None
