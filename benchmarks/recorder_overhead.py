"""What recording costs, side by side with the same work unrecorded (issue 11).

Three tables, each from interleaved runs (the modes take turns, starting one later each round, so no
mode always follows the same neighbour), medians:

1. Light mode, µs of kvtrace per KV layer update: (time with `kvtrace.record(..., profiler=False)` minus
   time without) / layer updates, on
   - `tiny`: Llama 3 "tiny" (4 layers, hidden 128), batch 2, greedy `generate()` of `--new-tokens` (256);
   - `free`: a model whose step is nearly free (2 layers, hidden 32, vocab 256), batch 1, same tokens, so
     the per-update and per-step bookkeeping dominate;
   - `free-32`: the same with 32 layers, as many as Llama 3 8B: the per-step work shared by 32 updates;
   - `free-32-compiled` (with `--compiled`): free-32 with a static cache and `torch.compile`d forward, the
     GPU fast path: its updates run inside the graph, and kvtrace logs each layer at the step's end;
   - `loop-dyn` / `loop-static`: the real `transformers` `Cache.update` of a DynamicCache / StaticCache
     called in a tight loop, 32 layers x `--new-tokens` steps, no model at all (steps begin at layer 0).
   Wall time (`perf_counter`), the main thread's CPU time (`thread_time`, steadier on a shared machine)
   and the process's (`process_time`: kvtrace's writer thread, which formats and writes the log, counts
   there and not on the model's thread) are given, with the tokens/s ratio of the model rows. Goal: at
   most 10 µs per update on the model's thread (in hooks).
2. Full mode: `kvtrace.record(..., profiler=True, record_shapes=True, with_stack=True)` against a bare
   `torch.profiler.profile` with the same options (CPU activity, memory, shapes, stacks,
   `tensorboard_trace_handler`), tiny model, `--full-tokens` (32) new tokens. Goal: at most 1.05x.

    python benchmarks/recorder_overhead.py                      # ~3-5 min on 2 busy cores
    python benchmarks/recorder_overhead.py --reps 7 --only light
    python benchmarks/recorder_overhead.py --cprofile free      # where kvtrace's time goes
    python benchmarks/recorder_overhead.py --floor --reps 5     # against the least any Python recorder pays
    python benchmarks/recorder_overhead.py --breakdown --reps 5 # the in-hooks time split by part
    python benchmarks/recorder_overhead.py --interference --reps 9  # the model's forward, slowed?
    python benchmarks/recorder_overhead.py --drain --reps 5     # the writer's CPU per update, its log lines
    python benchmarks/recorder_overhead.py --cuda-sample        # a CUDA step's allocator read, on a CPU

One intra-op thread: OpenMP spin-waits make a shared 2-core machine noisy, and what kvtrace adds (Python
per layer update and per step) does not depend on it. No timing is asserted: this prints tables.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import io
import pstats
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOOP_LAYERS = 32


@dataclass(frozen=True)
class Timing:
    wall_s: float  # the generate() call (or the update loop) alone
    cpu_s: float  # the main thread's CPU time over the same span
    proc_s: float  # the whole process's CPU time over the same span (kvtrace's writer thread included)
    block_s: float  # the whole `with` block: start-up, the work, teardown (trace and manifest writing)


@dataclass
class Workload:
    name: str
    run: Callable[[], None]  # the work itself, recorded or not
    updates: int  # KV layer updates per run
    tokens: int  # generated tokens per run (0 for the update loops)
    attach_model: Any  # the model handed to record(), or None


def _generate_workload(
    name: str, size: Any, batch: int, new_tokens: int, vocab_prompt: bool, compiled: bool = False
) -> Workload:
    import torch

    from kvtrace.llama import DEFAULT_PROMPTS, build_model, encode_batch, llama3_tokenizer

    model = build_model(size)
    extra: dict[str, Any] = {}
    if compiled:  # the GPU fast path: a static cache, the forward compiled by inductor
        model.forward = torch.compile(model.forward)
        extra["cache_implementation"] = "static"
    if vocab_prompt:
        pad_id = int(model.config.pad_token_id)
        prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(batch)]
        input_ids, mask = encode_batch(llama3_tokenizer(), prompts, pad_id)
    else:
        pad_id = 0
        torch.manual_seed(0)
        input_ids = torch.randint(1, int(model.config.vocab_size), (batch, 16))
        mask = torch.ones_like(input_ids)

    def run() -> None:
        torch.manual_seed(0)
        out = model.generate(
            input_ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            **extra,
        )
        if out.shape[1] - input_ids.shape[1] != new_tokens:
            raise RuntimeError(f"{name}: generated {out.shape[1] - input_ids.shape[1]}, not {new_tokens}")

    layers = int(model.config.num_hidden_layers)
    return Workload(name, run, new_tokens * layers, batch * new_tokens, model)


def _loop_workload(name: str, static: bool, steps: int) -> Workload:
    import torch
    from transformers import DynamicCache, StaticCache

    from kvtrace.llama import ModelSize, llama3_config

    config = llama3_config(
        ModelSize(hidden_size=32, intermediate_size=64, num_layers=LOOP_LAYERS, num_heads=2, num_kv_heads=1)
    )
    prompt = torch.randn(1, 1, 16, 16)
    token = torch.randn(1, 1, 1, 16)

    def run() -> None:
        cache: Any = (
            StaticCache(config=config, max_cache_len=16 + steps) if static else DynamicCache(config=config)
        )
        for layer in range(LOOP_LAYERS):
            cache.update(prompt, prompt, layer)
        for _ in range(steps - 1):
            for layer in range(LOOP_LAYERS):
                cache.update(token, token, layer)

    return Workload(name, run, steps * LOOP_LAYERS, 0, None)


@contextlib.contextmanager
def _mode(mode: str, work: Workload, out_dir: Path) -> Iterator[None]:
    """a: nothing; b: kvtrace light; c: bare profiler, shapes and stacks; d: kvtrace full, same options."""
    import kvtrace

    if mode == "a":
        yield
    elif mode == "b":
        with kvtrace.record(out_dir, model=work.attach_model, profiler=False, overwrite=True):
            yield
    elif mode == "c":
        from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
            on_trace_ready=tensorboard_trace_handler(str(out_dir / "profiler")),
        ):
            yield
    elif mode == "d":
        with kvtrace.record(
            out_dir,
            model=work.attach_model,
            profiler=True,
            record_shapes=True,
            with_stack=True,
            overwrite=True,
        ):
            yield
    else:
        raise ValueError(mode)


def run_once(mode: str, work: Workload, scratch: Path) -> Timing:
    import torch

    out_dir = Path(tempfile.mkdtemp(prefix=f"{work.name}_{mode}_", dir=scratch))
    try:
        with torch.no_grad():
            block_start = time.perf_counter()
            with _mode(mode, work, out_dir):
                proc_start = time.process_time()
                cpu_start, wall_start = time.thread_time(), time.perf_counter()
                work.run()
                wall, cpu = time.perf_counter() - wall_start, time.thread_time() - cpu_start
                proc = time.process_time() - proc_start
            block = time.perf_counter() - block_start
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return Timing(wall, cpu, proc, block)


def interleaved(work: Workload, modes: tuple[str, ...], reps: int, scratch: Path) -> dict[str, list[Timing]]:
    for mode in modes:  # warm-up: first generate(), first profiler session, first hook install
        run_once(mode, work, scratch)
    timings: dict[str, list[Timing]] = {m: [] for m in modes}
    for rep in range(reps):
        for offset in range(len(modes)):
            mode = modes[(rep + offset) % len(modes)]
            timings[mode].append(run_once(mode, work, scratch))
    return timings


def _median(timings: list[Timing], pick: Callable[[Timing], float]) -> float:
    return statistics.median(pick(t) for t in timings)


def _counting(spent: list[int], inner: Callable[..., Any], sign: int = 1) -> Callable[..., Any]:
    """`inner` timed by `perf_counter_ns` (a vDSO read), its time added to `spent[0]` (`sign` -1: taken
    off, for the work inside kvtrace's wrappers that is not kvtrace's)."""
    clock = time.perf_counter_ns

    @functools.wraps(inner)  # generate() reads the model's forward signature
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[0] += sign * (clock() - started)

    return wrapper


def hooks_cpu_per_update(work: Workload, scratch: Path, runs: int = 3, mode: str = "b") -> float:
    """kvtrace's own time per update, timed inside its hooks: the steadiest figure on a shared machine,
    where the difference of two medians moves with the neighbours' load. Covers the whole `Cache.update`
    wrapper minus the cache's own update inside it, and kvtrace's forward around the model's (step start;
    step end: scan, memory sample, formatting and writing the log every 0.1 s). Timed by `perf_counter_ns`
    (a vDSO read): `thread_time` is a system call, 5 us and more between model steps here, larger than what
    it would measure. The timers' own cost is counted as kvtrace's, so this is an upper bound."""
    from transformers.cache_utils import Cache

    from kvtrace import model_forward
    from kvtrace.integrations import hf_caches

    spent = [0]
    patched: list[tuple[Any, str, Any]] = []
    counting = functools.partial(_counting, spent)

    # The cache's own update, subtracted; kvtrace's wrapper around it (installed at record()), added.
    original_update = Cache.__dict__["update"]
    patched.append((Cache, "update", original_update))
    Cache.update = counting(original_update, -1)  # type: ignore[method-assign]
    original_install = hf_caches.HfCacheHooks.install

    def install(hooks: Any) -> None:
        original_install(hooks)
        Cache.update = counting(Cache.__dict__["update"])  # type: ignore[method-assign]

    patched.append((hf_caches.HfCacheHooks, "install", original_install))
    hf_caches.HfCacheHooks.install = install  # type: ignore[method-assign,assignment]
    # kvtrace's `forward` around the model's (model_forward.ForwardWrap), added; the model's own, inside
    # it, subtracted.
    wrap_cls = model_forward.ForwardWrap
    original_wrap_install, original_wrap_uninstall = wrap_cls.install, wrap_cls.uninstall

    def wrap_install(wrap: Any) -> None:
        model = wrap.model
        saved = ("forward" in model.__dict__, model.__dict__.get("forward"))
        model.forward = counting(model.forward, -1)
        original_wrap_install(wrap)
        kvtrace_forward = model.__dict__["forward"]
        model.forward = counting(kvtrace_forward)
        wrap.bench_saved = (*saved, kvtrace_forward)

    def wrap_uninstall(wrap: Any) -> None:
        had_own, own, kvtrace_forward = wrap.bench_saved
        wrap.model.forward = kvtrace_forward
        original_wrap_uninstall(wrap)
        if had_own:
            wrap.model.forward = own
        else:
            wrap.model.__dict__.pop("forward", None)

    patched.append((wrap_cls, "install", original_wrap_install))
    patched.append((wrap_cls, "uninstall", original_wrap_uninstall))
    wrap_cls.install = wrap_install  # type: ignore[method-assign,assignment]
    wrap_cls.uninstall = wrap_uninstall  # type: ignore[method-assign,assignment]
    try:
        figures = []
        for _ in range(runs):
            spent[0] = 0
            run_once(mode, work, scratch)
            figures.append(spent[0] / work.updates / 1e3)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    return statistics.median(figures)


def light_table(works: list[Workload], reps: int, scratch: Path) -> list[str]:
    lines = [
        f"{'workload':<12} {'updates':>8} {'plain us/upd':>13} {'kvtrace +us/upd wall':>21} "
        f"{'+us/upd cpu':>12} {'+proc cpu':>10} {'in hooks':>9} {'tokens/s b/a':>13} {'in hooks <=10us':>16}"
    ]
    print(lines[0], flush=True)
    for work in works:
        t = interleaved(work, ("a", "b"), reps, scratch)
        wall_a, wall_b = _median(t["a"], lambda x: x.wall_s), _median(t["b"], lambda x: x.wall_s)
        cpu_a, cpu_b = _median(t["a"], lambda x: x.cpu_s), _median(t["b"], lambda x: x.cpu_s)
        per_wall = (wall_b - wall_a) / work.updates * 1e6
        per_cpu = (cpu_b - cpu_a) / work.updates * 1e6
        proc_a, proc_b = _median(t["a"], lambda x: x.proc_s), _median(t["b"], lambda x: x.proc_s)
        per_proc = (proc_b - proc_a) / work.updates * 1e6
        in_hooks = hooks_cpu_per_update(work, scratch)
        ratio = f"{wall_a / wall_b:.3f}" if work.tokens else "-"
        # Judged on the in-hooks figure: an upper bound (the timers count as kvtrace's) that a shared
        # machine cannot push below zero, as it can the difference of two medians.
        verdict = "meets" if in_hooks <= 10 else "MISSES"
        lines.append(
            f"{work.name:<12} {work.updates:>8} {wall_a / work.updates * 1e6:>13.1f} {per_wall:>21.1f} "
            f"{per_cpu:>12.1f} {per_proc:>10.1f} {in_hooks:>9.1f} {ratio:>13} {verdict:>16}"
        )
        print(lines[-1], flush=True)
    return lines


def full_table(work: Workload, reps: int, scratch: Path) -> list[str]:
    t = interleaved(work, ("c", "d"), reps, scratch)
    lines = [
        f"{'tiny, ' + str(work.tokens) + ' tokens':<22} {'generate() s':>13} {'main-thread cpu s':>18} "
        f"{'whole block s':>14}"
    ]
    for mode, label in (("c", "bare torch.profiler"), ("d", "kvtrace full")):
        gen, cpu = _median(t[mode], lambda x: x.wall_s), _median(t[mode], lambda x: x.cpu_s)
        block = _median(t[mode], lambda x: x.block_s)
        lines.append(f"{label:<22} {gen:>13.3f} {cpu:>18.3f} {block:>14.3f}")
    ratios = [
        _median(t["d"], pick) / _median(t["c"], pick)
        for pick in (lambda x: x.wall_s, lambda x: x.cpu_s, lambda x: x.block_s)
    ]
    verdict = "meets" if ratios[0] <= 1.05 else "MISSES"
    lines.append(
        f"{'kvtrace / bare':<22} {ratios[0]:>12.3f}x {ratios[1]:>17.3f}x {ratios[2]:>13.3f}x"
        f"   goal <= 1.05x (generate): {verdict}"
    )
    in_hooks_s = hooks_cpu_per_update(work, scratch, mode="d") * work.updates / 1e6
    bare_cpu = _median(t["c"], lambda x: x.cpu_s)
    lines.append(
        f"kvtrace's own CPU inside its hooks under the profiler: {in_hooks_s * 1e3:.1f} ms per run, "
        f"{1 + in_hooks_s / bare_cpu:.3f}x the bare profiler's generate() CPU time"
    )
    return lines


@contextlib.contextmanager
def _tracking_off() -> Iterator[None]:
    """The hooks stay installed and run, but track nothing: no KV comparison or event (neither per update
    nor at a deferred forward's end), no end-of-step scan, no memory sample. What is left is the step logic
    (which forward begins a step, what it defers) and the cost of being called at all."""
    from kvtrace import run_logs
    from kvtrace.integrations import hf_caches

    def nothing(*args: Any, **kwargs: Any) -> None:
        return None

    # Set on the class itself (`step_end` and `scan_all` are inherited from `CacheScans`); put back as
    # they were: the class's own, or removed so that the inherited one shows again.
    saved = [
        (hf_caches.HfCacheHooks, name, hf_caches.HfCacheHooks.__dict__.get(name))
        for name in ("_updated", "step_end", "scan_all")
    ]
    saved.append((run_logs.RunLogs, "_sample", run_logs.RunLogs.__dict__.get("_sample")))
    for owner, name, _ in saved:
        setattr(owner, name, nothing)
    try:
        yield
    finally:
        for owner, name, original in saved:
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


def bare_floor_per_update(work: Workload, scratch: Path, at: str = "end") -> float:
    """The least any Python recorder can do, timed as the in-hooks figure is: a `forward` around the model's
    that, after each forward, reads each layer's K and V and, for a tensor it has not seen, takes what an
    event needs (address, storage bytes, shape, version, weak references to the tensor and its storage, and
    whether the storage it replaces was released) into a list. No step logic, no sample, no log: a bound
    below kvtrace's in-hooks figure, not a recorder. Same counting timers around the same calls (the
    model's forward and `Cache.update`), so the timers' own cost is in both figures. `at`: "end", after the
    model's forward (where kvtrace logs a step); "last", inside the last layer's `Cache.update`, before the
    model's final norm and vocabulary projection (on tiny, 128k x 256 weights that leave the CPU's caches
    cold for whatever runs next); "none", the same wrappers and timers with no capture at all."""
    import weakref

    import torch
    from transformers.cache_utils import Cache

    spent = [0]
    counting = functools.partial(_counting, spent)
    weak_ref_of, expired = torch.UntypedStorage._weak_ref, torch.UntypedStorage._expired

    seen: dict[tuple[int, int], tuple[Any, int]] = {}
    captured: list[tuple[Any, ...]] = []

    def capture_layers(inner: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(inner)
        def forward(*args: Any, **kwargs: Any) -> Any:
            output = inner(*args, **kwargs)
            if at == "end":
                capture(kwargs.get("cache") or kwargs.get("past_key_values"))
            return output

        return forward

    def capture(cache: Any) -> None:
        for index, layer in enumerate(getattr(cache, "layers", ())):
            for part, tensor in ((0, layer.keys), (1, layer.values)):
                last = seen.get((index, part))
                if last is not None and last[0]() is tensor:
                    continue
                storage = tensor.untyped_storage()
                seen[(index, part)] = (weakref.ref(tensor), weak_ref_of(storage))
                captured.append(
                    (
                        index,
                        part,
                        tensor.data_ptr(),
                        storage.nbytes(),
                        tensor.shape,
                        tensor._version,
                        expired(last[1]) if last is not None else True,
                    )
                )

    model = work.attach_model
    original_update = Cache.__dict__["update"]
    cache_update = counting(original_update, -1)

    def update(cache: Any, *args: Any, **kwargs: Any) -> Any:
        out = cache_update(cache, *args, **kwargs)
        index = args[2] if len(args) > 2 else kwargs.get("layer_idx")  # (key, value, layer index)
        if at == "last" and index == len(cache.layers) - 1:
            capture(cache)
        return out

    Cache.update = counting(update)  # type: ignore[method-assign]
    model.forward = counting(capture_layers(counting(model.forward, -1)))
    try:
        run_once("a", work, scratch)
    finally:
        Cache.update = original_update  # type: ignore[method-assign]
        model.__dict__.pop("forward", None)
    return spent[0] / work.updates / 1e3


def floor_table(works: list[Workload], reps: int, scratch: Path) -> list[str]:
    """In-hooks µs per update: kvtrace, kvtrace with tracking off, and the bare floor (what any Python
    recorder pays), rounds alternated, medians. Where the floor is above the goal, no Python recorder
    meets it on that workload here."""
    lines = [
        f"{'workload':<12} {'kvtrace':>8} {'tracking off':>13} {'bare floor':>11} {'floor <= 10us':>14} "
        f"{'in last update':>15} {'no capture':>11}"
    ]
    print(lines[0], flush=True)
    for work in works:
        if work.attach_model is None:
            continue  # the loops have no model forward: their floor is the wrapper alone
        tracked: list[float] = []
        bare: list[float] = []
        floor: list[float] = []
        warm: list[float] = []
        wrappers: list[float] = []
        run_once("b", work, scratch)
        for _ in range(reps):
            tracked.append(hooks_cpu_per_update(work, scratch, runs=1))
            with _tracking_off():
                bare.append(hooks_cpu_per_update(work, scratch, runs=1))
            floor.append(bare_floor_per_update(work, scratch))
            warm.append(bare_floor_per_update(work, scratch, at="last"))
            wrappers.append(bare_floor_per_update(work, scratch, at="none"))
        at_floor = statistics.median(floor)
        lines.append(
            f"{work.name:<12} {statistics.median(tracked):>8.1f} {statistics.median(bare):>13.1f} "
            f"{at_floor:>11.1f} {'yes' if at_floor <= 10 else 'no':>14} {statistics.median(warm):>15.1f} "
            f"{statistics.median(wrappers):>11.1f}"
        )
        print(lines[-1], flush=True)
    return lines


# The parts of kvtrace's in-hooks time that `--breakdown` times apart (inclusive, by `perf_counter_ns`):
# (label, owner module, class (None: a function of the module), method).
_PARTS: tuple[tuple[str, str, str | None, str], ...] = (
    ("planned", "kvtrace.planned_steps", None, "log_planned"),  # a planned decode step's layers, whole
    ("capture", "kvtrace.kv_tracker", "KvTracker", "update"),
    ("lines", "kvtrace.kv_drain", "KvDrain", "drain"),
    ("layer read", "kvtrace.integrations.hf_caches", "HfCacheHooks", "_updated"),
    ("layer read", "kvtrace.integrations.hf_caches", "HfCacheHooks", "step_end"),  # a deferred forward's
    ("step scan", "kvtrace.integrations.hf_caches", "HfCacheHooks", "scan_all"),
    ("sample", "kvtrace.run_logs", "RunLogs", "_sample"),
)


def breakdown_table(works: list[Workload], reps: int, scratch: Path) -> list[str]:
    """kvtrace's in-hooks µs per update, split: a planned decode step's layers (`log_planned`: compared,
    captured and queued in one loop, `kvtrace.integrations.hf_decode_plan`), the tracker's capture of a layer
    update on the general path (`update`), the
    JSON lines made from the captures on the model's thread (`drain` before an event logged at once), the
    rest of the update hook or of a deferred forward's end (reading the layers: `_updated` and `step_end`
    minus the capture), the end-of-step scan, the memory sample, and the rest (the `Cache.update` wrapper,
    step start and end, and the timers). Medians of `reps` runs. `writer`: the lines made on the writer
    thread (every 0.1 s and at the block's end), not in the hooks and not in their total."""
    import importlib
    import threading

    labels = list(dict.fromkeys(label for label, *_ in _PARTS))
    lines = [
        f"{'workload':<12} {'in hooks':>9} "
        + " ".join(f"{x:>11}" for x in labels)
        + f" {'rest':>8} {'writer':>8}"
    ]
    print(lines[0], flush=True)
    spent: dict[str, int] = {}
    patched: list[tuple[Any, str, Any]] = []
    clock = time.perf_counter_ns

    for label, module, cls, name in _PARTS:
        found = importlib.import_module(module)
        owner = found if cls is None else getattr(found, cls)
        if cls is not None:  # the class that defines it: a method may live in a mixin the class inherits
            owner = next(c for c in owner.__mro__ if name in c.__dict__)
        original = owner.__dict__[name]

        def timed(*args: Any, _original: Any = original, _label: str = label, **kwargs: Any) -> Any:
            started = clock()
            try:
                return _original(*args, **kwargs)
            finally:
                key = _label if threading.current_thread() is threading.main_thread() else "writer"
                spent[key] = spent.get(key, 0) + clock() - started

        patched.append((owner, name, original))
        setattr(owner, name, timed)
    try:
        for work in works:
            run_once("b", work, scratch)
            rows: list[tuple[float, dict[str, float]]] = []
            for _ in range(reps):
                spent.clear()
                total = hooks_cpu_per_update(work, scratch, runs=1)
                rows.append((total, {k: v / work.updates / 1e3 for k, v in spent.items()}))
            total = statistics.median(t for t, _ in rows)
            part = {x: statistics.median(r.get(x, 0.0) for _, r in rows) for x in labels}
            writer = statistics.median(r.get("writer", 0.0) for _, r in rows)
            # `_updated` (or `step_end`) holds the capture: its own share is the layer read.
            part["layer read"] = max(part["layer read"] - part["capture"], 0.0)
            rest = total - sum(part.values())
            cells = " ".join(f"{part[x]:>11.1f}" for x in labels)
            lines.append(f"{work.name:<12} {total:>9.1f} {cells} {rest:>8.1f} {writer:>8.1f}")
            print(lines[-1], flush=True)
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
    lines.append(
        f"the same capture of one tensor in a warm loop (a fresh tensor per call): {warm_capture_us():.2f} µs"
    )
    print(lines[-1], flush=True)
    return lines


def interference_table(works: list[Workload], reps: int, scratch: Path) -> list[str]:
    """The model's own forward, µs of the main thread's CPU per step, unrecorded and in light mode, rounds
    alternated, medians: what kvtrace's work between two forwards costs the next forward (the interpreter's
    and the CPU's caches it leaves cold), which no in-hooks timer sees. The model's whole step (`generate()`'s
    own code included) is in `+us/upd cpu` of table 1."""
    import functools

    lines = [f"{'workload':<12} {'forward us/step':>16} {'recorded':>9} {'+us/step':>9} {'+us/upd':>8}"]
    print(lines[0], flush=True)
    for work in works:
        model = work.attach_model
        if model is None:
            continue
        spent = [0]
        inner = model.forward

        @functools.wraps(inner)  # generate() reads the model's forward signature
        def counted(*args: Any, _inner: Any = inner, _spent: list[int] = spent, **kwargs: Any) -> Any:
            started = time.thread_time_ns()
            try:
                return _inner(*args, **kwargs)
            finally:
                _spent[0] += time.thread_time_ns() - started

        model.forward = counted  # kvtrace wraps it (an instance's forward) and calls it inside
        try:
            run_once("b", work, scratch)
            per_step: dict[str, list[float]] = {"a": [], "b": []}
            steps = work.updates / int(model.config.num_hidden_layers)
            for rep in range(reps):
                for mode in ("a", "b") if rep % 2 == 0 else ("b", "a"):
                    spent[0] = 0
                    run_once(mode, work, scratch)
                    per_step[mode].append(spent[0] / steps / 1e3)
        finally:
            model.__dict__.pop("forward", None)
        plain, recorded = statistics.median(per_step["a"]), statistics.median(per_step["b"])
        layers = int(model.config.num_hidden_layers)
        lines.append(
            f"{work.name:<12} {plain:>16.1f} {recorded:>9.1f} {recorded - plain:>9.1f} "
            f"{(recorded - plain) / layers:>8.1f}"
        )
        print(lines[-1], flush=True)
    return lines


def drain_table(works: list[Workload], reps: int, scratch: Path) -> list[str]:
    """The writer thread's part of light mode: µs of CPU per KV layer update to turn captured updates into
    log lines (`KvDrain._drain_locked`), timed on one batch of a whole run, drained on the model's thread as
    the block ends (the writer's 0.1 s flush put off): the steady figure of what the writer does, which on a
    shared machine no difference of two runs resolves. Within a run the writer drains every 0.1 s, while
    the model runs beside it on the other core: costlier (colder caches) and not timed here."""
    from kvtrace import kv_drain, run_writer

    lines = [f"{'workload':<12} {'updates':>8} {'lines':>8} {'drain us/update':>16} {'us/line':>8}"]
    print(lines[0], flush=True)
    original_drain = kv_drain.KvDrain._drain_locked
    original_init = run_writer.RunWriter.__init__
    for work in works:
        if work.attach_model is None:
            continue
        figures: list[tuple[int, int, int]] = []  # (updates drained, lines made, ns)

        def timed(
            self: Any, released: bool = False, _least: int = work.updates // 2, _into: list[Any] = figures
        ) -> None:
            count, made = len(self._queue), len(self.lines)
            started = time.thread_time_ns()
            try:
                original_drain(self, released)
            finally:
                if count >= _least:  # the run's one batch, not a drain of a few updates
                    _into.append((count, len(self.lines) - made, time.thread_time_ns() - started))

        def put_off(self: Any, flush: Any, sample: Any = None) -> None:
            original_init(self, flush, sample)
            self._flush_s = self._tick_s = 1e6  # no flush during the run: the block's end drains it all

        kv_drain.KvDrain._drain_locked = timed  # type: ignore[method-assign]
        run_writer.RunWriter.__init__ = put_off  # type: ignore[method-assign]
        try:
            for _ in range(reps + 1):  # the first a warm-up
                run_once("b", work, scratch)
        finally:
            kv_drain.KvDrain._drain_locked = original_drain  # type: ignore[method-assign]
            run_writer.RunWriter.__init__ = original_init  # type: ignore[method-assign]
        if len(figures) < 2:
            lines.append(f"{work.name:<12} {'-':>8} {'-':>8} {'(no batch drained)':>16}")
        else:
            kept = figures[1:]
            count, made = kept[-1][0], kept[-1][1]
            per_update = statistics.median(ns / n for n, _, ns in kept) / 1e3
            per_line = statistics.median(ns / m for _, m, ns in kept) / 1e3
            lines.append(f"{work.name:<12} {count:>8,} {made:>8,} {per_update:>16.2f} {per_line:>8.2f}")
        print(lines[-1], flush=True)
    return lines


def warm_capture_us(calls: int = 20000, rounds: int = 5) -> float:
    """µs per `_capture` of a tensor the slot has not seen (a growing cache's case), called in a tight
    loop: what the capture costs when the interpreter's caches are warm, against the in-hooks figure."""
    import torch

    from kvtrace import kv_slots

    tensors = [torch.zeros(1, 1, 8 + i % 64, 16) for i in range(256)]
    seed = torch.zeros(1)  # the storage the slot held before the loop: a real weak reference to release
    figures = []
    for _ in range(rounds):
        slot = kv_slots.Slot()
        slot.tref, slot.version, slot.ptr, slot.addr, slot.storage_bytes = kv_slots.dead_ref, 0, 0, 0, 0
        slot.wref = kv_slots.weak_ref_of(seed.untyped_storage())
        kv_slots.set_dtype(slot, torch.float32, torch.device("cpu"))
        started = time.perf_counter_ns()
        for i in range(calls):
            facts = kv_slots.capture(slot, tensors[i % 256])
            if facts is not None and facts[10]:
                kv_slots.free_weak_ref(facts[10])
        figures.append((time.perf_counter_ns() - started) / calls / 1e3)
        kv_slots.free_weak_ref(slot.wref)
    return statistics.median(figures)


def profile_workload(work: Workload, scratch: Path, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_once("b", work, scratch)
    profiler.disable()
    buffer = io.StringIO()
    stats = pstats.Stats(profiler, stream=buffer)
    stats.sort_stats("tottime").print_stats("kvtrace/", top)
    print(f"\ncProfile of one light-mode run of {work.name}, kvtrace's functions by own time")
    text = buffer.getvalue()
    print("ncalls" + text.split("ncalls", 1)[1] if "ncalls" in text else text)


# The CUDA caching allocator's stats as torch 2.13 returns them (`torch._C._cuda_memoryStats`): nine
# per-pool counters and two oversize ones, each {current, peak, allocated, freed}, and six scalars.
_POOLED_STATS = (
    "allocation", "segment", "active", "inactive_split", "allocated_bytes", "reserved_bytes", "active_bytes",
    "inactive_split_bytes", "requested_bytes",
)  # fmt: skip
_SCALAR_STATS = (
    "num_alloc_retries", "num_ooms", "max_split_size", "num_sync_all_streams", "num_device_alloc",
    "num_device_free",
)  # fmt: skip


def _allocator_stats(_device: Any = None) -> dict[str, Any]:
    """A fresh nested dict in the layout and size of the allocator's (the C++ side builds one per call)."""
    counter = {"current": 1 << 30, "peak": 1 << 31, "allocated": 1 << 32, "freed": 1 << 31}
    stats: dict[str, Any] = {name: 0 for name in _SCALAR_STATS}
    for name in _POOLED_STATS:
        stats[name] = {pool: dict(counter) for pool in ("all", "small_pool", "large_pool")}
    stats["oversize_allocations"] = dict(counter)
    stats["oversize_segments"] = dict(counter)
    return stats


def cuda_sample_table(calls: int = 20000, rounds: int = 5) -> list[str]:
    """µs per memory sample of a CUDA run's step, on a CPU: torch's own `memory_allocated`,
    `memory_reserved` and `max_memory_allocated` (each a `memory_stats`: the allocator's stats flattened in
    Python) against kvtrace's one `memory_stats_as_nested_dict` read. The C++ read is stood in by a nested
    dict of the allocator's layout built per call (`_allocator_stats`), whose own cost is given; the torch
    and kvtrace code timed is the real one. Medians of `rounds`."""
    import torch

    from kvtrace import memory_samples

    def per_call(fn: Callable[[], Any]) -> float:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append((time.perf_counter() - started) / calls * 1e6)
        return statistics.median(times)

    def torch_three() -> None:
        torch.cuda.memory_allocated(0)
        torch.cuda.memory_reserved(0)
        torch.cuda.max_memory_allocated(0)

    patched = [
        (torch._C, "_cuda_memoryStats", _allocator_stats),
        (torch.cuda.memory, "is_initialized", lambda: True),
        (memory_samples, "_cuda_ready", lambda: True),
    ]
    saved = [(owner, name, getattr(owner, name, None)) for owner, name, _ in patched]
    for owner, name, value in patched:
        setattr(owner, name, value)
    try:
        stand_in = per_call(_allocator_stats)
        before = per_call(torch_three)
        after = per_call(lambda: memory_samples._cuda_fields(0))
    finally:
        for owner, name, value in saved:
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)
    return [
        f"{'allocator read':<44} {'µs per sample':>14}",
        f"{'stand-in for the C++ stats (each call)':<44} {stand_in:>14.1f}",
        f"{'torch: memory_allocated + reserved + peak':<44} {before:>14.1f}",
        f"{'kvtrace: one memory_stats_as_nested_dict':<44} {after:>14.1f}",
        f"ratio {after / before:.2f}: {(before - after) / 32:.1f} µs per update less on a 32-layer step",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5, help="interleaved rounds per table (default 5)")
    parser.add_argument("--new-tokens", type=int, default=256, help="new tokens / loop steps (default 256)")
    parser.add_argument("--full-tokens", type=int, default=32, help="new tokens in full mode (default 32)")
    parser.add_argument("--only", choices=("light", "full"), help="print one table only")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="only: in-hooks µs per update of kvtrace, of kvtrace tracking nothing, and of the bare floor "
        "(the least a Python recorder does: each layer's K and V read after each forward)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="only: in-hooks µs per update split by part (capture, lines, layer read, scan, sample, rest)",
    )
    parser.add_argument(
        "--interference",
        action="store_true",
        help="only: the model's own forward, µs per step, unrecorded and in light mode",
    )
    parser.add_argument(
        "--cuda-sample",
        action="store_true",
        help="only: µs per memory sample of a CUDA step's allocator figures, torch's three calls against "
        "kvtrace's one read (the C++ stats stood in)",
    )
    parser.add_argument(
        "--drain",
        action="store_true",
        help="only: the writer's CPU µs per update to make the log's lines, a run's batch drained at once",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="add `free-32-compiled`: free-32 with a static cache and its forward compiled by inductor "
        "(the first run compiles: about a minute more)",
    )
    parser.add_argument("--cprofile", choices=("tiny", "free", "free-32", "loop-dyn", "loop-static"))
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.new_tokens < 2 or args.full_tokens < 1:
        parser.error("--reps must be >= 1, --new-tokens >= 2, --full-tokens >= 1")

    import torch
    import transformers

    import kvtrace
    from kvtrace.llama import SIZES, ModelSize

    torch.set_num_threads(args.threads)
    if args.cuda_sample:
        print("\n0. a CUDA step's memory sample, allocator figures (no GPU: the C++ stats stood in)")
        for line in cuda_sample_table():
            print(line)
        return 0
    started = time.perf_counter()
    print(
        f"kvtrace {kvtrace.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} thread(s), {args.reps} interleaved rounds, medians"
    )
    free = ModelSize(
        hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=256
    )
    free32 = ModelSize(
        hidden_size=32, intermediate_size=64, num_layers=32, num_heads=2, num_kv_heads=1, vocab_size=256
    )
    light = [
        _generate_workload("tiny", SIZES["tiny"], 2, args.new_tokens, vocab_prompt=True),
        _generate_workload("free", free, 1, args.new_tokens, vocab_prompt=False),
        _generate_workload("free-32", free32, 1, args.new_tokens, vocab_prompt=False),
        _loop_workload("loop-dyn", False, args.new_tokens),
        _loop_workload("loop-static", True, args.new_tokens),
    ]
    if args.compiled:
        compiled = _generate_workload("free-32-compiled", free32, 1, args.new_tokens, False, compiled=True)
        light.insert(3, compiled)
    with tempfile.TemporaryDirectory(prefix="kvtrace_overhead_") as scratch_name:
        scratch = Path(scratch_name)
        if args.cprofile:
            profile_workload(next(w for w in light if w.name == args.cprofile), scratch, args.top)
            return 0
        if args.interference:
            print("\n0. light mode: the model's own forward, main thread's CPU µs per step (medians)")
            interference_table(light, args.reps, scratch)
            return 0
        if args.drain:
            print("\n0. light mode, the writer's drain: CPU µs per update to make the log lines (medians)")
            drain_table(light, args.reps, scratch)
            return 0
        if args.breakdown:
            print("\n0. light mode, in hooks µs per update, by part (timed inclusive; medians)")
            breakdown_table(light, args.reps, scratch)
            return 0
        if args.floor:
            print("\n0. light mode, in hooks µs per update: kvtrace, tracking off, a Python floor")
            floor_table(light, args.reps, scratch)
            return 0
        if args.only in (None, "light"):
            print("\n1. light mode (profiler=False): kvtrace time per KV layer update")
            light_table(light, args.reps, scratch)
        if args.only in (None, "full"):
            print("\n2. full mode (profiler, memory, shapes, stacks) against bare torch.profiler")
            work = _generate_workload("tiny", SIZES["tiny"], 2, args.full_tokens, vocab_prompt=True)
            for line in full_table(work, args.reps, scratch):
                print(line)
    print(f"\ntotal runtime {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
