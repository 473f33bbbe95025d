"""Reads a kvtrace run directory into a `MemorySource`: the profiler's allocator events, the KV log, the
weights table (with its changes inside the block, `readers.weight_changes`) and the markers (steps,
evictions, OOM), all on the Unix-epoch microsecond clock."""

from __future__ import annotations

import bisect
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from analyzers.attribution import (
    JOIN_TOLERANCE_US,
    RANGES_LEAD,
    sizes_are_blocks,
    smallest_block,
    trace_lead_us,
)
from analyzers.eviction_markers import step_marks
from analyzers.kv_log import KvLogAnalysis, analyze_run_kv_log
from analyzers.model import (
    DeviceEvents,
    Marker,
    MemorySource,
    normal_device,
)
from analyzers.readers.engine_files import model_in_worker_process
from analyzers.readers.kv_before_trace import add_kv_frees, held_bytes, kv_held_before_trace
from analyzers.readers.run_baseline import held_before_trace, weights_from_table
from analyzers.readers.run_files import (
    kv_log_notes,
    lists_profiler_file,
    manifest_notes,
    missing_files_notes,
    weights_counted_notes,
)
from analyzers.readers.run_oom import oom_of_run
from analyzers.readers.sources import ProgressFn, next_stage
from analyzers.readers.untraced_caches import (
    add_untraced_kv,
    adds_untraced_kv,
    caches_on_other_threads,
    untraced_note,
)
from analyzers.readers.weight_changes import add_weight_events, weight_changes, weights_changed_note
from analyzers.trace_coverage import damaged_memory_events, skipped_events_note
from kvtrace.errors import KvtraceError
from kvtrace.format import (
    ENGINE_FILES,
    ENGINE_NOT_FOLLOWED_NOTE,
    ENGINE_NOT_RECORDED_NOTE,
    KV_EVENTS,
    profiler_traces,
)
from kvtrace.format import WEIGHTS as WEIGHTS_FILE
from kvtrace.run_lock import holder
from kvtrace.run_reader import read_run


def _kv_only_devices(devices: list[str], events: list[Any]) -> list[DeviceEvents]:
    """Without a profiler trace (profiler=False), the KV log's own alloc/free pairs are the events, in the
    log's order: a replacement's new storage before the old one's free (the transient copy), even when
    both carry the same clock reading. A storage is live from the first event showing its address to its
    `freed` (as analyzers.kv_log replays it), on the device its event names: a cache split over devices (an
    offloaded cache, a `device_map` that puts layers on the CPU) counts each layer where it sits. A `freed`
    line names no device: it frees the storage where its address is live. `devices`: each one a
    `DeviceEvents`, in this order (those of the weights too, which may hold no KV)."""
    rows: dict[str, list[tuple[float, int, int]]] = {device: [] for device in devices}
    live: dict[int, tuple[str, int]] = {}  # address -> (its device, its bytes)
    for ev in events:
        if ev.event == "freed":
            held = live.pop(ev.addr, None)
            if held is not None:
                rows[held[0]].append((ev.t_ns / 1000.0, ev.addr, -held[1]))
        elif ev.addr and ev.addr not in live and ev.event != "written":
            device = normal_device(ev.device) if ev.device else devices[0]
            live[ev.addr] = (device, ev.storage_bytes)
            rows.setdefault(device, []).append((ev.t_ns / 1000.0, ev.addr, ev.storage_bytes))
    return [
        DeviceEvents(
            device=device,
            ts_us=np.array([r[0] for r in device_rows], dtype=np.float64),
            addr=np.array([r[1] for r in device_rows], dtype=np.int64),
            delta_bytes=np.array([r[2] for r in device_rows], dtype=np.int64),
        )
        for device, device_rows in rows.items()
    ]


def _kv_log_devices(run: Any) -> list[str]:
    """The devices a run without allocator events has figures for: those its KV log and its weights name,
    the run's own device (the manifest's) first; "cpu" when none is named."""
    named = {normal_device(e.device) for e in run.kv_events if e.device}
    named |= {normal_device(w.device) for w in run.weights if w.device}
    own = run.manifest.get("device", {})
    main = f"{own.get('type')}:{own.get('index', 0)}" if own.get("type") not in (None, "cpu") else "cpu"
    return sorted(named, key=lambda device: (device != main, device)) or ["cpu"]


NO_MEMORY_EVENTS_NOTE = (
    "the profiler trace has no memory events of the model's thread (torch.profiler records the thread that "
    "started it: was generate() run on another thread?): memory figures are the KV log's, as for a run "
    "recorded with profiler=False"
)
FORWARDS_ELSEWHERE_NOTE = (
    "every forward pass of the model ran on another thread than the one that entered record(), so the "
    "profiler's trace has no memory events of the model's thread: memory figures are the KV log's over the "
    "weights, as for a run recorded with profiler=False (activations, logits and other allocations unseen)"
)
VLLM_WORKER_NOTE = (
    "vLLM ran the model in its worker process (engine.json pool_source kv_tensors_rpc), not in the process "
    "whose profiler wrote this run's trace, which has none of the model's memory events: memory figures are "
    "the KV log's over the weights, as for a run recorded with profiler=False (activations, logits and "
    "other allocations unseen)"
)
PROFILE_MEMORY_OFF_NOTE = (
    "the run was recorded with profile_memory=False, so its profiler trace has no allocator events: memory "
    "figures are the KV log's over the weights, as for a run recorded with profiler=False (activations and "
    "other allocations unseen)"
)
DAMAGED_MEMORY_EVENTS_NOTE = (
    "{damaged}: memory figures are the KV log's over the weights, as for a run recorded with profiler=False "
    "(activations and other allocations unseen)"
)
_NO_TRACE_CAUSES = {
    "profiler_off": "the run was recorded with profiler=False, so no allocator events were recorded",
    "no_trace": "the run has no profiler trace, so no allocator events were read",
    "unwritten": "the recorder could not write the profiler trace ({why}), so no allocator events were read",
    "unreadable": "the profiler trace cannot be read ({why}), so no allocator events were read",
}


def _no_trace_note(cause: str, weights: bool, why: str = "") -> str:
    """Why a run without a profiler trace has no measured peak; `weights`: its weights table lists some (a
    vLLM engine loads its weights before the run: none, and the engine's note says so); `why`: the
    manifest's `ended.trace_error`, for "unwritten"."""
    over, counted = (" over the weights", "the KV cache and the weights") if weights else ("", "the KV cache")
    cause_said = _NO_TRACE_CAUSES[cause].format(why=why)
    return (
        f"{cause_said}: memory figures are the KV log's{over}, and the peak counts only "
        f"{counted} (activations, logits and other allocations unseen)"
    )


def _no_model_note(manifest: dict[str, Any], from_table: list[bool], engine_on_disk: bool) -> str | None:
    """A run recorded without model= has no weights table: where a device's figures take the weights from
    it (a CPU, a trace without the allocator's totals: `from_table`), they leave out the weights allocated
    before the block; a GPU's totals count them, as other. None with a model, and for an engine's run
    (vLLM's engine loads its weights itself: its note says so), told by the manifest's files or, for a run
    killed before its manifest listed them, by the engine files in the folder (`engine_on_disk`). Under
    `kvtrace run` the advice is what its user can do: the script has no record() call to pass model= to."""
    if "model" not in manifest or manifest["model"] is not None:
        return None
    notes = manifest.get("notes") or ()
    if any(isinstance(note, str) and note.startswith(ENGINE_NOT_FOLLOWED_NOTE) for note in notes):
        return (
            "the recording (kvtrace run, or record(model='auto')) found a vLLM LLM at its first generate(), "
            "but its engine ran in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1): the pool, "
            "weights and engine steps are not in this run; record the engine in the script's process (leave "
            "VLLM_ENABLE_V1_MULTIPROCESSING unset under kvtrace run, which sets it to 0) or with kvtrace's "
            "vLLM plugin (KVTRACE_DIR=DIR in its environment)"
        )
    unrecorded = [n for n in notes if isinstance(n, str) and n.startswith(ENGINE_NOT_RECORDED_NOTE)]
    if unrecorded:  # whatever the device: the KV figures lack the engine's pool
        return (
            f"{unrecorded[0].removeprefix(ENGINE_NOT_RECORDED_NOTE)}: the engine's pool, weights and steps "
            "are not in this run (its KV figures are transformers caches' alone); record it with "
            "kvtrace.record(dir, model=llm) around its generate() calls, model='auto', or kvtrace's vLLM "
            "plugin (KVTRACE_DIR=DIR in its environment)"
        )
    listed = any(name in (manifest.get("files") or ()) for name in ENGINE_FILES)
    if engine_on_disk or listed or not from_table:
        return None
    if recorded_by_kvtrace_run(manifest):
        said = (
            "the recording (kvtrace run, or record(model='auto')) found no generate() call, so the run has "
            "no model: its weights"
        )
        remedy = (
            "call the model's generate() while it records (the first model whose generate() runs is "
            "recorded), or record your own forwards with kvtrace.record(model=model) in the script"
        )
        if any(from_table):
            left_out = "are not in its figures (its peak and final leave them out)"
            return f"{said} {left_out}; to count them, {remedy}"
        return f"{said} are counted as other (the allocator's totals hold them); to name them, {remedy}"
    said = "the run was recorded without model=: weights allocated before the block"
    if any(from_table):
        return (
            f"{said} are not in its figures (its peak and final leave them out); pass model= to "
            "kvtrace.record() to count them"
        )
    return f"{said} are counted as other (the allocator's totals hold them); pass model= to name them"


def recorded_by_kvtrace_run(manifest: dict[str, Any]) -> bool:
    """Whether the run was recorded with record(model="auto"), as `kvtrace run` records a script: the
    manifest's `model_auto`, or, in runs recorded before it, a model found at a generate() call
    (`model_found_ns`) or the note a profiled run that found none has."""
    if manifest.get("model_auto") is True or "model_found_ns" in manifest:
        return True
    notes = manifest.get("notes")
    return isinstance(notes, list) and any(
        isinstance(note, str) and "record(model='auto')" in note for note in notes
    )


def _before_allocating_clause(manifest: dict[str, Any]) -> str:
    """Why a run's trace has no memory events and its KV log no line, in a clause: its block raised (the
    manifest's `ended`) or stopped before allocating anything, or allocated nothing."""
    ended = manifest.get("ended") or {}
    status = ended.get("status") if isinstance(ended, dict) else None
    if status == "exception":
        kind = ended.get("type")
        raised = f"raised {kind}" if isinstance(kind, str) and kind else "raised"
        return f"the block {raised} before its first allocation"
    if status == "interrupted":
        return "the block was interrupted before its first allocation"
    if status == "running":
        return "the block stopped (its process died or is still recording) before its first allocation"
    return "the block allocated nothing while it was recorded"


def _before_allocating_note(manifest: dict[str, Any]) -> str:
    """The note on a run whose trace has no memory events and whose KV log has no line (see
    `_before_allocating_clause`): its figures are its weights, held since before the block."""
    return (
        f"the profiler trace has no memory events and the KV log no line: "
        f"{_before_allocating_clause(manifest)}, so no step ran; memory figures are the weights it held, "
        "as for a run recorded with profiler=False"
    )


# The recorder's warning, which runs recorded before the manifest had `forwards_on_other_threads` carry
_ELSEWHERE_WARNING = re.compile(r"^(\d{1,12}) of (\d{1,12}) forward passes ran on another thread\b")


def _forwards_all_elsewhere(manifest: dict[str, Any]) -> bool:
    """Whether every forward of the recorded model ran on another thread than the one that entered
    record(), which torch.profiler records: its trace then holds no memory event of the model's, whatever
    the recording thread allocated meanwhile. From the manifest's `forwards_on_other_threads`, else from
    the warning of runs recorded before it."""
    counts = manifest.get("forwards_on_other_threads")
    if isinstance(counts, dict):
        forwards, steps = counts.get("forwards"), counts.get("steps")
    else:
        forwards = steps = None
        for warning in manifest.get("warnings") or ():
            match = _ELSEWHERE_WARNING.match(warning) if isinstance(warning, str) else None
            if match:
                forwards, steps = int(match.group(1)), int(match.group(2))
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (forwards, steps)):
        return False
    assert isinstance(forwards, int) and isinstance(steps, int)
    return 0 < steps <= forwards


def _kv_log_then_trace(
    path: Path, progress: ProgressFn | None
) -> tuple[ProgressFn | None, ProgressFn | None]:
    """`progress` split into the KV log's part and the trace's, as one bar over both files' bytes: a
    light-mode run is all KV log (135 MB for 4,000 tokens of 32 layers, read silently for a minute before)."""
    if progress is None:
        return None, None
    traces = profiler_traces(path)
    kv_log = path / KV_EVENTS
    kv_bytes = kv_log.stat().st_size if kv_log.is_file() else 0
    trace_bytes = traces[-1].stat().st_size if traces else 0
    both = kv_bytes + trace_bytes
    show = progress  # narrowed, for the closures

    def kv_part(done: int, total: int) -> None:
        show(done, both)

    def trace_part(done: int, total: int) -> None:
        show(kv_bytes + done, kv_bytes + total)

    return kv_part, trace_part


def read_run_source(path: str | os.PathLike[str], progress: ProgressFn | None = None) -> MemorySource:
    kv_progress, trace_progress = _kv_log_then_trace(Path(path), progress)
    run = read_run(path, progress=kv_progress)
    kv = analyze_run_kv_log(run, progress=next_stage(progress, "replaying KV log", "event"))
    source = MemorySource(kind="run", path=str(Path(path)))
    missing = missing_files_notes(run) + kv_log_notes(run) + manifest_notes(run)
    if missing:
        source.meta.setdefault("input_notes", []).extend(missing)
    traces = run.profiler_traces()
    trace = None
    unreadable = ""  # why the run's trace cannot be read: its KV log and weights are read all the same
    if traces:
        from analyzers.readers.chrome_trace import read_chrome_trace

        try:
            trace = read_chrome_trace(traces[-1], progress=trace_progress)
        except KvtraceError as exc:  # a killed job's half-written or a damaged copy's trace
            unreadable, traces = str(exc), []
    memory_damaged = False  # the trace's [memory] events, all skipped as damaged
    skipped: dict[str, int] | None = None
    # Another model's caches on a thread torch.profiler did not record: none of their storages is in the
    # trace, so they neither place its clock nor count as held before it
    untraced = caches_on_other_threads(run.manifest) if traces else set()
    storages = [s for s in kv.storages if s[6] not in untraced]
    # (addr, first t_ns) of the storages that may be held since before the trace however late the log first
    # saw them: a cache found filled, a tensor handed to track() (made whenever the user chose)
    found = {(kv.storages[i][0], kv.storages[i][2]) for i in kv.found_storages | kv.tracked_storages}
    if traces and trace is not None:
        source.devices = trace.devices
        source.frames = trace.frames
        source.markers = [m for m in trace.markers if not m.label.startswith("kvtrace/kv_update")]
        source.meta["trace"] = str(traces[-1])
        if trace.meta.get("unescaped_names"):
            source.meta["unescaped_names"] = trace.meta["unescaped_names"]
        if trace.meta.get("bad_addresses_note"):
            source.meta.setdefault("input_notes", []).append(trace.meta["bad_addresses_note"])
        skipped = trace.meta.get("skipped_events")
        if skipped:  # damaged events the reader set aside (a real recorder's trace has none)
            memory_damaged = not trace.devices and damaged_memory_events(skipped) is not None
            if not memory_damaged or not all(reason.startswith("[memory]") for reason in skipped):
                source.meta.setdefault("input_notes", []).append(
                    skipped_events_note(skipped, trace.meta.get("trace_events"), "the profiler trace: ")
                )
        if run.manifest.get("options", {}).get("with_stack"):
            from analyzers.readers.trace_stacks import attach_python_stacks

            source.meta["allocations_with_stack"] = attach_python_stacks(source, traces[-1])
        if storages:
            # After the stacks (matched to ranges on the trace's own clock), before anything that compares
            # the trace's times with the KV log's.
            from analyzers.readers.trace_clock import align_trace_clock

            align_trace_clock(
                source,
                storages,
                trace.meta.get("baseTimeNanoseconds"),
                _run_span_ns(run),
                kv.scanned_after_ns,
                _sampled_step_starts(run.memory_samples),
            )
    elsewhere = bool(traces and run.kv_events) and _forwards_all_elsewhere(run.manifest)
    # vLLM's worker in a process of its own (KVTRACE_PROFILER=1 profiles the engine core's)
    in_worker = bool(traces and run.kv_events) and model_in_worker_process(path)
    trace_empty = bool(traces) and not any(len(dev) for dev in source.devices)
    # A block that ended before its first allocation (it raised at once) leaves a trace without memory
    # events and a KV log without a line: the weights, resident since before the block, are what it held,
    # as a run recorded with profiler=False reports them, not an empty device list
    ended_before_allocating = trace_empty and not run.kv_events and bool(run.weights)
    trace_missed_the_model = bool(traces and run.kv_events) and (elsewhere or in_worker or trace_empty)
    memory_off = run.manifest.get("options", {}).get("profile_memory") is False
    if ended_before_allocating and not memory_off:
        source.meta.setdefault("input_notes", []).append(_before_allocating_note(run.manifest))
    elif ended_before_allocating:
        source.meta.setdefault("input_notes", []).append(PROFILE_MEMORY_OFF_NOTE)
    trace_missed_the_model = trace_missed_the_model or ended_before_allocating
    if trace_missed_the_model and not ended_before_allocating:
        # A trace taken with profile_memory=False has no allocator events at all. With them on,
        # torch.profiler records the memory events of the thread that started it: a generate() run on
        # another thread (a TextIteratorStreamer, a server's worker) leaves it none of the model's, though
        # the recording thread may leave some of its own (a streamer's token decoding). Either way the KV
        # log, which the cache's own hooks write, is complete: its figures stand in, as for a run without a
        # trace. Where only some forwards ran elsewhere the trace is read, and the manifest's warning says
        # what it misses.
        if memory_off:
            note = PROFILE_MEMORY_OFF_NOTE
        elif in_worker:
            note = VLLM_WORKER_NOTE
        elif elsewhere:
            note = FORWARDS_ELSEWHERE_NOTE
        elif memory_damaged:
            note = DAMAGED_MEMORY_EVENTS_NOTE.format(
                damaged=damaged_memory_events(skipped, "the profiler trace's")
            )
        else:
            note = NO_MEMORY_EVENTS_NOTE
        source.meta.setdefault("input_notes", []).append(note)
    if not traces or trace_missed_the_model:
        source.devices = _kv_only_devices(_kv_log_devices(run), run.kv_events)
        if not traces:
            # A listed trace that is missing has its own note (above); else say why the peak is partial.
            # `events_from` says the same cause in a clause (`MemorySource.kv_log_cause`: plan's note).
            if run.manifest.get("options", {}).get("profiler") is False:
                source.meta["events_from"] = "kv_log (it was recorded with profiler=False)"
                source.meta.setdefault("input_notes", []).append(
                    _no_trace_note("profiler_off", bool(run.weights))
                )
            elif unreadable:
                source.meta["events_from"] = f"kv_log (its profiler trace cannot be read: {unreadable})"
                source.meta.setdefault("input_notes", []).append(
                    _no_trace_note("unreadable", bool(run.weights), unreadable)
                )
            elif isinstance(trace_error := run.manifest.get("ended", {}).get("trace_error"), str):
                # its logs are whole (a full disk as the block ended): the KV log's figures are the run's
                source.meta["events_from"] = "kv_log (the recorder could not write its profiler trace)"
                source.meta.setdefault("input_notes", []).append(
                    _no_trace_note("unwritten", bool(run.weights), trace_error)
                )
            elif not lists_profiler_file(run):
                source.meta["events_from"] = "kv_log (it has no profiler trace)"
                source.meta.setdefault("input_notes", []).append(
                    _no_trace_note("no_trace", bool(run.weights))
                )
            else:
                source.meta["events_from"] = "kv_log (its profiler trace, listed in the manifest, is missing)"
        elif memory_off:
            source.meta["events_from"] = "kv_log (it was recorded with profile_memory=False)"
        elif ended_before_allocating:
            source.meta["events_from"] = f"kv_log ({_before_allocating_clause(run.manifest)})"
        elif in_worker:
            source.meta["events_from"] = "kv_log (vLLM ran the model in its worker process, not traced)"
        elif elsewhere:
            source.meta["events_from"] = "kv_log (the model's forwards ran on another thread)"
        elif memory_damaged:
            source.meta["events_from"] = "kv_log (the profiler trace's memory events are damaged)"
        else:
            source.meta["events_from"] = "kv_log (the profiler trace has no memory events)"
    traced = bool(traces) and not trace_missed_the_model
    if traced and untraced:
        # On a CPU, their KV storages join the trace's events from the KV log; elsewhere (a GPU's totals
        # count them already) the note says where their KV is counted
        added: dict[int, int] = {}
        ranges_lead = source.meta.get(RANGES_LEAD)
        for dev in source.devices:
            for cache, count in add_untraced_kv(
                dev, run.kv_events, kv.storages, untraced, ranges_lead
            ).items():
                added[cache] = added.get(cache, 0) + count
        # On a CPU whose trace held every storage of theirs (the caches went on on the recording thread),
        # nothing is missing: no note
        if added or not any(adds_untraced_kv(dev) for dev in source.devices):
            source.meta.setdefault("input_notes", []).append(untraced_note(untraced, added))
            named = ", ".join(str(c) for c in sorted(untraced))
            source.meta["peak_leaves_out"] = (
                f"another model's activations (cache {named}'s, on another thread)"
                if added
                else f"what another model held between the recording thread's events (cache {named}'s)"
            )
    changes = weight_changes(run)
    if changes:
        # The model converted inside the block (`model.to(torch.bfloat16)`): the events of its weights that
        # the device's events lack (all of them in the KV log's; the untraced frees of a CPU trace).
        for dev in source.devices:
            add_weight_events(dev, changes, traced, JOIN_TOLERANCE_US)
        source.meta["weight_changes"] = changes
        source.meta.setdefault("input_notes", []).append(weights_changed_note(run))
    weights_by_device: dict[str, int] = {}
    weight_blocks_by_device: dict[str, int] = {}  # on a GPU, the allocator's blocks that hold them
    for weight in run.weights:
        device = normal_device(weight.device)
        weights_by_device[device] = weights_by_device.get(device, 0) + weight.storage_bytes
        weight_blocks_by_device[device] = weight_blocks_by_device.get(device, 0) + smallest_block(
            weight.storage_bytes
        )
    total_memory = run.manifest.get("device", {}).get("total_memory_bytes")
    weights_gone = WEIGHTS_FILE in run.damaged_files or (
        WEIGHTS_FILE in (run.manifest.get("files") or []) and not (run.path / WEIGHTS_FILE).is_file()
    )
    weights_counted = False  # a GPU's allocator totals hold the weights the missing table would list
    for dev in source.devices:
        # The weights were allocated before the profiler started, as may some KV
        if weights_gone and weights_from_table(dev, traced):  # a partial copy: the peak is a lower bound
            gone = "damaged" if WEIGHTS_FILE in run.damaged_files else "missing"
            source.meta["peak_leaves_out"] = f"the weights, as {WEIGHTS_FILE} is {gone}"
        elif weights_gone:
            weights_counted = True
        # (that KV until the log's `freed` line for it: a CPU trace lacks the free, which is added)
        # how far the trace's clock runs ahead of the log's: one scan of the device's events for both
        lead = trace_lead_us(dev, storages, source.meta.get(RANGES_LEAD)) if traced and len(dev) else 0.0
        held_kv = kv_held_before_trace(dev, storages, run.kv_events, found, lead) if traced else []
        if any(s[3] >= 0 for s in held_kv):
            add_kv_frees(dev, held_kv, run.kv_events, lead)
            source.meta.setdefault("kv_held_before_trace", {})[dev.device] = held_kv
        held = weight_blocks_by_device if sizes_are_blocks(dev) else weights_by_device
        listed = {w.addr: w.storage_bytes for w in run.weights if normal_device(w.device) == dev.device}
        listed.update((s[0], s[1]) for s in held_kv)
        held_before_trace(dev, held.get(dev.device, 0), held_bytes(dev, held_kv), listed if traced else None)
        if (
            dev.capacity_bytes is None
            and total_memory
            and dev.device.startswith(run.manifest.get("device", {}).get("type", "?"))
        ):
            dev.capacity_bytes = int(total_memory)
    if weights_counted and "peak_leaves_out" not in source.meta:
        source.meta["input_notes"] = weights_counted_notes(source.meta.get("input_notes", []))
        source.meta["weights_counted"] = True  # in other, as the allocator's totals held them
    no_model = _no_model_note(
        run.manifest,
        [weights_from_table(dev, traced) for dev in source.devices],
        engine_on_disk=any((run.path / name).is_file() for name in ENGINE_FILES),
    )
    if no_model is not None:
        source.meta.setdefault("input_notes", []).append(no_model)
    if traces:
        source.markers = _numbered_steps(source.markers, kv.step_start_ns, kv.step_phase)
    if not any(m.kind == "step" for m in source.markers):
        for step, (start_ns, phase) in sorted(_run_step_starts(kv, run.memory_samples).items()):
            source.markers.append(Marker(kind="step", ts_us=start_ns / 1000.0, label=f"step {step} {phase}"))
    for mark in step_marks(kv.evictions):  # one marker a step and kind (window, press, crop), all layers
        source.markers.append(
            Marker(
                kind="eviction",
                ts_us=mark.t_ns / 1000.0,
                label=mark.label,
                detail={
                    "reason": mark.kind,
                    "step": mark.step,
                    "evicted_tokens": mark.evicted_tokens,
                    "evicted_bytes": mark.evicted_bytes,
                    "layers": mark.layers,
                },
            )
        )
    ended = run.manifest.get("ended", {})
    message = str(ended.get("message", ""))
    if ended.get("status") == "exception" and (
        "OutOfMemory" in str(ended.get("type", "")) or "out of memory" in message.lower()
    ):
        source.ooms.append(oom_of_run(run, ended, message, source))
        source.markers.append(Marker(kind="oom", ts_us=ended.get("t_ns", 0) / 1000.0, label="OOM"))
    source.meta.update(
        run=run,
        kv=kv,
        weights_by_device=weights_by_device,
        manifest=run.manifest,
        truncated=run.truncated,
    )
    if ended.get("status") == "running":  # a recording in progress, or one whose process died
        source.meta["recording_pid"] = holder(run.path)
    return source


def _run_step_starts(kv: KvLogAnalysis, samples: list[dict[str, Any]]) -> dict[int, tuple[int, str]]:
    """step -> (when it began, phase) in a run without step ranges (recorded with the profiler off): the
    forward's start where the step's sample tells it (`started_ns`), else the KV log's first line of the
    step, which a module's cache (`cache_k`, scanned at the forward's end) logs only when the forward ends."""
    starts = {step: (start_ns, kv.step_phase.get(step, "")) for step, start_ns in kv.step_start_ns.items()}
    for sample in samples:
        step, phase, began = sample.get("step"), sample.get("phase"), sample.get("started_ns")
        if type(step) is int and type(began) is int and phase in ("prefill", "decode", "idle"):
            logged = starts.get(step)
            starts[step] = (min(began, logged[0]), logged[1] or phase) if logged else (began, phase)
    return starts


def _sampled_step_starts(samples: list[dict[str, Any]]) -> dict[int, tuple[int, str]]:
    """step -> (when its forward began, phase) of the prefill and decode steps whose samples say it
    (`started_ns`, read on the run's clock just before the step's range opens in the trace)."""
    starts: dict[int, tuple[int, str]] = {}
    for sample in samples:
        step, phase, began = sample.get("step"), sample.get("phase"), sample.get("started_ns")
        if type(step) is int and type(began) is int and phase in ("prefill", "decode"):
            held = starts.get(step)
            starts[step] = (min(began, held[0]), held[1]) if held else (began, phase)
    return starts


def _numbered_steps(markers: list[Marker], start_ns: dict[int, int], phases: dict[int, str]) -> list[Marker]:
    """The recorder's step ranges ("kvtrace/prefill", "kvtrace/decode N", N counting the decodes since the
    last prefill: the names Nsight shows) labelled "step N phase" in the KV log's numbering (1 = the first
    prefill), as a run recorded without the profiler has them, so that the page numbers steps one way with
    the profiler on or off. A range takes the KV log step that began inside it; one that holds none (a
    forward with no KV update), the step after the previous range's."""
    starts = sorted((t_ns / 1000.0, step) for step, t_ns in start_ns.items())
    numbered: list[Marker] = []
    previous = 0
    for marker in markers:
        name = marker.label
        if marker.kind != "step" or not (name == "kvtrace/prefill" or name.startswith("kvtrace/decode ")):
            numbered.append(marker)
            continue
        end_us = marker.ts_us if marker.end_us is None else marker.end_us
        at = bisect.bisect_left(starts, (marker.ts_us, -1))
        step = starts[at][1] if at < len(starts) and starts[at][0] <= end_us else previous + 1
        previous = step
        phase = phases.get(step) or ("prefill" if name == "kvtrace/prefill" else "decode")
        detail = {**marker.detail, "range": name}
        numbered.append(replace(marker, label=f"step {step} {phase}", detail=detail))
    return numbered


def _run_span_ns(run: Any) -> tuple[int, int]:
    """The run's time: from its start to its end (the manifest's), widened to the KV log's first and last
    lines. Not the KV log alone: a vLLM run logs its pool once, at the start, before the profiler's first
    event, and a trace inside the run would read as off its clock."""
    first, last = run.kv_events[0].t_ns, run.kv_events[-1].t_ns
    started = run.manifest.get("started_ns")
    ended = (run.manifest.get("ended") or {}).get("t_ns")
    if isinstance(started, int) and not isinstance(started, bool):
        first = min(first, started)
    if isinstance(ended, int) and not isinstance(ended, bool):
        last = max(last, ended)
    return first, last
