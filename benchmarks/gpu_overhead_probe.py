"""Where the KV log's time goes on a CUDA GPU: one command for a short device lease (issue 11 / 14).

The H200 check (benchmarks/gpu_check.py) measured the light recorder at 331 µs per KV update on a Llama 3
8B-shaped model at batch 1, where the CPU benchmarks give 5-20. This probe splits that cost on the GPU:

  1. generate() plain, and under `record(profiler=False, snapshots=False)` with parts of the recorder
     switched off one at a time (the writer thread; its host/NVML sampling; the per-step allocator sample),
     and with a shorter GIL switch interval; interleaved, medians, µs per update for each;
  2. one recorded generate() under cProfile (the model's thread): the top functions by own time;
  3. one recorded generate() under `torch.cuda.set_sync_debug_mode("warn")`: each synchronizing call whose
     stack passes through kvtrace, counted by place.

Switching parts off patches kvtrace's classes in this process only: a probe, not a recording mode.

    python benchmarks/gpu_overhead_probe.py --out "$OUT"             # on the GPU, about 2 minutes
    python benchmarks/gpu_overhead_probe.py --dry-run --out /tmp/p   # CPU, tiny model
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import shutil
import statistics
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _variants() -> dict[str, Callable[[], contextlib.AbstractContextManager[Any]]]:
    """Context managers entered around `record()`: what each switches off or moves."""
    from kvtrace import memory_samples, recorder, run_writer

    def no_writer() -> contextlib.AbstractContextManager[Any]:
        return _patched(run_writer.RunWriter, "start", lambda self: None)

    def no_host_sample() -> contextlib.AbstractContextManager[Any]:
        return _patched(recorder.Recording, "_sample_host", lambda self: None)

    def no_step_sample() -> contextlib.AbstractContextManager[Any]:
        return _patched(memory_samples, "_cuda_fields", lambda device=None: {})

    def no_nvml() -> contextlib.AbstractContextManager[Any]:
        # the host read without its NVML part (RSS and CPU % only)
        return _patched(memory_samples._Nvml, "read", lambda self: {})

    @contextlib.contextmanager
    def host_every(seconds: float) -> Iterator[None]:
        with (
            _patched(memory_samples, "HOST_INTERVAL_S", seconds),
            _patched(run_writer, "HOST_INTERVAL_S", seconds),
        ):
            yield

    @contextlib.contextmanager
    def host_on_model_thread() -> Iterator[None]:
        # the writer only flushes; the model's thread reads the host figures in a step's sample
        init = run_writer.RunWriter.__init__

        def flush_only(self: Any, flush: Any, sample: Any = None) -> None:
            init(self, flush, None)

        start = recorder.Recording._start

        def start_then_model_thread(self: Any) -> None:
            start(self)
            if self._sampler is not None:
                self._sampler._host_elsewhere = False

        with (
            _patched(run_writer.RunWriter, "__init__", flush_only),
            _patched(recorder.Recording, "_start", start_then_model_thread),
        ):
            yield

    @contextlib.contextmanager
    def fast_switch() -> Iterator[None]:
        old = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        try:
            yield
        finally:
            sys.setswitchinterval(old)

    return {
        "b": contextlib.nullcontext,
        "b_no_host_sample": no_host_sample,
        "b_no_nvml": no_nvml,
        "b_host_20ms": lambda: host_every(0.02),  # the cadence before 2026-12-04
        "b_host_model_thread": host_on_model_thread,
        "b_no_writer": no_writer,
        "b_no_step_sample": no_step_sample,
        "b_switch_0.2ms": fast_switch,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="gpu_probe_out")
    parser.add_argument("--work", default="/tmp/kvtrace_gpu_probe")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=32, help="new tokens per generate()")
    parser.add_argument("--variants", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--no-profile", action="store_true", help="skip the cProfile and sync-debug runs")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    import torch

    import kvtrace
    from kvtrace.llama import SIZES, build_model

    device = "cpu" if args.dry_run else "cuda"
    size = SIZES["tiny" if args.dry_run else "llama-3-8b"]
    batch, prompt, new = (args.batch, 16, args.new) if args.dry_run else (args.batch, 1024, args.new)
    model = build_model(size, dtype=torch.bfloat16, device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, 100_000 if not args.dry_run else 1000, (batch, prompt), generator=generator).to(
        device
    )
    pad = int(model.config.pad_token_id)
    updates = size.num_layers * new
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": [batch, prompt, new],
        "updates": updates,
    }

    def generate() -> None:
        with torch.no_grad():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
                disable_compile=True,
            )
        _sync()

    def once(variant: str) -> float:
        run_dir = work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        if variant == "a":
            started = time.perf_counter()
            generate()
            return time.perf_counter() - started
        with (
            _variants()[variant](),
            kvtrace.record(run_dir, model=model, profiler=False, snapshots=False, overwrite=True),
        ):
            started = time.perf_counter()
            generate()
            return time.perf_counter() - started

    chosen = [v for v in args.variants.split(",") if v]
    names = ["a", *(chosen or _variants())]
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:
        once(n)  # warm-up
    for rep in range(args.reps):
        for k in range(len(names)):
            n = names[(rep + k) % len(names)]
            times[n].append(once(n))
    medians = {n: statistics.median(t) for n, t in times.items()}
    result["variants"] = {
        n: {
            "median_s": round(medians[n], 4),
            "runs_s": [round(t, 4) for t in times[n]],
            "us_per_update": round((medians[n] - medians["a"]) / updates * 1e6, 1),
            "us_per_update_min": round((min(times[n]) - min(times["a"])) / updates * 1e6, 1),
        }
        for n in names
    }
    for n in names:
        print(
            f"batch {batch} {n:20s} median {medians[n] * 1e3:8.1f} ms "
            f"{result['variants'][n]['us_per_update']:7.1f} µs/update; min {min(times[n]) * 1e3:8.1f} ms "
            f"{result['variants'][n]['us_per_update_min']:7.1f} µs/update; "
            f"runs {sorted(round(t * 1e3) for t in times[n])}",
            flush=True,
        )

    (out / f"probe_b{batch}.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.no_profile:
        return 0
    # 2. cProfile of one recorded generate (the model's thread)
    profile = cProfile.Profile()
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    with kvtrace.record(run_dir, model=model, profiler=False, snapshots=False, overwrite=True):
        profile.enable()
        generate()
        profile.disable()
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats("kvtrace", 30)
    (out / "cprofile.txt").write_text(text.getvalue(), encoding="utf-8")
    print(text.getvalue()[:6000], flush=True)

    # 3. synchronizing calls whose stack passes through kvtrace
    places: Counter[str] = Counter()
    total = 0
    if device == "cuda":
        shutil.rmtree(run_dir, ignore_errors=True)
        original = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
            nonlocal total
            total += 1
            ours = [
                f"{f.filename.split('kvtrace/')[-1]}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()
                if "/kvtrace/" in f.filename and "gpu_overhead_probe" not in f.filename
            ]
            if ours:
                places[" <- ".join(ours[-3:])] += 1

        warnings.showwarning = show
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = show
                with kvtrace.record(run_dir, model=model, profiler=False, snapshots=False, overwrite=True):
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        generate()
                    finally:
                        torch.cuda.set_sync_debug_mode(0)
        finally:
            warnings.showwarning = original
    result["syncs_total"] = total
    result["syncs_in_kvtrace"] = dict(places.most_common(20))
    print(f"synchronizing calls: {total}, through kvtrace: {sum(places.values())}", flush=True)
    for place, count in places.most_common(20):
        print(f"  {count:6d}  {place}", flush=True)
    (out / "probe.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
