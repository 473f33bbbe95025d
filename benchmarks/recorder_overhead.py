"""What recording costs: tokens/s of the same greedy `generate()` with and without kvtrace, side by side.

Four modes run on the default demo inputs (Llama 3 "tiny", random weights, batch 2, the built-in prompts,
32 new tokens, greedy, `torch.no_grad()`, seed 0):

  a. plain         no kvtrace, no profiler
  b. kvtrace       `kvtrace.record(..., profiler=False)`: KV log + NVTX + per-step memory samples
  c. profiler      bare `torch.profiler.profile(activities=[CPU], profile_memory=True)` writing its trace
                   with `tensorboard_trace_handler` into a temporary directory
  d. kvtrace+prof  `kvtrace.record(..., profiler=True)`: (b) plus the same profiler options as (c)

Every mode runs once to warm up, then the modes run round-robin (starting one mode later each round, so
no mode always follows the same neighbour) for `--reps` rounds; the table gives medians. Two figures per
run: tokens/s of `generate()` alone, and tokens/s over the whole `with` block (start-up, the generation,
and the teardown that writes the trace and manifest), which is what a user waits for. Goals (issue 2):
(b)/(a) at most 3% slower, (d)/(c) at most 5% slower.

`--cprofile b` (or `d`) runs that mode once more under cProfile after the table and prints where the time
went, kvtrace's own functions first.

    python benchmarks/recorder_overhead.py                  # ~1-2 min on 2 cores
    python benchmarks/recorder_overhead.py --reps 9 --cprofile d

One intra-op thread by default: on a shared 2-core machine OpenMP's spin-waiting threads make the
runs noisy, and what kvtrace adds (Python hooks once per layer and step) does not depend on it.
No timing is asserted: this prints a table, it is not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
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

MODES = ("a", "b", "c", "d")
MODE_NAMES = {
    "a": "plain generate()",
    "b": "kvtrace, profiler=False",
    "c": "bare torch.profiler",
    "d": "kvtrace, profiler=True",
}


@dataclass(frozen=True)
class Timing:
    generate_s: float
    """Seconds inside `generate()` only."""
    block_s: float
    """Seconds of the whole `with` block, start-up and teardown (trace writing) included."""


@dataclass
class Workload:
    model: Any
    input_ids: Any
    attention_mask: Any
    pad_id: int
    new_tokens: int

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[0]) * self.new_tokens


def build_workload(new_tokens: int, batch: int) -> Workload:
    """The demo's defaults: tiny Llama 3, the built-in prompts, left-padded."""
    from kvtrace.llama import DEFAULT_PROMPTS, build_model, encode_batch, llama3_tokenizer

    model = build_model("tiny")
    prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(batch)]
    pad_id = int(model.config.pad_token_id)
    input_ids, mask = encode_batch(llama3_tokenizer(), prompts, pad_id)
    return Workload(model, input_ids, mask, pad_id, new_tokens)


def _generate(work: Workload) -> float:
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    out = work.model.generate(
        work.input_ids,
        attention_mask=work.attention_mask,
        max_new_tokens=work.new_tokens,
        min_new_tokens=work.new_tokens,
        do_sample=False,
        pad_token_id=work.pad_id,
    )
    elapsed = time.perf_counter() - started
    if out.shape[1] - work.input_ids.shape[1] != work.new_tokens:
        raise RuntimeError(
            f"generated {out.shape[1] - work.input_ids.shape[1]} tokens, not {work.new_tokens}"
        )
    return elapsed


@contextlib.contextmanager
def _mode_context(mode: str, work: Workload, out_dir: Path) -> Iterator[None]:
    """The recording context of one mode; (a) records nothing."""
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    import kvtrace

    if mode == "a":
        yield
    elif mode == "b":
        with kvtrace.record(out_dir, model=work.model, profiler=False, overwrite=True):
            yield
    elif mode == "c":
        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            on_trace_ready=tensorboard_trace_handler(str(out_dir / "profiler")),
        ):
            yield
    elif mode == "d":
        # RecordOptions' defaults match (c): CPU activity (CUDA too only where available), memory on,
        # no shapes, no stacks, plain (not gzipped) trace through tensorboard_trace_handler.
        with kvtrace.record(out_dir, model=work.model, profiler=True, overwrite=True):
            yield
    else:
        raise ValueError(mode)


def run_once(mode: str, work: Workload, scratch: Path) -> Timing:
    import torch

    out_dir = Path(tempfile.mkdtemp(prefix=f"mode_{mode}_", dir=scratch))
    try:
        with torch.no_grad():
            started = time.perf_counter()
            with _mode_context(mode, work, out_dir):
                generate_s = _generate(work)
            block_s = time.perf_counter() - started
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return Timing(generate_s, block_s)


def _round_robin(reps: int) -> Iterator[tuple[int, str]]:
    for rep in range(reps):
        for offset in range(len(MODES)):
            yield rep, MODES[(rep + offset) % len(MODES)]


def _ratio_line(label: str, slow: float, fast: float, goal: float) -> str:
    slower = fast / slow - 1.0  # tokens/s: higher is better, so fast/slow - 1 is the slowdown
    verdict = "meets goal" if slower <= goal else "MISSES goal"
    return (
        f"  {label:<34} {slow / fast:6.3f}x tokens/s  "
        f"({slower * 100:+5.1f}% slower; goal <= {goal:.0%}: {verdict})"
    )


def print_table(timings: dict[str, list[Timing]], tokens: int) -> None:
    def median_rate(mode: str, pick: Callable[[Timing], float]) -> float:
        return statistics.median(tokens / pick(t) for t in timings[mode])

    gen = {m: median_rate(m, lambda t: t.generate_s) for m in MODES}
    block = {m: median_rate(m, lambda t: t.block_s) for m in MODES}
    reps = len(timings["a"])
    print(f"\nmedian of {reps} interleaved runs, {tokens} generated tokens per run (batch x new tokens)")
    print(f"{'mode':<30} {'generate() tok/s':>17} {'whole block tok/s':>18} {'min..max generate tok/s':>25}")
    for mode in MODES:
        rates = sorted(tokens / t.generate_s for t in timings[mode])
        spread = f"{rates[0]:.1f}..{rates[-1]:.1f}"
        print(f"({mode}) {MODE_NAMES[mode]:<26} {gen[mode]:>17.1f} {block[mode]:>18.1f} {spread:>25}")
    print("\nratios (generate() only)")
    print(_ratio_line("(b)/(a) kvtrace / plain", gen["b"], gen["a"], 0.03))
    print(_ratio_line("(d)/(c) kvtrace+prof / profiler", gen["d"], gen["c"], 0.05))
    print("ratios (whole block, start-up and trace writing included)")
    print(_ratio_line("(b)/(a) kvtrace / plain", block["b"], block["a"], 0.03))
    print(_ratio_line("(d)/(c) kvtrace+prof / profiler", block["d"], block["c"], 0.05))


def profile_mode(mode: str, work: Workload, scratch: Path, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    run_once(mode, work, scratch)
    profiler.disable()
    stats = pstats.Stats(profiler)
    listings = (
        ("kvtrace's own functions, by own time", "tottime", ("kvtrace/",)),
        ("kvtrace's own functions, by cumulative time", "cumulative", ("kvtrace/",)),
        ("all functions, by own time", "tottime", ()),
    )
    for title, order, restrictions in listings:
        buffer = io.StringIO()
        stats.stream = buffer  # type: ignore[attr-defined]
        stats.sort_stats(order).print_stats(*restrictions, top)
        print(f"\ncProfile of one run of ({mode}) {MODE_NAMES[mode]}: {title}")
        print(_trim_pstats(buffer.getvalue()))


def _trim_pstats(text: str) -> str:
    """pstats output without its preamble (file name, ordering lines)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("ncalls"):
            return "\n".join(lines[i:]).rstrip()
    return text.rstrip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="interleaved rounds of all four modes (default 5)"
    )
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per run (default 32)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch (default 2, the demo's)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: no OpenMP spin-waits on a busy 2-core machine)",
    )
    parser.add_argument(
        "--cprofile",
        choices=("b", "d"),
        help="afterwards, run this mode once under cProfile and print top costs",
    )
    parser.add_argument("--top", type=int, default=20, help="cProfile entries to print (default 20)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.new_tokens < 1 or args.batch < 1:
        parser.error("--reps, --new-tokens and --batch must be at least 1")

    import torch

    import kvtrace

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = build_workload(args.new_tokens, args.batch)
    print(
        f"kvtrace {kvtrace.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"Llama 3 tiny, batch {args.batch}, prompt {work.input_ids.shape[1]} tokens, {args.new_tokens} new"
    )
    timings: dict[str, list[Timing]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="kvtrace_overhead_") as scratch_name:
        scratch = Path(scratch_name)
        for mode in MODES:  # warm-up: first generate(), first profiler session, first hook install
            run_once(mode, work, scratch)
        for rep, mode in _round_robin(args.reps):
            timing = run_once(mode, work, scratch)
            timings[mode].append(timing)
            print(
                f"  round {rep + 1}/{args.reps} ({mode}) {work.tokens / timing.generate_s:8.1f} tok/s "
                f"generate, {work.tokens / timing.block_s:8.1f} tok/s block",
                flush=True,
            )
        print_table(timings, work.tokens)
        if args.cprofile:
            profile_mode(args.cprofile, work, scratch, args.top)
    print(f"\ntotal runtime {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
