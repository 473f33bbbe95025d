"""What a run says about itself: the manifest (written at the start, rewritten at the end with how the run
ended and the warnings that make its figures incomplete); the model's weights (`weights.jsonl`) are
`kvtrace.model_weights`'s.

`Recording` inherits `RunManifest`.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvtrace import format as fmt
from kvtrace.geometry import model_geometry
from kvtrace.json_writes import write_bytes_atomic, write_json_atomic, write_json_in_place
from kvtrace.model_forward import SubmoduleCall, running_submodule
from kvtrace.options import RecordOptions

if TYPE_CHECKING:
    from kvtrace.call_masks import CallMasks
    from kvtrace.integrations.hf_caches import HfCacheHooks
    from kvtrace.integrations.hf_generate import GenerateCalls
    from kvtrace.integrations.hf_paged import PagedAttentionHooks
    from kvtrace.integrations.module_caches import ModuleCaches
    from kvtrace.kv_tracker import KvTracker
    from kvtrace.model_weights import ModelWeights


class RunManifest:
    """Builds and writes a recording's manifest and weights (a mixin of `Recording`, which sets these)."""

    path: Path
    model: Any
    options: RecordOptions
    tracker: KvTracker
    _clock: Callable[[], int]
    _manifest: dict[str, Any]
    _hf: HfCacheHooks | None
    _modules: ModuleCaches | None
    _paged: PagedAttentionHooks | None
    _weights: ModelWeights | None
    _module_tokens_unknown: int
    _forwards_elsewhere: int
    _model_caches: set[int]
    _caches_in_generate: set[int]
    _caches_elsewhere: set[int]
    _submodule_caches: dict[int, SubmoduleCall]
    _thread: int
    _step_open: bool
    _step_thread: int
    _beside: dict[int, list[Any]]
    _calls: GenerateCalls | None
    _forwards_beside: int
    _ended_mid_forward: bool
    _raised_step: int | None
    _write_error: str | None
    _trace_error: str | None
    _call_masks: CallMasks
    _manifest_lock: threading.Lock
    _manifest_ending: bool  # the block is ending (or this is a forked child): only the end writes it
    _calls_unwritten: bool  # a generate() call began since the manifest last said the calls
    event_count: int
    events_lost: int
    notes: list[str]

    def _device_facts(self) -> dict[str, Any]:
        """The manifest's `device`: the model's GPU, else the host (its name and memory)."""
        model_device = device_of(self.model)
        if model_device is not None and model_device.type == "cuda":
            props = torch.cuda.get_device_properties(model_device)
            return {
                "type": "cuda",
                "index": model_device.index or 0,
                "name": props.name,
                "total_memory_bytes": int(props.total_memory),
            }
        device: dict[str, Any] = {"type": "cpu", "name": platform.processor() or platform.machine()}
        with contextlib.suppress(OSError, ValueError):
            device["total_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return device

    def _initial_manifest(self) -> dict[str, Any]:
        from kvtrace import __version__

        try:
            import transformers

            transformers_version: str | None = transformers.__version__
        except ImportError:
            transformers_version = None
        device = self._device_facts()
        anchor_ns = self._clock()
        return {
            "format": "kvtrace-run",
            "schema_version": fmt.SCHEMA_VERSION,
            "kvtrace_version": __version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers_version,
            "python_version": sys.version.split()[0],
            "platform": platform.platform(),
            "pid": os.getpid(),
            "device": device,
            "model": model_geometry(self.model, self.notes),
            "clock": {
                "kind": "unix_ns",
                "anchor_unix_ns": anchor_ns,
                "anchor_perf_counter_ns": time.perf_counter_ns(),
                "profiler_alignment": "trace ts (us) + baseTimeNanoseconds/1000 = unix us = t_ns/1000",
            },
            "options": self.options.to_json(),
            "started_ns": anchor_ns,
            "ended": {"status": "running"},
        }

    def _warnings(self) -> list[str]:
        """What makes the run's figures incomplete, for reports to say (`notes` say what was not recorded)."""
        warnings = []
        steps = self.tracker.step
        paged = self._paged is not None and self._paged.owns_steps  # its pool is logged, its steps counted
        # A pool whose layout kvtrace does not read says so itself: the generic "no KV" advice would mislead
        unread = self._paged is not None and self._paged.unread_pool
        no_kv = steps and not self.event_count and self.model is not None and not paged and not unread
        raised = self._hf.update_error if self._hf is not None else None
        if no_kv and raised:  # the cache is followed, but its own update raised before it could be logged
            warnings.append(
                f"no KV was logged in {steps} forward pass{'es' if steps > 1 else ''}: the cache's own "
                f"update raised ({raised}) before kvtrace could log what it wrote"
            )
        elif no_kv and steps == 1 and self._raised_step == 1:
            # Its only forward raised before any layer reached the cache: nothing tells what cache it had
            warnings.append(
                "no KV was logged in 1 forward pass: the model's forward raised in step 1, before any "
                "layer's KV cache update, so it generated no token (the block's exception says why)"
            )
        elif no_kv:
            warnings.append(
                f"no KV cache update was seen in {steps} forward pass{'es' if steps > 1 else ''}: "
                "use_cache=False, or a cache kvtrace "
                "does not follow (it follows transformers' Cache classes, and continuous batching's "
                "PagedAttentionCache when it is made inside the block: start the manager there; custom "
                "caches are not: name them with record(cache_attrs=...) or kvtrace.track())"
            )
        updated = self._hf.updates_seen if self._hf is not None else 0
        if not steps and updated and self.model is not None and not paged:
            warnings.append(self._no_steps_warning(updated))
        if self._module_tokens_unknown and self._modules is not None:
            names = ", ".join(sorted({owner.attr for owner in self._modules.owners}))
            warnings.append(
                f"the model's own KV buffers ({names}) were written {self._module_tokens_unknown} times "
                "without saying where: kvtrace reads the tokens they hold from a forward's int `start_pos` "
                "(or int second argument, `model(ids, pos)`) and its input's length (Meta's reference "
                "Llama), so their token counts are unknown (logged "
                "as 0), and tokens held, generated tokens and tokens/s are left out"
            )
        if self._hf is not None and self._hf.unexplained:
            warnings.append(self._hf.unexplained)
        if self._paged is not None:
            warnings.extend(self._paged.warnings)
        weights = self._weights
        if weights is not None:
            warnings.extend(weights.warnings())
        others = self._other_caches()
        if others:
            warnings.append(self._other_caches_warning(others, steps))
        if steps and self._submodule_caches:
            warnings.append(self._submodule_caches_warning())
        if self._forwards_beside:
            warnings.append(
                f"{self._forwards_beside} of {steps} forward passes of the model began while another of its "
                "forwards was running on another thread (generate() called from several threads at once): "
                "each forward begins a step, but the log holds one step at a time, so the KV events of "
                "overlapping forwards carry the step and phase of the one that began last, and the step "
                "count (a step all of whose writes came later is missing), phases and per-step figures of "
                "those steps are not reliable"
            )
        if self._ended_mid_forward:
            warnings.append(
                "the record() block ended while a forward of the model was running on another thread (a "
                "generate() still going, e.g. beside a TextIteratorStreamer): the last step is partial, "
                "logged only as far as that forward had got (its layers may hold different token counts), "
                "and the final KV figures are taken in the middle of it"
            )
        if self._forwards_elsewhere and self.options.profiler:
            warning = (
                f"{self._forwards_elsewhere} of {steps} forward passes ran on another thread than the one "
                "that entered record(): torch.profiler records memory events of its own thread only, so the "
                "trace misses theirs (the KV log has them all)"
            )
            # Some, not all (with all of them, readers take the KV log's figures): the trace is read
            if self._forwards_elsewhere < steps:
                warning += (
                    "; the measured peak, its categories and the budget leave out what those forwards "
                    "allocated, their KV included"
                )
            warnings.append(warning)
        return warnings

    def _no_steps_warning(self, updated: int) -> str:
        """The model ran no forward, yet a cache was updated: in forwards of a submodule of the model called
        directly (`model.model(...)`), when every cache was first updated in one, else another model's."""
        head = (
            f"the KV cache was updated at layer 0 {updated} times, but never in a forward of the model "
            f"passed to record() ({type(self.model).__name__}): "
        )
        tail = "so the log has no steps, and per-step figures and tokens/s are left out"
        caches = len(self._hf.ids_given()) if self._hf is not None else 0
        if not self._submodule_caches or len(self._submodule_caches) < caches:
            return f"{head}another model generated, {tail}"
        call = next(iter(self._submodule_caches.values()))
        warning = (
            f"{head}in forwards of its submodule model{call.path} ({call.kind}), called directly, which "
            f"begin no step, {tail}"
        )
        if call.record_path is not None:
            warning += f"; record(model=model{call.record_path}) has them"
        return warning

    def _submodule_caches_warning(self) -> str:
        """Caches first updated in forwards of a submodule of the model called directly, beside the model's
        own forwards: theirs begin no step, so those updates are logged within the model's steps."""
        cids = sorted(self._submodule_caches)
        several = len(cids) > 1
        call = self._submodule_caches[cids[0]]
        warning = (
            f"transformers cache{'s' if several else ''} {', '.join(str(cid) for cid in cids)} (the KV log's "
            f"`cache`) {'were' if several else 'was'} updated in forwards of submodule model{call.path} "
            f"({call.kind}) of the model passed to record() ({type(self.model).__name__}), called directly: "
            "those forwards begin no step, so their updates are logged within the steps of the model's own "
            "forwards"
        )
        if call.record_path is not None:
            warning += f" (record(model=model{call.record_path}) makes them steps)"
        return warning

    def _other_caches_warning(self, others: list[int], steps: int) -> str:
        """Another model's caches: counted in the KV totals, not the headline's; and, where the profiler's
        trace is read (not every forward of the model ran elsewhere), those first used on another thread
        are not in it: what the memory figures hold of them is the readers' to say (a note)."""
        several = len(others) > 1
        their, its = ("their", "Their") if several else ("its", "Its")
        trace_read = self.options.profiler and not 0 < steps <= self._forwards_elsewhere
        unseen = [cid for cid in others if cid in self._caches_elsewhere] if trace_read else []
        if not unseen:
            counted = "in the KV totals and the memory figures (the process held it)"
        elif len(unseen) < len(others):
            seen = ", ".join(str(cid) for cid in others if cid not in unseen)
            counted = f"in the KV totals (the process held it), and cache {seen}'s in the memory figures"
        else:
            counted = "in the KV totals (the process held it)"
        warning = (
            f"transformers cache{'s' if several else ''} {', '.join(str(cid) for cid in others)} (the KV "
            f"log's `cache`) {'were' if several else 'was'} updated outside the forwards and generate() "
            f"calls of the model passed to record() ({type(self.model).__name__}): another model generated "
            f"in the block. {its} KV is counted {counted}, and {their} updates are logged within the "
            "recorded model's steps; tokens held, batch, bytes per token and tokens/s are those of the "
            "caches the model's forwards were given"
        )
        if unseen:
            many = len(unseen) > 1
            warning += (
                f". Cache{'s' if many else ''} {', '.join(str(cid) for cid in unseen)} "
                f"{'were' if many else 'was'} first used on another thread than the one that entered "
                "record(), the only thread whose memory events torch.profiler records: the trace has none of "
                "that model's allocations (its KV, its activations), and the measured peak, its categories "
                "and the budget hold them only as the notes say"
            )
        return warning

    def _caches_and_threads(self) -> dict[str, Any]:
        """The manifest's `model_caches`, `encoder_decoder_caches`, `cross_attention_parts`, `module_caches`,
        `other_caches`, `other_caches_on_other_threads` and `forwards_on_other_threads`, when there are any:
        which caches the figures describe (a module cache's module), and whether the profiler's trace saw the
        model's forwards and the other caches."""
        facts: dict[str, Any] = {}
        if self._model_caches:
            facts["model_caches"] = sorted(self._model_caches)
        if self._hf is not None and self._hf.encoder_decoder:
            facts["encoder_decoder_caches"] = [
                {"cache": cid, "self_attention": own, "cross_attention": cross}
                for cid, (own, cross) in sorted(self._hf.encoder_decoder.items())
            ]
        if self._hf is not None and self._hf.cross_parts:
            layers = sorted(self._hf.cross_layers)
            facts["cross_attention_parts"] = [
                {"cache": cid, "cross_attention": part, "layers": layers}
                for cid, part in sorted(self._hf.cross_parts.items())
            ]
        if self._modules is not None and self._modules.named:
            facts["module_caches"] = [
                {"cache": cache, "module": module, "k": k_attr, "v": v_attr}
                for cache, module, k_attr, v_attr in self._modules.named
            ]
        others = self._other_caches()
        if others:
            facts["other_caches"] = others
            elsewhere = [cid for cid in others if cid in self._caches_elsewhere]
            if elsewhere:
                facts["other_caches_on_other_threads"] = elsewhere
        if self._forwards_elsewhere and self.options.profiler:
            facts["forwards_on_other_threads"] = {
                "forwards": self._forwards_elsewhere,
                "steps": self.tracker.step,
            }
        return facts

    def _cache_made(self, cache_id: int) -> None:
        """A cache got its id (`HfCacheHooks.on_new_cache`), on the thread that first used it: one made inside
        the model's generate() on that thread (an assistant's draft cache) is part of the model's work; one
        first updated in a forward of the model on its thread (transformers makes a DynamicCache when none is
        passed) is the model's own; one updated in a forward of a submodule of the model called directly
        (`model.model(...)`) is no other model's either. One first used on another thread than the block's
        is in no memory event of the profiler's trace."""
        thread = threading.get_ident()
        if thread != self._thread:
            self._caches_elsewhere.add(cache_id)
        calls = self._calls
        if calls is not None and calls.in_call():
            self._caches_in_generate.add(cache_id)
        elif (self._step_open and thread == self._step_thread) or thread in self._beside:
            self._model_caches.add(cache_id)
        elif self.model is not None:
            call = running_submodule(self.model)
            if call is not None:
                self._submodule_caches[cache_id] = call

    def _other_caches(self) -> list[int]:
        """The transformers caches of the log that no forward of the recorded model was given, first used
        outside its generate() calls: another model's (a second model served in the block, sequentially or on
        another thread). Empty without a model, or when the model ran no forward (another warning says so)."""
        hf = self._hf
        paged = self._paged is not None and self._paged.owns_steps
        if hf is None or self.model is None or paged or not self.tracker.step:
            return []
        mine = self._model_caches | self._caches_in_generate | self._submodule_caches.keys()
        return [cid for cid in hf.ids_given() if cid not in mine]

    def _note_call_begun(self) -> None:
        """At a generate() call's first forward, on the model's thread: the manifest is to say the calls
        begun so far (`_write_calls_begun`, by the writer thread within its 0.1 s). One attribute set: a
        manifest written here cost the prefill ~1 ms a call."""
        self._calls_unwritten = True

    def _write_calls_begun(self) -> None:
        """With each flush (the writer thread's, every 0.1 s): the manifest rewritten with the generate()
        calls begun so far (`generate_calls`, each with the length it asked for), so that a process killed in
        one (the kernel's OOM killer's SIGKILL, after which nothing is written) still says what it asked for,
        which `plan --from-run` plans it at; its prefill's end sample, which says it too, is never written.
        One file of the start's reserved size (kept for the final manifest on a full disk, where this write
        fails and the file stays as it was), no tensor read."""
        if not self._calls_unwritten:
            return
        with self._manifest_lock:
            self._calls_unwritten = False
            if self._manifest_ending:
                return
            manifest = {**self._manifest, "generate_calls": self._call_masks.begun()}
            # the final manifest's own fallbacks follow; RuntimeError: a list of it changed as it was written
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                write_json_atomic(self.path / fmt.MANIFEST, manifest, reserve=fmt.MANIFEST_RESERVE_BYTES)

    def _end_calls_written(self) -> None:
        """The block is ending: from here the manifest is the end's to write, a late call's never."""
        with self._manifest_lock:
            self._manifest_ending = True

    def _write_manifest(self) -> None:
        """The final manifest; on a full disk (no room for the atomic write's new file), over the blocks
        the first one reserved. With every log whole, that manifest is complete and so is the run (a note
        says the write fell back); after a log that lost lines, or when the manifest cannot be written at
        all, it says that the run failed to write: readers then refuse it in one line, instead of taking it
        for a run whose process died."""
        path = self.path / fmt.MANIFEST
        try:
            write_json_atomic(path, self._manifest)
            return
        except OSError as error:
            why = error.strerror or str(error)
        if self._write_error is None:
            note = f"{fmt.MANIFEST} written over the room reserved at start: its atomic write failed ({why})"
            self.notes.append(note)
            try:
                write_json_in_place(path, self._manifest)
                return
            except OSError as error:
                self.notes.remove(note)
                self._write_error = f"{path}: cannot write ({error.strerror or error})"
        ended = self._manifest["ended"]
        ended.pop("trace_error", None)
        ended["write_error"] = self._trace_error or self._write_error  # the first file not written
        ended["kv_events_lost"] = self.events_lost
        with contextlib.suppress(OSError):  # else it stays "running", as if the process died
            write_json_in_place(path, self._manifest)


def write_model_config(folder: Path, model: Any) -> str | None:
    """model_config.json: the model's Hugging Face config as transformers writes a config.json (every field,
    defaults included), so that `kvtrace plan --from-run` plans this model as `--config` would, layer types
    and positions included, which the manifest's geometry summarizes. None when written or when the model
    has no such config (Meta's reference model: the manifest's geometry is all); else a note saying why."""
    config = getattr(model, "config", None)
    to_json = getattr(config, "to_json_string", None)
    if not callable(to_json):
        return None
    try:
        text = to_json(use_diff=False)
    except Exception as exc:  # a custom config whose fields JSON cannot hold
        return f"model_config.json not written: the model's config cannot be written as JSON ({exc})"
    try:
        write_bytes_atomic(folder / fmt.MODEL_CONFIG, text.encode("utf-8"))
    except OSError as exc:
        return f"model_config.json not written: {exc.strerror or exc}"
    return None


def device_of(model: Any) -> torch.device | None:
    """The device of the model's first parameter; None without a model or a parameter."""
    if model is None:
        return None
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError, TypeError):
        return None
