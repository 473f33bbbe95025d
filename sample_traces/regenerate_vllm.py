"""Regenerates the vLLM sample runs in this folder, with the vLLM environment:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python sample_traces/regenerate_vllm.py [NAME]  # ~1-2 min

(a run named is recorded alone, but vllm_preempt and vllm_refused, recorded together; with no name, each in
its own interpreter.)

vllm_preempt/  the tests' workload (tests/vllm/workload.py): a tiny Llama 3-shaped model (random weights,
               written with save_pretrained), a 16-block pool of 32 tokens, 8 requests of 40 prompt tokens
               and 48 new ones: vLLM preempts. Recorded in-process with `kvtrace.record(dir, model=llm)`
               (profiler off, to keep the folder small). `vllm_figures.json` holds vLLM's own figures.
vllm_refused/  the same model asked for max_model_len 512 in that pool: vLLM refuses to start; recorded with
               `kvtrace.record(dir)` and no model.
vllm_preempt_equal/  the same model, 8 equal requests of 29 prompt tokens and 100 new ones in a 32-block
               pool (31 usable): each holds at most 29 + 100 - 1 = 128 tokens (4 blocks; the last sampled
               token gets no KV), 32 blocks together, so vLLM preempts once, at the step where all 8 need
               their 4th block.
vllm_override/  the same model in a pool set by num_gpu_blocks_override=10 (kv_cache_memory_bytes would give
               16 blocks), two short requests: `vllm_figures.json` holds the blocks, "KV cache size" tokens
               and maximum concurrency vLLM computed from the override.
vllm_refused_override/  max_model_len 256 (8 blocks) with num_gpu_blocks_override=5 (4 usable) in 1 MiB:
               vLLM refuses, whatever the memory or the dtype. `vllm_figures.json` holds what vLLM then did
               with other settings (`outcomes`: the blocks it started with, or the refusal's estimate).
vllm_preempt_mixed/  5 requests of different lengths (prompts 150, 40, 130, 100, 60; new tokens 20, 70, 30,
               40, 30) in 10 blocks, max_num_seqs 4, chunks of 48 tokens, no prefix caching: vLLM preempts
               once. The worst case (the 4 largest requests together) is 20 blocks, the recorded schedule's
               demand peaks at 10; `vllm_figures.json` holds the same workload rerun with fp8 KV (20 blocks
               in the same memory, 19 usable): no preemption.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


EQUAL_POOL_BLOCKS, EQUAL_PROMPT_TOKENS, EQUAL_NEW_TOKENS = 32, 29, 100
NAMES = (
    "vllm_preempt",
    "vllm_refused",
    "vllm_preempt_equal",
    "vllm_override",
    "vllm_refused_override",
    "vllm_preempt_mixed",
)
OVERRIDE_BLOCKS, REFUSED_OVERRIDE_BLOCKS = 10, 5
# (prompt tokens, new tokens) of each request of vllm_preempt_mixed
MIXED_REQUESTS = ((150, 20), (40, 70), (130, 30), (100, 40), (60, 30))
MIXED_SETTINGS = {"max_num_seqs": 4, "max_num_batched_tokens": 48, "enable_prefix_caching": False}


def parse_names(argv: list[str]) -> list[str]:
    """The runs named, read before vLLM is loaded: `--help` or a typo must not re-record anything."""
    parser = argparse.ArgumentParser(
        prog="regenerate_vllm.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"of {', '.join(NAMES)} (default: all)")
    names: list[str] = parser.parse_args(argv).names
    unknown = [name for name in names if name not in NAMES]
    if unknown:
        parser.error(f"unknown run {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    return names


def _figures(llm: Any) -> dict[str, Any]:
    from tests.vllm.workload import metric

    return {
        "vllm_version": __import__("vllm").__version__,
        "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
        "num_preemptions": metric(llm, "vllm:num_preemptions"),
        "request_num_preemptions_sum": metric(llm, "vllm:request_num_preemptions"),
        "prefix_cache_queries": metric(llm, "vllm:prefix_cache_queries"),
        "prefix_cache_hits": metric(llm, "vllm:prefix_cache_hits"),
    }


def _write_figures(name: str, figures: dict[str, Any]) -> None:
    (HERE / name / "vllm_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"{name}: {figures}")


def _record_override(model_dir: Path) -> None:
    import kvtrace
    from tests.vllm.workload import make_llm, prompts, sampling

    llm = make_llm(model_dir, num_gpu_blocks_override=OVERRIDE_BLOCKS)
    with kvtrace.record(HERE / "vllm_override", model=llm, profiler=False, overwrite=True):
        llm.generate(prompts(2), sampling(8), use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    figures = {**_figures(llm), "kv_cache_size_tokens": cache.kv_cache_size_tokens}
    figures["kv_cache_max_concurrency"] = cache.kv_cache_max_concurrency
    _write_figures("vllm_override", figures)


def _start_outcome(model_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """What vLLM does with `settings` over the refused sample's: the blocks it starts with, or the largest
    max_model_len its refusal names."""
    import gc
    import re

    from tests.vllm.workload import make_llm

    try:
        llm = make_llm(model_dir, **settings)
    except ValueError as exc:
        estimate = re.search(r"estimated maximum model length is (\d+)", str(exc))
        return {"settings": settings, "refused_estimate": int(estimate.group(1)) if estimate else None}
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    del llm
    gc.collect()
    return {"settings": settings, "num_gpu_blocks": blocks}


def _record_refused_override(model_dir: Path) -> None:
    import kvtrace
    from tests.vllm.workload import make_llm

    try:
        with kvtrace.record(HERE / "vllm_refused_override", profiler=False, overwrite=True):
            make_llm(model_dir, num_gpu_blocks_override=REFUSED_OVERRIDE_BLOCKS)
    except ValueError as exc:
        print(f"vllm_refused_override: {str(exc)[:120]}...")
    outcomes = [
        _start_outcome(model_dir, settings)
        for settings in (
            {"num_gpu_blocks_override": 8},
            {"num_gpu_blocks_override": 9},
            {"num_gpu_blocks_override": None},
            {"num_gpu_blocks_override": REFUSED_OVERRIDE_BLOCKS, "kv_cache_dtype": "fp8"},
            {"num_gpu_blocks_override": REFUSED_OVERRIDE_BLOCKS, "kv_cache_memory_bytes": 589_824},
            {"num_gpu_blocks_override": REFUSED_OVERRIDE_BLOCKS, "kv_cache_memory_bytes": 4 * 2**20},
        )
    ]
    _write_figures(
        "vllm_refused_override", {"vllm_version": __import__("vllm").__version__, "outcomes": outcomes}
    )


def _mixed_workload(llm: Any) -> None:
    from tests.vllm.workload import prompts, sampling

    requests = [prompts(len(MIXED_REQUESTS), length)[row] for row, (length, _) in enumerate(MIXED_REQUESTS)]
    params = [sampling(new_tokens) for _, new_tokens in MIXED_REQUESTS]
    llm.generate(requests, params, use_tqdm=False)


def _record_mixed(model_dir: Path) -> None:
    import gc

    import kvtrace
    from tests.vllm.workload import BLOCK_BYTES, make_llm

    pool = 10 * BLOCK_BYTES
    llm = make_llm(model_dir, kv_cache_memory_bytes=pool, **MIXED_SETTINGS)
    with kvtrace.record(HERE / "vllm_preempt_mixed", model=llm, profiler=False, overwrite=True):
        _mixed_workload(llm)
    figures = _figures(llm)
    del llm
    gc.collect()
    fp8 = make_llm(model_dir, kv_cache_memory_bytes=pool, kv_cache_dtype="fp8", **MIXED_SETTINGS)
    _mixed_workload(fp8)
    figures["fp8_rerun"] = _figures(fp8)
    _write_figures("vllm_preempt_mixed", figures)


def main(names: list[str]) -> int:
    if not names:
        # One interpreter per run: an engine made after another's teardown in the same process finds
        # vLLM's distributed state gone ("pipeline model parallel group is not initialized")
        import subprocess

        for name in (n for n in NAMES if n != "vllm_refused"):  # recorded with vllm_preempt
            done = subprocess.run([sys.executable, __file__, name], check=False)
            if done.returncode:
                print(f"regenerate_vllm.py: {name} failed (exit {done.returncode})", file=sys.stderr)
                return done.returncode
        return 0
    import kvtrace
    from tests.vllm.scripts import REFUSED_MAX_MODEL_LEN, REFUSED_POOL_BYTES
    from tests.vllm.workload import BLOCK_BYTES, make_llm, prompts, run_workload, sampling, write_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "tiny-llama3")
        if not names or "vllm_preempt_equal" in names:
            llm = make_llm(model_dir, kv_cache_memory_bytes=EQUAL_POOL_BLOCKS * BLOCK_BYTES)
            out = HERE / "vllm_preempt_equal"
            with kvtrace.record(out, model=llm, profiler=False, overwrite=True):
                llm.generate(prompts(length=EQUAL_PROMPT_TOKENS), sampling(EQUAL_NEW_TOKENS), use_tqdm=False)
            figures = _figures(llm)
            (out / "vllm_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
            print(f"vllm_preempt_equal: {figures}")
            del llm
        if not names or "vllm_override" in names:
            _record_override(model_dir)
        if not names or "vllm_refused_override" in names:
            _record_refused_override(model_dir)
        if not names or "vllm_preempt_mixed" in names:
            _record_mixed(model_dir)
        if names and not {"vllm_refused", "vllm_preempt"} & set(names):
            return 0
        try:
            with kvtrace.record(HERE / "vllm_refused", profiler=False, overwrite=True):
                make_llm(
                    model_dir, kv_cache_memory_bytes=REFUSED_POOL_BYTES, max_model_len=REFUSED_MAX_MODEL_LEN
                )
        except ValueError as exc:
            print(f"vllm_refused: {str(exc)[:120]}...")
        llm = make_llm(model_dir)
        out = HERE / "vllm_preempt"
        with kvtrace.record(out, model=llm, profiler=False, overwrite=True):
            run_workload(llm)
        figures = _figures(llm)
        (out / "vllm_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
        print(f"vllm_preempt: {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse_names(sys.argv[1:])))
