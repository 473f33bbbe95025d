"""Regenerates the vLLM sample runs in this folder, with the vLLM environment:

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv-vllm/bin/python sample_traces/regenerate_vllm.py [NAME]  # ~1-2 min

(`vllm_preempt_equal` alone when named; the other two are recorded together.)

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
NAMES = ("vllm_preempt", "vllm_refused", "vllm_preempt_equal")


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


def main(names: list[str]) -> int:
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
