"""The step logic of a recording: which forward begins a step (a prefill, a decode step, a chunk of a chunked
prefill, a forward nested in another), and what its end logs and samples.

`Recording` inherits `ForwardSteps`, so these run as its own methods: `_pre_forward` and `_post_forward`
are the hooks around every model forward, the path benchmarks/recorder_overhead.py measures, and plain
`self.x` access keeps it as cheap as it was inside recorder.py.

Threads: the log holds one step at a time (a step's events come before the next step's). A forward of the
model that begins on another thread while a step is open (generate() called from two threads at once) is
not nested in that step: it begins a step of its own ("beside" the open one), but its layer updates and the
open step's share the log's time line, so each event carries the step and phase of the forward that began
last, and the manifest warns. Only the open step's thread is compared, and only when a step is open.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kvtrace.forward_inputs import ForwardSignature, is_prefill, new_tokens
from kvtrace.model_forward import RAISED
from kvtrace.planned_steps import PlannedSteps

if TYPE_CHECKING:
    from kvtrace.call_masks import CallMasks
    from kvtrace.integrations.hf_generate import CallStart


class ForwardSteps(PlannedSteps):
    """A recording's steps, told from its model's forwards (a mixin of `Recording`, which sets these; the
    state the planned decode step shares is declared on `PlannedSteps`)."""

    _signature: ForwardSignature
    _module_tokens_unknown: int
    model: Any
    _prefill_continues: bool
    _model_caches: set[int]
    _forwards_beside: int
    _call_masks: CallMasks
    _raised_step: int | None  # the last step whose forward raised (the manifest's warnings say so)

    if TYPE_CHECKING:  # `RunManifest`'s, which `Recording` inherits too

        def _note_call_begun(self) -> None: ...

    def _pre_forward(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        offer = self._decode_next
        if offer is not None and self._decode_step(offer, args, kwargs):
            return
        if self._paged is not None and self._paged.in_step:  # a continuous-batching step is the step
            if self._profiler_on and threading.get_ident() != self._thread:
                self._forwards_elsewhere += 1
            return
        if (self._step_open or self._beside) and self._forward_beside(args, kwargs):
            return
        hf = self._hf
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")
        continued = self._prefill_continues
        if continued:  # the next chunk of a chunked prefill, left open by the last forward's end
            self._prefill_continues = False
            if self._calls is None or not self._calls.in_call():  # its generate() call ended in between
                self._end_step()
                continued = False
        if self._step_open and not continued and self._stale(cache):
            # The last forward's end never completed (kvtrace's forward runs it in a `finally`; this is the
            # guard for an end that raised part-way): its step ends here, and this forward starts its own.
            self._settle_deferred()
            self._end_step()
        elif self._step_cache is not None and self._step_cache[3]:
            self._settle_deferred()  # a forward in a forward: the outer one's layers so far
        # The model's forward called again inside itself: part of the outer step
        nested = self._step_open and not continued
        modules = self._modules
        # What the model's own caches hold before this forward, without reading a tensor: Meta's
        # `start_pos`, else the tracked tensors' last logged tokens
        held = self._signature.start_pos(args, kwargs)
        if held is None and modules is not None:
            held = modules.held_tokens()
        empty = is_prefill(args, kwargs, cache, hf, held)
        # A generate() call's first forward writes its prompt, also on a cache reused from an earlier call
        # (several tokens per row on a cache that holds some, as assisted decoding's later forwards do)
        call = None if nested or self._calls is None else self._calls.began()
        prefill = empty or call is not None
        self._begin_step(prefill)
        if nested:
            return
        if call is not None:
            self._prompt_start(cache, args, kwargs, call)
        elif continued:
            self._prefill_left = max(self._prefill_left - new_tokens(args, kwargs), 0)
        if modules is not None and (modules.owners or prefill):  # a prefill may make them (lazy caches)
            modules.progress = self._signature.progress(args, kwargs)
            modules.rows = 0 if modules.progress is not None else self._signature.rows(args, kwargs)
        if modules is not None:  # kept past the step's end: tensors are tracked after the forward returns
            modules.fed_rows = self._signature.rows(args, kwargs)
        if self._profiler_on and threading.get_ident() != self._thread:
            self._forwards_elsewhere += 1
        if hf is not None and cache is not None and isinstance(cache, hf._cache_cls):
            # Not an assistant's draft cache. One first seen here holding KV (filled before record()) has
            # what it holds logged now, in this step, before the forward replaces it.
            self._model_caches.update(hf.given(cache))
            if call is not None:
                # Between two generate() calls the caller may change a cache it passes again (a `.to()` of
                # its layers): logged at this call's start, before its updates replace those tensors. Once
                # per call: a step's start between decode steps scans nothing.
                hf.scan_all(forget=False)
            appended = new_tokens(args, kwargs)
            deferred = False
            if self._may_defer:
                if prefill or self._defer_step is None:  # eviction hooks are in place before generate()
                    self._defer_step = not self._cache_hooked()
                deferred = self._defer_step and appended > 0 and hf.defer(cache)
            # Weakly: a forward whose end hook never runs must not keep its cache alive
            self._step_cache = (_weak(cache), appended, hf.updates_seen, deferred, empty)

    def _post_forward(self, module: Any, args: Any, output: Any) -> None:
        # grad enabled around the forward (a thread-local flag): did autograd record it? (`autograd_kept`)
        self._output_grad = autograd_kept(output) if torch.is_grad_enabled() else None
        planned = self._planned
        if planned is not None:
            self._planned = None
            if output is not RAISED and not self._beside and self._planned_end(planned):
                return
        if self._paged is not None and self._paged.in_step:
            return
        if self._beside and self._beside_end():
            return
        raised = output is RAISED  # the hook is always called, also when the forward raised
        step_cache, self._step_cache = self._step_cache, None
        compared = offer = None
        hf = self._hf
        if step_cache is not None and hf is not None:
            ref, new_tokens, seen, deferred, empty = step_cache
            cache = ref()
            if cache is None:
                pass  # dropped during its own forward: its storages' frees are found by the step's end
            elif deferred:
                # No update of the deferred cache reached the wrapper: they ran in a compiled graph
                compiled = not raised and not hf.deferred_reached
                hf.step_end(cache, new_tokens, written=compiled, complete=not raised, fresh=empty)
                compared = cache
                if (
                    not raised
                    and self._prefill_left <= 0
                    and self._may_defer
                    and self._defer_step
                    and not self._beside
                    and not hf.defer_off
                ):
                    # The next forward is most likely this cache's next decode step (`_decode_step`)
                    offer = self._plan_after(ref, cache)
            elif hf.updates_seen == seen and not raised and new_tokens:
                # No update reached the wrapper: they ran in a compiled graph.
                hf.step_end(cache, new_tokens, written=True, fresh=empty)
                compared = cache
        if self._prefill_left > 0 and not raised:
            self._prefill_continues = True  # the step ends with the prefill's last chunk
            return
        self._prefill_left = 0
        self._end_step(compared, raised)
        self._decode_next = offer  # once the step has ended whole

    def _forward_beside(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """Whether this forward runs beside the open step's, on another thread (or inside one that does),
        and is taken here: a step of its own, which the log cannot keep apart from the open one."""
        thread = threading.get_ident()
        running = self._beside.get(thread)
        if running is not None:  # the model's forward called inside a forward beside the step
            running[0] += 1
            return True
        if not self._step_open or thread == self._step_thread:
            return False  # a forward after a beside one ended, or nested in its own thread's step
        self._forwards_beside += 1
        # Each layer update is logged as it happens from now on: a forward deferred to its end would log
        # its updates after the other thread's, whose new storages may take the addresses it released.
        self._may_defer = False
        hf = self._hf
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")
        held = self._signature.start_pos(args, kwargs)
        if held is None and self._modules is not None:
            held = self._modules.held_tokens()
        call = self._calls.began() if self._calls is not None else None
        prefill = call is not None or is_prefill(args, kwargs, cache, hf, held)
        self._beside[thread] = [1, _weak(cache) if cache is not None else None]
        tracker = self.tracker
        tracker.step += 1
        tracker.phase = "prefill" if prefill else "decode"
        if call is not None:
            self._call_masks.began(tracker.step, call.mask, keeps=call.keeps)
        if prefill:
            tracker.poll_frees()
        if hf is not None:
            if hf.dropped:
                hf.forget_dead()
            if cache is not None and isinstance(cache, hf._cache_cls):
                self._model_caches.update(hf.given(cache))
        if self._profiler_on and thread != self._thread:
            self._forwards_elsewhere += 1
        return True

    def _beside_end(self) -> bool:
        """Whether this forward's end is one of a forward beside the open step (taken here). Its layer
        updates were logged as they happened; the step's end, scan and sample are the open step's."""
        thread = threading.get_ident()
        running = self._beside.get(thread)
        if running is None:
            return False
        running[0] -= 1
        if running[0] <= 0:
            self._beside.pop(thread, None)
        return True

    def _busy_caches(self) -> tuple[Any, ...]:
        """The caches of the forwards running beside the open step: a scan now would take their layers
        half-way through an update for a change made behind the cache's back."""
        caches = (running[1]() for running in list(self._beside.values()) if running[1] is not None)
        return tuple(cache for cache in caches if cache is not None)

    def _prompt_start(
        self, cache: Any, args: tuple[Any, ...], kwargs: dict[str, Any], call: CallStart
    ) -> None:
        """At a generate() call's first forward: the cache positions its prompt ends at, on an empty cache
        (`_prompt_end`, told in the prefill step's sample: what a first forward writes beyond it are draft
        tokens under verification, assisted decoding's), and the positions a chunked prefill
        (`prefill_chunk_size`) still has to write after this forward (`_prefill_left`): its chunks are one
        step, yielding one token; and the length the call was asked to reach (`_call_length`: its
        max_length and max_new_tokens, told in the same sample), where its input is its whole sequence; and
        its attention_mask, weakly, with this step, read once the block is over (kvtrace.call_masks). The
        call, with its prompt's end and length, goes into the manifest at the writer's next flush
        (`_note_call_begun`): a process killed in this prefill never writes the sample that tells them."""
        self._prompt_end = None
        self._call_length = None
        self._prefill_left = 0
        hf = self._hf
        prompt, cache_passed, max_length, max_new_tokens = call[:4]
        if not cache_passed:
            past: int | None = 0  # generate() made the cache
        else:
            past = hf.positions_seen(cache) if hf is not None and cache is not None else None
        # Not where the call passed only its new tokens (the cache holds the rest), or nothing tells
        if prompt is not None and past is not None and prompt >= past:
            if max_length is not None:
                self._call_length = (max_length, max_new_tokens)
            if past == 0:
                # On a cache that holds some, the input may be written whole again (prompt lookup does), so
                # where the prompt ends is known on an empty one only
                self._prompt_end = prompt
            fed = new_tokens(args, kwargs)
            if fed > 0 and past + fed < prompt:
                self._prefill_left = prompt - past - fed
        # The mask is read as the block ends, never here
        self._call_masks.began(self.tracker.step, call.mask, self._prompt_end, self._call_length, call.keeps)
        self._note_call_begun()

    def _settle_deferred(self) -> None:
        """Log what a deferred forward changed before its end: a forward may run inside another, and an end
        that raised part-way leaves its forward's layers uncompared."""
        pending, self._step_cache = self._step_cache, None
        if pending is not None and pending[3] and self._hf is not None:
            ref, new_tokens, _, _, empty = pending
            cache = ref()
            if cache is not None:
                self._hf.step_end(cache, new_tokens, written=False, complete=False, fresh=empty)

    def _stale(self, cache: Any) -> bool:
        """Whether the open step belongs to a forward that ended without its end hook, told from a forward
        inside a forward by the cache: the open step's cache is gone, or is not this forward's."""
        pending = self._step_cache
        if pending is None:
            return False
        held = pending[0]()
        return held is None or held is not cache

    def _cache_hooked(self) -> bool:
        """Whether code besides the cache's update may change KV tensors inside a forward: an eviction
        library (kvpress) or any forward hook on one of the model's modules (a press hooks its attention
        modules; other code may hook decoder layers), or a global one. Then each update is followed as it
        happens, which the end-of-step comparison could not tell apart from such a change."""
        if "kvpress" in sys.modules:
            return True
        module_hooks = torch.nn.modules.module
        if any(
            getattr(module_hooks, name, None)
            for name in ("_global_forward_hooks", "_global_forward_pre_hooks")
        ):
            return True
        # The model's modules as they are now (a submodule replaced since the start has its own hooks), and
        # no list kept of them: one the model drops must die as it would unrecorded
        model = self.model
        return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules() if m is not model)

    def _auto_step(self, layer_tokens_before: int, found: Any = None) -> None:
        """Without a model to hook, a layer-0 update starts a step. `found`: the update's cache, first seen
        holding KV; the last step's end leaves it to the update, which logs what it holds in this step."""
        if self._step_open:
            self._end_step(found)
        self._begin_step(layer_tokens_before == 0)

    def _begin_step(self, prefill: bool) -> None:
        tracker = self.tracker
        hf = self._hf
        if self._step_open:  # a nested forward (assistant model, etc.) keeps the outer step
            if hf is not None and hf.dropped:
                hf.forget_dead()
            return
        tracker.step += 1
        # Before anything this step logs: a module's cache (`cache_k`) is logged only by the scan at the
        # forward's end, so its first KV line does not tell when the forward began (issue 11: one clock
        # read per step, none per layer)
        self._step_began_ns = self._clock()
        if prefill:
            tracker.phase = "prefill"
            self._decode_index = 0
            tracker.poll_frees()  # a pool freed since (generate_batch's) is gone before this cache is made
        else:
            if tracker._phase != "decode":  # the setter's own test, without its call at every step
                tracker.phase = "decode"
            self._decode_index += 1
        if hf is not None and hf.dropped:
            # Caches dropped since the last step (a finished generate()'s): their frees come before this
            # forward's first new storage, which may take one of their addresses, also when its cache is one
            # reused from an earlier call (a new cache object would retire them at its first update).
            hf.forget_dead()
        self._step_open = True
        self._step_thread = threading.get_ident()
        ranges = self._ranges
        assert ranges is not None
        if ranges.active:  # nobody listening (no NVTX tool, no profiler): no range, no name to build
            ranges.push("kvtrace/prefill" if prefill else f"kvtrace/decode {self._decode_index}")

    def _step_grad(self) -> bool:
        """Whether autograd recorded the step's forward: as its output said (`autograd_kept`), else (no
        output seen) as the grad mode says now. Read once: the next step's forward says its own."""
        kept, self._output_grad = self._output_grad, None
        return torch.is_grad_enabled() if kept is None else kept

    def _end_step(self, compared: Any = None, raised: bool = False) -> None:
        """`raised`: the step's forward raised (an OOM, a Ctrl-C): its sample says so, as the step yielded no
        token, whichever of its layers' KV updates the log holds."""
        if not self._step_open:
            return
        if self._hf is not None:
            self._hf.scan_all(compared=compared, busy=self._busy_caches() if self._beside else ())
            if self._attention_modules and "kvpress" in sys.modules:  # masks are kvpress's (AdaKV)
                self._hf.scan_masks(self._attention_modules)
        modules = self._modules
        if modules is not None:
            if self.tracker._phase == "prefill":
                # Caches made or re-made since the last look (`setup_caches()` before this generation, a lazy
                # cache this forward allocated): looked for once per generation, not per decode step
                modules.rediscover()
            if (modules.owners or modules._tracked) and modules.scan("track", raised):
                self._module_tokens_unknown += 1
            modules.progress = None  # writes seen after this forward are not its own
            modules.rows = 0
        self.tracker.poll_frees()
        assert self._ranges is not None
        if self._ranges.active:
            self._ranges.pop()
        self._step_open = False
        phase = self.tracker.phase
        extra: dict[str, Any] = {"started_ns": self._step_began_ns}
        if raised:
            extra["raised"] = True
            self._raised_step = self.tracker.step
        if self._step_grad():  # autograd keeps what the forward made for a backward (docs/format.md)
            extra["grad"] = True
        if phase == "prefill" and self._prompt_end is not None:
            extra["prompt_end"] = self._prompt_end
        if phase == "prefill" and self._call_length is not None:
            extra["max_length"], new = self._call_length
            if new is not None:
                extra["max_new_tokens"] = new
        self._sample(phase, **extra)
        self._prompt_end = self._call_length = None


def autograd_kept(output: Any) -> bool:
    """Whether autograd recorded a forward run with grad enabled around it: its output requires grad. A
    forward under its own `@torch.inference_mode()` (Meta's reference model) or a model whose parameters
    require none records nothing, though grad was enabled outside it. An output with no tensor found
    cheaply (the logits, or its first item) is taken as recorded, as the grad mode says."""
    tensor = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if tensor is None and isinstance(output, tuple | list) and output:
        tensor = output[0]
    return tensor.requires_grad if isinstance(tensor, torch.Tensor) else True


def _weak(obj: Any) -> Callable[[], Any]:
    """A weak reference to `obj`, or a strong one where it takes none."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj
