"""Why did it run out of memory, and what would each usual remedy buy on THIS run? Pure, torch-free.

`diagnose(source, report)` picks one moment: the first OOM (a snapshot's `oom` trace entry, a run's
recorded OutOfMemoryError) or, without one, the peak of the device that peaks highest. At that moment it
reads what was allocated, reserved and free, how fragmented the reserved segments were (largest free
block vs the request), how much of the memory was KV cache and in which layers and step, and which stacks
held the most live bytes. Then it prices each remedy in bytes with this run's own figures
(analyzers.planning.diagnose_remedies says how).

A memory budget (`--budget`, or the `gpu_memory` a run was recorded with) is diagnosed as the OOM it
would have been on a device of that size: the step, layer and request that crossed it
(analyzers.budget), with the remedies priced at the run's peak, which must fit under the budget.

This module picks the moment and puts its figures together; the rest is split by role, each in its own
module: the data model (analyzers.planning.diagnosis), what the allocator held and lacked then (allocated,
reserved, free, fragmentation, a per-process limit, the shortfall: diagnose_allocator), where the moment
falls in the run and what the KV held then (diagnose_moment), the stacks live then (diagnose_stacks), the
activations a smaller batch shrinks (diagnose_rows), how an unfinished run ended (diagnose_run_end), and the
remedies' prices (diagnose_remedies, diagnose_cache_remedies for beam search, diagnose_window_remedies for
sliding windows, diagnose_quantized_remedies for int4 and fp8 caches, diagnose_compressed_remedies for
DeepSeek-V4's cache).
"""

from __future__ import annotations

import numpy as np

from analyzers.budget import budget_crossing, budget_of, marker_step_at, step_at
from analyzers.caches import CROSS_ATTENTION, layer_list
from analyzers.kv_kept import KeptStorages
from analyzers.kv_views import split_by_view
from analyzers.model import OTHER, UNKNOWN_DEVICE, MemorySource
from analyzers.planning.decode_step_end import decode_step_end
from analyzers.planning.diagnose_allocator import allocator_facts
from analyzers.planning.diagnose_buffer_remedies import (
    PreallocatedBuffers,
    other_buffers_note,
    preallocated_buffers,
)
from analyzers.planning.diagnose_compressed_remedies import (
    NOT_ITS_CACHE,
    compressed_run,
    prompt_and_written,
)
from analyzers.planning.diagnose_engine_pool import pool_without_engine_files
from analyzers.planning.diagnose_fp8_window import slid_run
from analyzers.planning.diagnose_moment import (
    beams_at_step,
    held_at_step,
    kv_by_slot_at,
    layer_tokens_at_step,
    moment_index,
    other_token_bytes,
    peak_held_until,
    prompt_at_step,
    report_layer_tokens,
)
from analyzers.planning.diagnose_prefill import chunked_prefill, prefill_peak, run_call
from analyzers.planning.diagnose_remedies import price_remedies
from analyzers.planning.diagnose_rows import fixed_sizes, fixed_vector_bytes, row_activation_bytes, row_units
from analyzers.planning.diagnose_run_end import before_first_step, unfinished
from analyzers.planning.diagnose_stacks import live_sizes, moment_stacks
from analyzers.planning.diagnose_static_remedy import static_cache_run
from analyzers.planning.diagnose_weights_remedy import weights_bits, weights_remedy
from analyzers.planning.diagnosis import Diagnosis, Remedy, StackShare  # re-exported for callers
from analyzers.planning.grad_steps import grad_held
from analyzers.planning.kept_kv import kept_kv, kept_kv_note
from analyzers.planning.kept_outputs import kept_outputs
from analyzers.planning.run_cache_kind import logged_quantization
from analyzers.planning.run_kv_facts import (
    all_windowed,
    compute_dtype_bits,
    growing_bytes_per_token,
    kv_dtype_bits,
    kv_layers,
    layer_kind_token_bytes,
    layer_token_bytes,
    model_sliding_layers,
    prefill_packed_tokens,
    quantized_bits,
    quantized_cache,
    sliding_layer_ids,
    sliding_layers,
    token_elements,
)
from analyzers.run_end_notes import ended_notes
from analyzers.summary import Report, clock_time, input_notes
from analyzers.units import human_bytes

__all__ = ["Diagnosis", "Remedy", "StackShare", "diagnose"]


def diagnose(source: MemorySource, report: Report, budget_bytes: int | None = None) -> Diagnosis:
    """Diagnose the first OOM of an attributed source, or its peak; `budget_bytes` prices remedies
    against a memory budget when there is no OOM."""
    # The reader's notes, as the report gives them: how the run ended (a process that died may have been
    # killed for host memory), files missing, figures that are the KV log's only, a clock kvtrace set.
    notes = ended_notes(source)
    notes.extend(str(w) for w in (source.meta.get("manifest") or {}).get("warnings") or ())
    notes.extend(input_notes(source))
    peak_leaves_out = source.meta.get("peak_leaves_out")
    if budget_bytes is None:
        budget_bytes = budget_of(source)
    kv_log = source.meta.get("kv")
    oom = source.ooms[0] if source.ooms else None
    main = report.main_device
    device = oom.device if oom is not None else (main.device if main else None)
    dev_index = next((i for i, d in enumerate(source.devices) if d.device == device), None)
    timeline = report.timelines[dev_index] if dev_index is not None and report.timelines else None
    summary = next((d for d in report.devices if d.device == device), None)

    at_end = False  # a tracked preallocated tensor's peak that lasts to the run's end (its figures there)
    if oom is not None:
        event, when = "oom", oom.ts_us
        index = moment_index(timeline.ts_us, when) if timeline is not None else -1
        if oom.requested_bytes is None and oom.segment_bytes is None and timeline is not None and index >= 0:
            # A run's recorded exception has no request size; its last state is the moment.
            when = float(timeline.ts_us[index])
    else:
        event = "peak"
        index = int(np.argmax(timeline.allocated)) if timeline is not None and len(timeline.ts_us) else -1
        if index >= 0 and timeline is not None and report.kv.capacity_of in ("tracked", "buffers"):
            # Not the first view's track, which the peak's first event is: the tensor's last moment at it;
            # nor Meta's buffers before any forward wrote a row (profiler=False: the peak is there at step 0)
            index, at_end = peak_held_until(timeline.allocated, index)
        when = float(timeline.ts_us[index]) if index >= 0 and timeline is not None else None
        if at_end and when is not None and kv_log is not None and kv_log.series_t_ns:
            when = max(when, kv_log.series_t_ns[-1] / 1000.0)  # the KV log's last line, in the step it ends
    # The peak can be the level before the first event (blocks the trace frees but never allocates): the
    # report's peak is then that level, and the moment is the trace's start, not any event's state.
    at_start = oom is None and summary is not None and summary.peak_before_trace and index >= 0

    if at_start:
        index = 0
    at_dump = not at_start and (timeline is None or index >= len(timeline.ts_us) - 1)
    mem = allocator_facts(
        source, oom, summary, timeline, index, device, at_start, at_dump, budget_bytes, peak_leaves_out
    )
    notes.extend(mem.notes)
    allocated = mem.allocated_bytes

    crossing = None
    if oom is None and budget_bytes is not None:
        crossing = budget_crossing(source, report.timelines, budget_bytes)
        if crossing.crossed:
            event = "budget"
            notes.append(
                f"remedies are priced at the run's peak ({human_bytes(allocated)}), which must fit under "
                f"the {human_bytes(budget_bytes)} budget, not only at the step that first crossed it"
            )

    kv_bytes: int | None = None
    weights = 0
    if at_start and summary is not None:
        weights = summary.categories_at_peak.get("weights", 0)
    elif timeline is not None and index >= 0:
        weights = int(timeline.by_category["weights"][index])
    if at_start and summary is not None and report.kv.measured_from != "none":
        kv_bytes = summary.categories_at_peak.get("kv", 0)
    elif timeline is not None and index >= 0 and report.kv.measured_from != "none":
        kv_bytes = int(timeline.by_category["kv"][index])
    # What the moment needed beyond the weights (with the request an OOM refused): KV, activations, logits,
    # all of which a smaller batch shrinks. Unknown without a weights figure.
    beyond_weights = None
    if weights and allocated is not None:
        beyond_weights = allocated + (mem.needed_bytes or 0) - weights
    kv_peak = report.kv.peak_bytes if kv_log is not None else None
    kv_final = report.kv.final_bytes if kv_log is not None else None

    step = phase = prompt = beams = held_step = stored = written = None
    # DeepSeek-V4's cache (its run's model_config.json says): priced by part, as `kvtrace plan` counts it
    model_dtype = (report.geometry or {}).get("dtype")
    compressed = compressed_run(source.path, model_dtype) if source.kind == "run" else None
    layer_tokens: dict[int, int] = {}
    rows_are_beams = step_cut = False
    top_layers: tuple[tuple[int, int], ...] = ()
    kv_layers_live = 0
    top_cache_layers: tuple[tuple[int, int, int], ...] = ()
    by_layer: dict[int, int] = {}
    # The KV at the moment in the other caches beside the main one (an assistant model's draft cache, an
    # earlier call's), which the main model's cache settings do not reach
    other_kv = 0
    batch, tokens_held = report.kv.batch, report.kv.tokens_held
    cross_ids = {c.cache for c in report.kv.caches if c.role == CROSS_ATTENTION}
    # The cross-attention KV (an encoder's output, Mllama's image): a fixed cost that no token remedy touches
    cross_kv = sum(c.final_bytes for c in report.kv.caches if c.cache in cross_ids)
    if kv_log is not None and kv_log.step_start_ns:
        # The moment's step as the budget crossing names it (the step ranges first, then the KV log's steps)
        step, phase = step_at(source, when) if when is not None else (max(kv_log.step_start_ns), None)
        if step is None:  # before every step began
            step = min(kv_log.step_start_ns)
        phase = kv_log.step_phase.get(step) or phase
        # What is held at its end is the log's: the last step of it up to this one (a forward with no KV
        # update has none of its own)
        held = max((s for s in kv_log.step_start_ns if s <= step), default=step)
        if kv_log.cut is not None and step == kv_log.cut.step:
            step_cut = True
            if kv_log.cut.raised:
                # Its forward raised (an OOM, a Ctrl-C): the report ends at that moment, each layer holding
                # what it held then (the ones the step reached a token more), which the remedies price
                held = None
                layer_tokens = report_layer_tokens(report, report.kv.main_cache)
                prompt = prompt_at_step(report, kv_log, step)
            else:
                # Killed part-way: what is held at a step's end is the last whole step's (the report ends
                # there too)
                held_step = held = kv_log.cut.whole_step
        if held is not None:
            batch, tokens_held = held_at_step(report, kv_log, held)
            beams, rows_are_beams = beams_at_step(report, kv_log, held, batch)
            prompt = prompt_at_step(report, kv_log, held)
            layer_tokens = layer_tokens_at_step(report, kv_log, held)
            if at_end:  # the report's end state: views tracked after the step's forward are past its end
                batch, tokens_held = report.kv.batch, report.kv.tokens_held
                layer_tokens = report_layer_tokens(report, report.kv.main_cache)
            live = kv_log.step_cache_live.get(held)
            if live is not None:
                cross_kv = sum(nbytes for (cache, _), nbytes in live.items() if cache in cross_ids)
                stored = sum(live.values())
        if dev_index is not None and index >= 0 and not at_start:
            by_slot = kv_by_slot_at(source.devices[dev_index], index)
            if kv_log.storage_shares:  # storages shared by several layers' views, placed whole by the join
                at_us = float(source.devices[dev_index].ts_us[index])
                by_slot = split_by_view(by_slot, kv_log.storages, kv_log.storage_shares, at_us)
            for (_, layer), nbytes in by_slot.items():
                by_layer[layer] = by_layer.get(layer, 0) + nbytes
            top_layers = tuple(sorted(by_layer.items(), key=lambda item: (-item[1], item[0])))[:8]
            kv_layers_live = sum(1 for nbytes in by_layer.values() if nbytes > 0)
            other_kv = sum(
                nbytes
                for (cache, _), nbytes in by_slot.items()
                if cache != report.kv.main_cache and cache not in cross_ids
            )
            if len({cache for cache, _ in by_slot}) > 1:
                ranked = sorted(by_slot.items(), key=lambda item: (-item[1], item[0]))[:8]
                top_cache_layers = tuple((cache, layer, nbytes) for (cache, layer), nbytes in ranked)
        if compressed is not None:  # its prompt and tokens written, of which its window holds a few
            run = source.meta.get("run")
            samples = run.memory_samples if run is not None else []
            moment = prompt_and_written(
                samples, kv_log.step_phase, held if held is not None else step, prompt
            )
            prompt, written = moment if moment is not None else (prompt, None)
    elif when is not None:
        step, phase = marker_step_at(source, when)
    if prompt == 0 and step is not None:  # a quantized cache's prefill holds its prompt packed, not as data
        prompt = prefill_packed_tokens(source, report.kv.main_cache, step) or prompt

    # The context plan counts for the run (prompt + new tokens), where the moment is in the call it plans,
    # and what a moment inside its prefill holds that a shorter prompt or a chunked prefill changes
    call = run_call(source, report, step)
    run_prompt, run_context = (call.prompt, call.context) if call is not None else (None, None)
    prefill = chunked = None
    if phase == "prefill" and not step_cut and not at_start and main is not None and device == main.device:
        chunked = chunked_prefill(source, report.kv.main_cache, step)
        if chunked is None:  # a chunked prefill's activations follow its chunk, not the prompt
            prefill = prefill_peak(source, report, index, batch, run_prompt or prompt, run_context)

    top = moment_stacks(source, dev_index, index, at_start, at_dump, summary, allocated)
    # The activations live then that a smaller batch shrinks besides its KV (logits, attention's copies)
    row_activations = fixed_vectors = None
    if dev_index is not None and index >= 0 and not at_start and batch and source.kind == "run":
        positions = max(tokens_held or 0, report.kv.tokens_held or 0, report.kv.capacity_tokens or 0) + 1
        others = live_sizes(source.devices[dev_index], index, OTHER)
        units, fixed = row_units(report.geometry), fixed_sizes(report.geometry)
        row_activations = row_activation_bytes(others, batch, units, positions, fixed)
        fixed_vectors = fixed_vector_bytes(others, batch, units, positions, fixed)
    # A run that peaked at its prefill: fewer rows can make a decode step's end the peak, its vectors over
    # the vocabulary kept (analyzers.planning.decode_step_end, as `kvtrace plan --from-run` prices it)
    step_end = None
    at_prefill = phase == "prefill" and not step_cut and main is not None and device == main.device
    if at_prefill and row_activations is not None and allocated is not None:
        step_end = decode_step_end(source, report, batch)

    # What a cache that grows by copies (a DynamicCache's torch.cat) stores by arithmetic at the moment:
    # under grad the graph keeps the replaced copies beside it. Not for preallocated room (buffers, a
    # StaticCache, tracked views), nor a window's spare positions, which hold more than the tokens by design.
    per_token = report.kv.bytes_per_token_expected
    grows = report.kv.capacity_of is None and not report.kv.bytes_per_token_note
    arithmetic = per_token * tokens_held * batch if grows and per_token and tokens_held and batch else None
    fields: dict[str, object] = {
        "kv_bytes": kv_bytes,
        "batch": batch,
        "tokens_held": tokens_held,
        "shortfall_bytes": mem.shortfall_bytes,
        "kv_peak_bytes": kv_peak,
        "kv_final_bytes": kv_final,
        "reserved_unallocated_bytes": mem.reserved_unallocated_bytes,
        # no free block held the request though the bytes were there: a remedy that frees bytes must then
        # fit even if none of the reserved-but-unallocated ones is reused (diagnose_fragments)
        "fragmented": mem.fragmented,
        "fragmentation_possible": mem.fragmentation_possible,
        "reserved_before_trace": at_start,  # what the allocator had cached earlier: no slack of a peak
        "bytes_per_token": growing_bytes_per_token(report),
        "windowed": all_windowed(report),
        "sliding_layers": sliding_layers(report),
        "model_sliding_layers": model_sliding_layers(report),  # the config's: a cache's own window is not
        # what a hybrid cache's layers hold at the moment: its sliding ones may hold the prompt then
        "sliding_layer_ids": sliding_layer_ids(report),
        "window": (report.geometry or {}).get("sliding_window"),
        "layer_token_bytes": layer_token_bytes(report),
        # a sliding layer's and a full layer's: Gemma 4's full layers are wider, and only they follow the
        # context once the sliding ones hold their window
        "kind_token_bytes": layer_kind_token_bytes(report),
        "kv_layers": kv_layers(report),
        # each layer's tokens then: a step stopped between its layers' updates leaves them holding different
        # counts, and a prefill's last layers none
        "layer_tokens": layer_tokens,
        "cross_kv_bytes": min(cross_kv, kv_bytes) if kv_bytes is not None else cross_kv,
        # the other caches' KV then (an assistant's draft cache), and a token of context in those that
        # follow it (written during the call): a window, quantization or offloading on the model's cache
        # leave them as they are, a shorter context shrinks those too (`_other_caches`)
        "other_cache_kv_bytes": min(other_kv, kv_bytes) if kv_bytes is not None else other_kv,
        "other_cache_token_bytes": other_token_bytes(report, kv_log, cross_ids) if other_kv else 0.0,
        "layer_bytes": by_layer,
        "step_phase": phase,
        "prompt_tokens": prompt,
        # the prompt and context (prompt + new tokens) of the call `plan --from-run` plans, where the moment
        # is in it: what a shorter context is named against (None: not told)
        "run_prompt": run_prompt,
        "run_context": run_context,
        # below run_context where the run was cut short (or goes on: `run_live`), planned as launched
        "run_reached": call.reached if call is not None else None,
        "run_live": call.live if call is not None else False,
        "prefill_peak": prefill,  # a whole prefill's moment: what a shorter prompt or chunks change
        "prefill_chunk": chunked,  # the first chunk's tokens, where the prefill ran in chunks
        "beams": beams,
        "rows_are_beams": rows_are_beams,
        "compute_bits": compute_dtype_bits(report),
        "model_dtype": (report.geometry or {}).get("dtype"),
        "quantized_cache": quantized_cache(source),  # a static cache or a window would keep the model's dtype
        "quantized_bits": quantized_bits(source, report),  # its packed values' bits: int4 or fp8
        "quantized_layout": logged_quantization(source, report),  # (q_group_size, residual_length) logged
        # what the cache stores at the end of the moment's step, without its updates' transient copies
        "kv_stored_bytes": stored,
        "token_elements": token_elements(report, kv_dtype_bits(source, report)),
        "row_activation_bytes": row_activations,
        "fixed_vector_bytes": fixed_vectors,  # the logits processors' vectors over the vocabulary
        "beyond_weights_bytes": beyond_weights,
        "decode_step_end": step_end,
        # the moment's bytes, the shortfall's measure: with the request an OOM refused
        "moment_bytes": None if allocated is None else allocated + (mem.needed_bytes or 0),
        "kv_logged": kv_log is not None,  # a run recorded with kvtrace: its KV geometry is known
        # a model's own preallocated cache_k/cache_v, as live at the moment
        "buffers": preallocated_buffers(report, kv_log, None if at_start else when),
        "compressed": compressed,  # DeepSeek-V4's cache (`diagnose_compressed_remedies`), None otherwise
        "tokens_written": written,  # its tokens written a row at the moment's step
        # what the moment's generate() call keeps for every step (output_scores, ...), held beside the KV
        "kept_outputs": None if at_start else kept_outputs(source, dev_index, index, step),
        # what autograd keeps of the forwards run with grad enabled (a loop of one's own without no_grad)
        "grad_held": None if at_start else grad_held(source, dev_index, index, step, kv_bytes, arithmetic),
        # the K/V storages the cache replaced that something outside it holds (a list of past keys/values)
        "kept_kv": None if at_start or kv_log is None else kept_kv(source, when),
        # the memory figures count every allocation (else the KV log's and the weights' alone)
        "allocator_events": not source.kv_log_only,
        # what a run whose cache kept its own window held at its last update, where an fp8 cache's peaks
        "slid_run": slid_run(source, report, call)
        if sliding_layers(report) and not model_sliding_layers(report)
        else None,
        # what the run held beside its KV, which a static cache's preallocated KV would go beside
        "static_run": None
        if at_start or main is None or device != main.device or allocated is None
        else static_cache_run(source, report, allocated + (mem.needed_bytes or 0), kv_bytes, batch),
    }
    if compressed is not None:
        notes.append(NOT_ITS_CACHE)
    if isinstance(fields["kept_kv"], KeptStorages):
        notes.append(kept_kv_note(fields["kept_kv"], kv_bytes))
    buffers = fields["buffers"]
    if isinstance(buffers, PreallocatedBuffers) and buffers.held_bytes and kv_bytes:
        note = other_buffers_note(buffers, kv_bytes)
        if note:
            notes.append(note)
    held = [cache for cache in report.kv.caches if cache.final_bytes]
    if len(held) > 1:
        cross = [c for c in held if c.role == CROSS_ATTENTION]
        named = "".join(
            f"; cache {c.cache} is the cross-attention KV of the image(s) in {layer_list(c.cross_layers)} of "
            f"cache {c.cross_attention_of} ({c.tokens} vision tokens), a fixed cost no token remedy shrinks"
            if c.cross_attention_of is not None and c.cross_layers is not None
            else f"; cache {c.cache} is the cross-attention KV of encoder-decoder cache {c.encoder_decoder}, "
            f"held at the encoder's length ({c.tokens} tokens)"
            for c in cross
        )
        named += "".join(f"; cache {c.cache} is {c.module}" for c in held if c.module)
        notes.append(
            f"{len(held)} KV caches were held at the end: the KV at this moment counts them all; tokens held "
            f"and the price of a token are the main cache's (cache {report.kv.main_cache}){named}"
        )
    model_layers = kv_layers(report)
    if layer_tokens and model_layers and len(layer_tokens) < model_layers:
        notes.append(
            f"the KV at this moment is on {len(layer_tokens):,} of the model's {model_layers:,} KV layers: "
            f"step {held_step or step} stopped before the others held any; the remedies price a token at "
            "every layer's KV, which the step needs, and the shortfall is this moment's, before theirs"
        )
    layers = (report.geometry or {}).get("num_layers")
    # A device the input does not name (a memory timeline's) may be a GPU: its remedies stay offered.
    on_cuda = device is None or device == UNKNOWN_DEVICE or device.startswith("cuda")
    if not on_cuda:
        notes.append(
            f"the run is on {device}: offloading KV to the CPU and CUDA allocator settings do not apply"
        )
    remedies = price_remedies(
        fields, kv_dtype_bits(source, report), layers if isinstance(layers, int) else None, on_cuda
    )
    limit, limit_name = budget_bytes, "budget"
    if event != "budget":
        limit, limit_name = (
            (mem.limit_bytes, "per-process cap") if mem.limit_bytes else (mem.capacity_bytes, "device")
        )
    recorded = source.meta.get("run")
    too_heavy = weights_remedy(
        weights,
        limit,
        limit_name,
        mem.shortfall_bytes,
        weights_bits(recorded.weights if recorded is not None else (), compute_dtype_bits(report)),
        source.path if source.kind == "run" else None,
    )
    if too_heavy is not None:  # before the KV remedies, none of which can fit
        remedies = [too_heavy, *remedies]
    pool = pool_without_engine_files(source, report)
    if pool is not None:  # an engine's pool: its rows are blocks, and no generate() remedy resizes it
        notes.append(pool)
        remedies, batch, tokens_held, beams = [], None, None, None
    return Diagnosis(
        path=source.path,
        source_kind=source.kind,
        device=device,
        event=event,
        ts_us=clock_time(source, device, when) if device is not None else when,
        requested_bytes=mem.requested_bytes,
        segment_bytes=mem.segment_bytes,
        allocated_bytes=allocated,
        reserved_bytes=mem.reserved_bytes,
        free_bytes=mem.free_bytes,
        limit_bytes=mem.limit_bytes,
        free_within_limit_bytes=mem.free_within_limit_bytes,
        capacity_bytes=mem.capacity_bytes,
        reserved_unallocated_bytes=mem.reserved_unallocated_bytes,
        largest_free_block_bytes=mem.largest_free_block_bytes,
        fragmented=mem.fragmented,
        fragmentation_possible=mem.fragmentation_possible,
        held_from_message=mem.held_from_message,
        private_pool_bytes=mem.private_pool_bytes,
        shortfall_bytes=mem.shortfall_bytes,
        budget_bytes=budget_bytes,
        kv_bytes=kv_bytes,
        kv_share=(kv_bytes / allocated) if kv_bytes is not None and allocated else None,
        kv_peak_bytes=kv_peak,
        kv_final_bytes=kv_final,
        batch=batch,
        tokens_held=tokens_held,
        step=step,
        step_phase=phase,
        top_layers=top_layers,
        kv_layers_live=kv_layers_live,
        top_stacks=top,
        remedies=tuple(remedies),
        message=oom.message if oom is not None else None,
        notes=tuple(notes),
        budget_crossing=crossing,
        beams=beams,
        top_cache_layers=top_cache_layers,
        peak_leaves_out=peak_leaves_out,
        unfinished=unfinished(source),
        before_first_step=before_first_step(source, report),
        held_step=held_step,
        step_cut=step_cut,
        row_activation_bytes=row_activations,
        kv_figures=kv_log is not None or report.kv.measured_from != "none",
    )
