"""A decode step on its planned path (issue 11): the common forward of `generate()`, the next decode step of
the cache whose deferred step just ended, begun and ended here at a fraction of the general path's cost.

`ForwardSteps` inherits `PlannedSteps`: `_pre_forward` offers a forward to `_decode_step`, `_post_forward`
ends a step it took with `_planned_end`; the per-layer logging is `kvtrace.integrations.hf_decode_plan`'s.
Anything the plan does not fit goes back to the general path, which logs what it would have logged.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from kvtrace.forward_inputs import new_tokens
from kvtrace.integrations.hf_decode_plan import DecodePlan, log_planned, plan_for

if TYPE_CHECKING:
    from kvtrace.integrations.hf_caches import HfCacheHooks
    from kvtrace.integrations.hf_generate import GenerateCalls
    from kvtrace.integrations.hf_paged import PagedAttentionHooks
    from kvtrace.integrations.module_caches import ModuleCaches
    from kvtrace.json_writes import JsonlAppender
    from kvtrace.kv_tracker import KvTracker
    from kvtrace.memory_samples import MemorySampler
    from kvtrace.step_ranges import StepRanges


class PlannedSteps:
    """The planned decode step (a mixin of `ForwardSteps`, whose state it shares)."""

    tracker: KvTracker
    _hf: HfCacheHooks | None
    _calls: GenerateCalls | None
    _modules: ModuleCaches | None
    _paged: PagedAttentionHooks | None
    _ranges: StepRanges | None
    _samples: JsonlAppender | None
    _sampler: MemorySampler | None
    _clock: Callable[[], int]
    _attention_modules: list[Any]
    _decode_index: int
    _step_began_ns: int
    _step_open: bool
    _step_thread: int
    _step_cache: tuple[Any, ...] | None
    _prefill_left: int
    _prompt_end: int | None
    _call_length: tuple[int, int | None] | None
    _may_defer: bool
    _defer_step: bool | None
    _profiler_on: bool
    _thread: int
    _forwards_elsewhere: int
    _beside: dict[int, list[Any]]
    _decode_next: DecodePlan | None
    _planned: DecodePlan | None
    _last_plan: DecodePlan | None
    _output_grad: bool | None

    if TYPE_CHECKING:

        def _step_grad(self) -> bool: ...

        def _sample(self, label: str, **extra: Any) -> None: ...

        def _end_step(self, compared: Any = None, raised: bool = False) -> None: ...

    def _decode_step(self, plan: DecodePlan, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """The common forward, taken here at a fraction of the general path's cost (issue 11: on a model
        with 2 layers, each step's fixed work is shared by 2 updates, and between two model forwards every
        line of it runs cold): the next decode step of the cache whose deferred step just ended (`plan`,
        see `kvtrace.integrations.hf_decode_plan`). `_post_forward` offers it only at a step's regular end
        with no forward beside it; no forward began since (each start takes the offer), so the step
        logic's own state is as that end left it. What code outside a forward may have changed is checked,
        as the general path would find it: the same live cache object (`given` has nothing to add),
        holding tokens (not a prefill), no generate() call beginning, no continuous-batching step, no
        module caches to follow, no offloading; the layers are checked one by one at the end
        (`log_planned`). Anything else returns False: the general path takes it."""
        self._decode_next = None
        cache = kwargs.get("past_key_values")
        if cache is None:
            cache = kwargs.get("cache")
        modules, paged = self._modules, self._paged
        if (
            cache is None
            or plan.ref() is not cache
            or self._step_open  # another thread's forward took the offer first: the general path's race
            or self._beside
            or (self._calls is not None and self._calls._pending)
            or (paged is not None and paged._open and not paged._closed)  # `in_step`, inline
            or (modules is not None and (modules.owners or modules._tracked))
            or getattr(cache, "offloading", False)
        ):
            return False
        layers = getattr(cache, "layers", None)
        # `is_prefill`'s answer for a cache kvtrace knows: the tokens its layer 0 holds, as last logged
        if not layers or not getattr(layers[0], "is_initialized", True) or not plan.rows[0][1].tokens:
            return False
        ids = kwargs.get("input_ids", args[0] if args else None)  # `new_tokens`, inline for ids
        shape = ids.shape if type(ids) is torch.Tensor else None
        appended = shape[1] if shape is not None and len(shape) >= 2 else new_tokens(args, kwargs)
        if appended <= 0:
            return False
        hf = self._hf
        assert hf is not None  # offered by a deferred step, whose cache the HF hooks follow
        # `_begin_step(False)`, inline
        tracker = self.tracker
        tracker.step += 1
        self._step_began_ns = self._clock()
        if tracker._phase != "decode":
            tracker.phase = "decode"
        self._decode_index += 1
        if hf.dropped:
            hf.forget_dead()
        self._step_open = True
        self._step_thread = thread = threading.get_ident()
        ranges = self._ranges
        if ranges is not None and ranges.active:
            ranges.push(f"kvtrace/decode {self._decode_index}")
        if self._profiler_on and thread != self._thread:
            self._forwards_elsewhere += 1
        hf.deferred = cache
        hf.deferred_reached = False
        self._step_cache = (plan.ref, appended, hf.updates_seen, True, False)
        self._planned = plan
        return True

    def _planned_end(self, plan: DecodePlan) -> bool:
        """The end of a forward `_decode_step` took, on the plan's path (a layer it does not fit, with those
        after it, logged by `step_end`); False where the general path must take the whole end."""
        cache = plan.ref()
        hf = self._hf
        step_cache = self._step_cache
        if cache is None or hf is None or step_cache is None:
            return False
        paged = self._paged
        if paged is not None and paged._open and not paged._closed:  # `in_step`, inline
            return False
        if cache is hf.deferred:
            hf.deferred = None
        if hf.dropped:
            hf.forget_dead()  # as `step_end`: a cache dropped inside this forward is retired first
        layers = cache.layers
        # No update reached the wrapper: they ran in a compiled graph, which made every layer's new K and V
        # before any old one went, an order the plan's per-layer lines do not give: the general path's
        compiled = not hf.deferred_reached
        taken = 0 if compiled else log_planned(self.tracker, plan, layers, step_cache[1])
        if taken != len(layers):
            # A layer the plan does not fit (another class, a count its update does not give): it and those
            # after it are the general path's, and the plan is made again (or not) for the next step
            hf.step_end(cache, step_cache[1], written=compiled, first_layer=taken)
            if not compiled:
                self._last_plan = None
        self._step_cache = None
        self._prefill_left = 0
        modules = self._modules
        if (
            self._beside
            or (modules is not None and (modules.owners or modules._tracked))
            or (self._attention_modules and "kvpress" in sys.modules)
        ):
            self._end_step(cache)
        else:
            # `_end_step(cache)`, inline: no other cache to scan when the one known is this one
            known = hf._known
            # The one cache known is this one (kept under its own id, as `cache_id` keeps every cache)
            sole = known.get(id(cache)) if len(known) == 1 else None
            if sole is None or sole[0]() is not cache:
                hf.scan_all(compared=cache)
            tracker = self.tracker
            if tracker._pending:
                tracker.poll_frees()
            ranges = self._ranges
            if ranges is not None and ranges.active:
                ranges.pop()
            self._step_open = False
            samples, sampler = self._samples, self._sampler
            if sampler is not None and sampler.bare_steps and samples is not None and not samples._fh.closed:
                # `_sample`, inline where the sample is the step's time alone (no CUDA allocator to read)
                t_ns = self._clock()
                began = self._step_began_ns
                line = {"t_ns": t_ns, "step": tracker.step, "phase": tracker._phase, "started_ns": began}
                # `_step_grad`, inline: `_post_forward` read the output (None: grad off, no read made)
                grad, self._output_grad = self._output_grad, None
                if grad:
                    line["grad"] = True
                samples._pending.append(line)
            elif self._step_grad():
                self._sample(tracker._phase, started_ns=self._step_began_ns, grad=True)
            else:
                self._sample(tracker._phase, started_ns=self._step_began_ns)
            self._prompt_end = self._call_length = None
        if self._may_defer and self._defer_step and not self._beside and not hf.defer_off:
            self._decode_next = plan if taken == len(layers) else self._plan_after(plan.ref, cache)
        return True

    def _plan_after(self, ref: Callable[[], Any], cache: Any) -> DecodePlan | None:
        """The plan for the next decode step of a cache whose deferred step ended whole: the last one where
        it is this cache's (same weak reference, as `_decode_step` passes it on) and still fits."""
        last = self._last_plan
        hf = self._hf
        assert hf is not None
        if last is not None and last.ref is ref and len(last.rows) == len(getattr(cache, "layers", ())):
            return last
        cid = hf.cache_id(cache)
        plan = None if cid in hf.cross_parts else plan_for(ref, cid, cache, self.tracker._layers)
        self._last_plan = plan
        return plan
