"""What recording costs vLLM: tokens/s of the preemption workload, with and without `kvtrace.record`.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python benchmarks/vllm_overhead.py [--rounds 5]

One in-process engine (the tests' tiny Llama 3 shape and 16-block pool, tests/vllm/workload.py); each
round runs the workload unrecorded, recorded (KV log, engine steps and requests, NVTX; profiler off) and,
with --profiler, recorded with torch.profiler too, in turn (interleaved, the order reversed every other
round, so that load on the machine hits every variant alike). The prefix cache is reset before every
run, so that each run preempts the same way. Prints medians of tokens per wall second and per CPU second
of this process (the engine runs here), the ratio to unrecorded, and the recorder's own per-step
bookkeeping (CPU time of the step hook's work after each step): on a loaded machine the end-to-end
figures swing more than any recorder cost, the bookkeeping figure does not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profiler", action="store_true", help="also time recording with torch.profiler")
    args = parser.parse_args(argv)

    import json

    import kvtrace
    from tests.vllm.workload import NEW_TOKENS, REQUESTS, make_llm, metric, run_workload, write_model

    tmp = Path(tempfile.mkdtemp(prefix="kvtrace-vllm-bench-"))
    try:
        llm = make_llm(write_model(tmp / "model"))
        run_workload(llm)  # warm-up
        variants = ["unrecorded", "recorded"] + (["recorded+profiler"] if args.profiler else [])
        rates: dict[str, list[float]] = {name: [] for name in variants}
        cpu_rates: dict[str, list[float]] = {name: [] for name in variants}
        overhead: list[float] = []
        overhead_share: list[float] = []
        steps: list[int] = []
        preemptions: dict[str, list[float]] = {name: [] for name in variants}
        for round_index in range(args.rounds):
            # ABAB then BABA: no variant always runs first in a round
            for name in variants if round_index % 2 == 0 else variants[::-1]:
                llm.reset_prefix_cache()
                before = metric(llm, "vllm:num_preemptions")
                run_dir = tmp / f"run-{round_index}-{name}"
                started, cpu_started = time.perf_counter(), time.process_time()
                if name == "unrecorded":
                    run_workload(llm)
                else:
                    with kvtrace.record(run_dir, model=llm, profiler=name.endswith("profiler")):
                        run_workload(llm)
                elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                rates[name].append(REQUESTS * NEW_TOKENS / elapsed)
                cpu_rates[name].append(REQUESTS * NEW_TOKENS / cpu)
                preemptions[name].append(metric(llm, "vllm:num_preemptions") - before)
                if name == "recorded":
                    engine = json.loads((run_dir / "manifest.json").read_text())["engine"]
                    overhead.append(engine["overhead_ns"] / 1e6)
                    overhead_share.append(engine["overhead_ns"] / 1e9 / cpu)
                    steps.append(engine["engine_steps"])
                shutil.rmtree(run_dir, ignore_errors=True)
        base = statistics.median(rates["unrecorded"])
        cpu_base = statistics.median(cpu_rates["unrecorded"])
        print(
            f"vLLM {__import__('vllm').__version__}, {REQUESTS} requests x {NEW_TOKENS} new tokens, "
            f"{args.rounds} interleaved rounds, medians"
        )
        print("| variant | tokens/s (wall) | vs unrecorded | tokens/CPU-s | vs unrecorded | preemptions |")
        print("|---|---|---|---|---|---|")
        for name in variants:
            rate, cpu_rate = statistics.median(rates[name]), statistics.median(cpu_rates[name])
            print(
                f"| {name} | {rate:.1f} | {rate / base:.3f}x | {cpu_rate:.1f} | {cpu_rate / cpu_base:.3f}x "
                f"| {statistics.median(preemptions[name]):.0f} |"
            )
        per_step_us = 1000 * statistics.median(overhead) / statistics.median(steps)
        print(
            f"recorder bookkeeping: {statistics.median(overhead):.1f} ms per run, "
            f"{statistics.median(steps)} engine steps, {per_step_us:.0f} us per step, "
            f"{100 * statistics.median(overhead_share):.2f}% of the recorded run's CPU time"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
