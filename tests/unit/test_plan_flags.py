"""`kvtrace plan`'s flags say what they plan: a KV dtype no cache of that kind holds is refused, quantized
weights say what a real checkpoint adds, transformers' flags are refused under --engine vllm rather than
ignored, the KV room row is this plan's, and the JSON's remedies carry what the text says."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

GIB = 2**30
SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
# Llama 3 8B's geometry (its config.json): the figures below are derived from it, not read from the planner
VOCAB, HIDDEN, LAYERS, INTERMEDIATE, KV_HEADS, HEAD_DIM, HEADS = 128256, 4096, 32, 14336, 8, 128, 32


def _plan(capsys: Any, *argv: str) -> tuple[int, str, str]:
    status = main(["plan", *argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize(
    ("kv_dtype", "cache"),
    [("int4", None), ("int2", "static"), ("int8", "dynamic"), ("fp8", "static_sliding")],
    ids=["int4-default-dynamic", "int2-static", "int8-dynamic", "fp8-static-sliding"],
)
def test_a_quantized_kv_dtype_needs_a_quantized_cache(capsys: Any, kv_dtype: str, cache: str | None) -> None:
    # GIVEN a KV dtype only transformers' QuantizedCache stores, with a cache that keeps the compute dtype
    flags = ["--cache", cache] if cache else []
    if cache == "static_sliding":
        flags += ["--window", "100"]
    # WHEN planned
    status, out, err = _plan(capsys, "--preset", "llama-3-8b", "--kv-dtype", kv_dtype, *flags, "--json")
    # THEN refused in one line naming the flag to add, not planned as a cache transformers cannot build
    named = cache or "dynamic"
    assert (status, out) == (2, ""), out[:200]
    assert err.count("\n") == 1 and f"--kv-dtype {kv_dtype} with --cache {named}" in err, err
    assert "add --cache quantized" in err, err
    # AND with --cache quantized the same KV dtype is planned: K and V of every layer at its width
    status, out, _ = _plan(
        capsys, "--preset", "llama-3-8b", "--kv-dtype", kv_dtype, "--cache", "quantized", "--json"
    )
    bits = {"int2": 2, "int4": 4, "int8": 8, "fp8": 8}[kv_dtype]
    assert status == 0
    assert json.loads(out)["kv_bytes_per_token"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * bits // 8
    # AND a float KV dtype is kept with the cache given: int4 weights computing in fp16 (bitsandbytes'
    # compute dtype, GPTQ's) hold fp16 K and V, 2 B a value
    fp16 = ["--preset", "llama-3-8b", "--dtype", "int4", "--kv-dtype", "fp16", *flags, "--json"]
    status, out, _ = _plan(capsys, *fp16)
    plan = json.loads(out)
    assert status == 0 and plan["request"]["kv_dtype"] == "fp16"
    assert plan["kv_bytes_per_token"] == LAYERS * 2 * KV_HEADS * HEAD_DIM * 2


def test_quantized_weights_say_what_a_checkpoint_keeps_at_bf16(capsys: Any) -> None:
    # GIVEN Llama 3 8B's parameters: the embeddings and the untied lm_head, V x H each, and 32 layers of
    # attention (q and o H x H, k and v H x 8 heads x 128), the MLP (3 x H x I) and two norms; the final norm
    embedding = VOCAB * HIDDEN
    layer = (
        2 * HIDDEN * HEADS * HEAD_DIM
        + 2 * HIDDEN * KV_HEADS * HEAD_DIM
        + 3 * HIDDEN * INTERMEDIATE
        + 2 * HIDDEN
    )
    params = 2 * embedding + LAYERS * layer + HIDDEN
    assert params == 8_030_261_248
    rotary = 4 * 2 * HEAD_DIM // 2  # inv_freq and original_inv_freq, head_dim / 2 floats each, kept at fp32
    # WHEN planned at int4
    status, out, _ = _plan(capsys, "--preset", "llama-3-8b", "--dtype", "int4", "--json")
    plan = json.loads(out)
    # THEN the weights figure is still every parameter at half a byte (the default is not changed) ...
    assert status == 0 and plan["weights_bytes"] == math.ceil(params / 2) + rotary
    # ... and a note says so, and gives the weights with embed_tokens and lm_head at bf16, as AWQ keeps them
    kept = (params - 2 * embedding) // 2 + 2 * 2 * embedding + rotary
    (note,) = [note for note in plan["notes"] if note.startswith("weights: ")]
    assert f"all {params:,} parameters counted at int4 (0.5 B each), with no quantization scales" in note
    assert (
        f"keep embed_tokens and lm_head at bf16, as AWQ, GPTQ and bitsandbytes' nf4 do ({2 * embedding:,}"
        in note
    )
    assert f"{kept / GIB:.2f} GiB ({kept:,} B) with them kept so" in note, note
    # AND the group scales GPTQ and AWQ add: an fp16 scale and a 4-bit zero, 2.5 B, a group of 128 weights
    groups = -(-(params - 2 * embedding) // 128)
    assert f"group scales about {groups * 2.5 / 2**20:.2f} MiB more" in note, note
    # AND bf16 weights get no such note
    _, out, _ = _plan(capsys, "--preset", "llama-3-8b", "--json")
    assert not [note for note in json.loads(out)["notes"] if note.startswith("weights: ")]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--reserve", "0.2"], "--reserve is the transformers plan's margin: with --engine vllm, "),
        (["--cache", "static"], "--cache names a transformers cache: with --engine vllm, "),
        (["--cache", "quantized"], "an fp8 pool is --kv-cache-dtype fp8"),
        (["--window", "100"], "--window sets a transformers sliding cache's window"),
        (["--encoder-tokens", "5"], "--encoder-tokens sizes an encoder-decoder's cross-attention KV"),
    ],
    ids=["reserve", "cache-static", "cache-quantized", "window", "encoder-tokens"],
)
def test_vllm_refuses_transformers_flags(capsys: Any, flags: list[str], said: str) -> None:
    # GIVEN a transformers-only flag (or two lengths) typed with --engine vllm; WHEN planned
    status, out, err = _plan(capsys, "--engine", "vllm", "--preset", "llama-3-8b", *flags)
    # THEN refused in one line, exit 2, as --beams is: not planned without it as if it had been taken
    assert (status, out) == (2, "") and err.count("\n") == 1 and said in err, err


def test_vllm_refuses_a_context_other_than_max_model_len(capsys: Any) -> None:
    # GIVEN --context and --max-model-len, which both give vLLM's max_model_len, that disagree
    vllm = ["--engine", "vllm", "--preset", "llama-3-8b"]
    status, out, err = _plan(capsys, *vllm, "--context", "8192", "--max-model-len", "4096")
    # THEN refused in one line: --context used to be dropped without a word
    assert (status, out) == (2, "") and err.count("\n") == 1, err
    assert "--context 8192 and --max-model-len 4096: with --engine vllm both give max_model_len" in err
    # AND where they agree, one length, planned
    status, out, _ = _plan(capsys, *vllm, "--context", "4096", "--max-model-len", "4096", "--json")
    assert status == 0 and json.loads(out)["request"]["max_model_len"] == 4096


def test_kv_room_says_none_where_the_batch_fills_the_gpu(capsys: Any) -> None:
    # GIVEN Llama 3.1 70B at fp8 on 80 GiB, 4 rows of 8,192 tokens: batch 1 fits, batch 4 does not
    argv = ["--preset", "llama-3.1-70b", "--dtype", "fp8", "--batch", "4"]
    status, out, _ = _plan(capsys, *argv, "--json")
    plan = json.loads(out)
    gpu = 80 * GIB
    taken = plan["weights_bytes"] + plan["reserve_bytes"] + plan["activations_bytes"]
    assert status == 1 and plan["max_batch"] == 1
    # THEN the room at this batch's peak is what is left beside them: none, and no block
    assert plan["kv_budget_bytes"] == gpu - taken < 0 and plan["kv_blocks"] == 0
    # AND the row says so plainly, not "0 B: 0 blocks ..., as a paged pool (vLLM) counts them"
    _, out, _ = _plan(capsys, *argv)
    (row,) = [line.strip() for line in out.splitlines() if line.strip().startswith("KV room")]
    assert row.endswith(
        "none at batch 4: the weights, the reserve and the activations at its peak take "
        f"{taken / GIB:.2f} GiB of 80.00 GiB"
    ), row
    assert "vLLM" not in row


def test_plan_json_remedies_carry_their_sentence_and_bits(capsys: Any) -> None:
    # GIVEN a plan that does not fit
    argv = ["--preset", "llama-3.1-70b", "--dtype", "fp8", "--batch", "4"]
    _, out, _ = _plan(capsys, *argv, "--json")
    remedies = json.loads(out)["remedies"]
    _, text, _ = _plan(capsys, *argv)
    said = [line[len("  - ") :] for line in text.splitlines() if line.startswith("  - ")]
    # THEN each remedy in the JSON has the sentence the text prints, in the same order
    assert [remedy["sentence"] for remedy in remedies] == said and said
    # AND the quantized KV remedy names its bits, 4 (int4), as `kvtrace diagnose` does, where it was null
    quantized = [remedy for remedy in remedies if remedy["kind"] == "quantized_kv"]
    assert [remedy["setting"] for remedy in quantized] == [8, 4]
    assert "to int4 (--cache quantized)" in quantized[1]["sentence"]


def test_plan_offers_the_fp8_cache_diagnose_prices_first(capsys: Any) -> None:
    # GIVEN Llama 3 8B at batch 40 x 8,192 on 80 GiB, which does not fit with a dynamic cache
    code, out, _ = _plan(capsys, "--preset", "llama-3-8b", "--batch", "40", "--context", "8192", "--json")
    remedies = json.loads(out)["remedies"]
    # WHEN the same plan is made with the fp8 cache its remedy names
    fp8 = [r for r in remedies if r["kind"] == "quantized_kv" and r["setting"] == 8]
    code_fp8, out_fp8, _ = _plan(
        capsys, "--preset", "llama-3-8b", "--batch", "40", "--context", "8192", "--cache", "fp8", "--json"
    )
    planned = json.loads(out_fp8)
    # THEN "To make it fit" offers it (it offered int4 alone, where `kvtrace diagnose` ranks fp8 first), at
    # the peak and verdict that plan gives it, beside int4
    assert code == 1 and code_fp8 == 0
    assert [(r["peak_bytes"], r["fits"]) for r in fp8] == [(planned["peak_bytes"], planned["fits"])]
    assert fp8[0]["sentence"].startswith("Quantize the KV cache to fp8 (--cache fp8,")
    assert [r["setting"] for r in remedies if r["kind"] == "quantized_kv"] == [8, 4]


def _llama_config(tmp_path: Any, positions: int) -> str:
    """Llama 3 8B's config.json with `positions` max_position_embeddings."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": positions,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": VOCAB,
    }
    path = tmp_path / f"config-{positions}.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    ("positions", "context", "said"),
    [
        (32768, 8192, "8,192 tokens (the default; the model takes 32,768: --context to change): "),
        (4096, 4096, "4,096 tokens (the default: the model's 4,096 positions; --context to change): "),
    ],
    ids=["model-takes-more", "model-takes-fewer"],
)
def test_a_plan_says_which_settings_are_defaults(
    capsys: Any, tmp_path: Any, positions: int, context: int, said: str
) -> None:
    # GIVEN a config whose model takes `positions` tokens, planned with neither --context nor --gpu-memory
    config = _llama_config(tmp_path, positions)
    status, out, _ = _plan(capsys, "--config", config, "--transformers", "5.17", "--json")
    planned = json.loads(out)
    # THEN the context is 8,192 (Llama 3's) or the model's fewer positions, on 80 GiB, and the JSON names both
    # as defaults
    request = planned["request"]
    assert (status, request["context"], request["gpu_memory_bytes"]) == (0, context, 80 * GIB)
    assert request["defaults"] == ["context", "gpu_memory"]
    # AND the text says so on the context line and the peak line (before: "8,192 tokens: an 8,190-token
    # prompt ..." and "peak ... of 80.00 GiB", as if typed)
    _, text, _ = _plan(capsys, "--config", config, "--transformers", "5.17")
    (context_row,) = [line for line in text.splitlines() if line.startswith("  context ")]
    assert context_row.split(maxsplit=1)[1].startswith(said), context_row
    (peak_row,) = [line for line in text.splitlines() if line.startswith("  peak ")]
    peak = planned["peak_bytes"]
    assert peak_row.endswith(f"{peak / GIB:.2f} GiB of 80.00 GiB (the default --gpu-memory)"), peak_row
    # AND typed, neither is called a default, with the same figures
    typed = ["--context", str(context), "--gpu-memory", "80GiB"]
    status, out, _ = _plan(capsys, "--config", config, "--transformers", "5.17", *typed, "--json")
    assert (status, json.loads(out)["request"]["defaults"], json.loads(out)["peak_bytes"]) == (0, [], peak)
    _, text, _ = _plan(capsys, "--config", config, "--transformers", "5.17", *typed)
    assert "the default" not in text


# vLLM's flags, each typed at the value the plan takes by default (vLLM 0.32's, for Llama 3 8B on an 80 GiB
# GPU: its 8,192 positions, and 16,384 batched tokens on a GPU of 70 GiB or more)
_VLLM_AT_DEFAULTS = {
    "max_model_len": ["--max-model-len", "8192"],
    "dtype": ["--dtype", "bf16"],
    "gpu_memory": ["--gpu-memory", "80GiB"],
    "gpu_memory_utilization": ["--gpu-memory-utilization", "0.92"],
    "block_size": ["--block-size", "16"],
    "kv_cache_dtype": ["--kv-cache-dtype", "auto"],
    "tensor_parallel_size": ["--tensor-parallel-size", "1"],
    "pipeline_parallel_size": ["--pipeline-parallel-size", "1"],
    "activation_peak": ["--activation-peak", "0"],
    "non_torch": ["--non-torch", "0"],
    "max_num_batched_tokens": ["--max-num-batched-tokens", "16384"],
    "async_scheduling": ["--async-scheduling"],
}


def test_a_vllm_plan_says_which_flags_are_defaults(capsys: Any) -> None:
    # GIVEN Llama 3 8B planned for vLLM with no flag typed
    status, out, _ = _plan(capsys, "--engine", "vllm", "--preset", "llama-3-8b", "--json")
    planned = json.loads(out)
    # THEN the JSON names every flag as a default, as the transformers plan's does (before: no such key)
    assert status == 0
    assert planned["request"]["defaults"] == list(_VLLM_AT_DEFAULTS)
    # AND each typed (at the same value) leaves the default list, the figures unchanged
    for typed in (["max_model_len", "gpu_memory", "async_scheduling"], list(_VLLM_AT_DEFAULTS)):
        argv = [arg for name in typed for arg in _VLLM_AT_DEFAULTS[name]]
        status, out, _ = _plan(capsys, "--engine", "vllm", "--preset", "llama-3-8b", *argv, "--json")
        again = json.loads(out)
        assert again["request"]["defaults"] == [name for name in _VLLM_AT_DEFAULTS if name not in typed]
        assert (status, again["num_blocks"]) == (0, planned["num_blocks"])


def test_a_vllm_plan_from_a_run_takes_no_setting_the_run_gives_as_a_default(capsys: Any) -> None:
    # GIVEN a recorded CPU run whose engine.json gives its settings, but no device memory, activation peak,
    # non-torch memory or async scheduling (null or absent)
    run = SAMPLES / "vllm_override"
    engine = json.loads((run / "engine.json").read_text())
    profile, config = engine["memory_profile"], engine["config"]
    unset = [profile[k] for k in ("total_device_bytes", "activation_peak_bytes", "non_torch_bytes")]
    assert unset == [None] * 3
    assert config.get("async_scheduling") is None and config["max_model_len"] == 256
    # WHEN it is planned with no flag
    status, out, _ = _plan(capsys, "--engine", "vllm", "--from-run", str(run), "--json")
    # THEN only those four are named defaults
    assert status == 0
    defaults = ["gpu_memory", "activation_peak", "non_torch", "async_scheduling"]
    assert json.loads(out)["request"]["defaults"] == defaults
