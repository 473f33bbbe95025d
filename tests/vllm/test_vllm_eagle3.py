"""Speculative decoding with an EAGLE-3 head (vLLM's `Eagle3LlamaForCausalLM`, method "eagle3"), checked
against vLLM's own objects and metrics: the head reads 3 of the target's hidden states through `fc` (3 x
hidden in), has its own lm_head over a smaller draft vocabulary (`d2t`: draft id -> target id) and no
embedding (it is given the target's). Its one attention layer is in the target's pool, numbered after the
target's 4; each request gets 3 lookahead slots. A guard: every figure agreed with vLLM when written."""

from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace.cli import main
from tests.vllm.workload import (
    BLOCK_SIZE,
    DTYPE_BYTES,
    HEAD_DIM,
    MAX_MODEL_LEN,
    SIZE,
    make_llm,
    metric,
    prompts,
    record_drafting,
    sampling,
)

DRAFTS, BLOCKS, DRAFT_VOCAB = 3, 16, 500
LAYERS = SIZE.num_layers + 1  # the head's one attention layer beside the target's 4
BLOCK_BYTES = LAYERS * 2 * SIZE.num_kv_heads * HEAD_DIM * BLOCK_SIZE * DTYPE_BYTES  # 81,920 B
TARGET_BYTES = 5_247_488  # the tiny target as vLLM holds it (tests/vllm/test_vllm_draft_model.py)


def _write_eagle3_head(folder: Path) -> Path:
    """A random-weight EAGLE-3 head in the published checkpoints' layout (`midlayer.*`, `fc`, `norm`,
    `lm_head` of the draft vocabulary, `d2t` and `t2d`; no `embed_tokens`). Its aux layers are named: vLLM's
    default for a 4-layer Llama, (2, 2, 1), repeats one, and fc's 3 x hidden input then gets 2 x hidden."""
    import torch
    from safetensors.torch import save_file

    from kvtrace.llama import llama3_config

    hidden, kv_width, inner = SIZE.hidden_size, SIZE.num_kv_heads * HEAD_DIM, SIZE.intermediate_size
    torch.manual_seed(4)

    def random(*shape: int) -> Any:
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    weights = {
        # the first layer's attention reads the token's embedding and the fused hidden state: 2 x hidden in
        "midlayer.self_attn.q_proj.weight": random(hidden, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": random(kv_width, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": random(kv_width, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": random(hidden, hidden),
        "midlayer.mlp.gate_proj.weight": random(inner, hidden),
        "midlayer.mlp.up_proj.weight": random(inner, hidden),
        "midlayer.mlp.down_proj.weight": random(hidden, inner),
        **{
            f"midlayer.{norm}.weight": random(hidden)
            for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm")
        },
        "norm.weight": random(hidden),
        "fc.weight": random(hidden, 3 * hidden),
        "lm_head.weight": random(DRAFT_VOCAB, hidden),
        "d2t": torch.arange(DRAFT_VOCAB, dtype=torch.int64),  # draft id i -> target id i + d2t[i] = 2i
        "t2d": torch.arange(SIZE.vocab_size) % 2 == 0,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    config = llama3_config(dataclasses.replace(SIZE, num_layers=1)).to_dict() | {
        "architectures": ["LlamaForCausalLMEagle3"],
        "draft_vocab_size": DRAFT_VOCAB,
        "tie_word_embeddings": False,
        "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
    }
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder


def _vllm_facts(llm: Any) -> dict[str, Any]:
    """What vLLM itself made of the head: its pool, its drafter's layers, the model objects it shares."""
    core = llm.llm_engine.engine_core.engine_core
    kv_config = core.scheduler.kv_cache_manager.kv_cache_config
    runner = core.model_executor.driver_worker.worker.model_runner
    head, target = runner.drafter.model, runner.get_model()
    return {
        "num_blocks": kv_config.num_blocks,
        "pool_bytes": sum(int(t.size) for t in kv_config.kv_cache_tensors),
        "page_bytes": kv_config.kv_cache_groups[0].kv_cache_spec.page_size_bytes,
        "layers": [name for t in kv_config.kv_cache_tensors for name in t.layers],
        "draft_layers": sorted(runner.drafter._draft_attn_layer_names),
        "lookahead": core.scheduler.num_lookahead_tokens,
        "embedding_is_targets": head.model.embed_tokens is target.model.embed_tokens,
        "lm_head_rows": None if head.lm_head is target.lm_head else head.lm_head.weight.shape[0],
    }


@pytest.fixture(scope="module")
def recorded(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    head = _write_eagle3_head(tmp_path_factory.mktemp("eagle3-head"))
    spec = {"method": "eagle3", "model": str(head), "num_speculative_tokens": DRAFTS}
    llm = make_llm(tiny_model_dir, speculative_config=spec, kv_cache_memory_bytes=BLOCKS * BLOCK_BYTES)
    figures = record_drafting(llm, tmp_path_factory.mktemp("vllm-eagle3") / "run", prompts(), sampling())
    figures.update(vllm=_vllm_facts(llm), head_dir=head, spec=spec)
    del llm
    gc.collect()  # before the next engine starts
    return figures


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_pool_and_the_heads_layer_are_vllms(recorded: dict[str, Any]) -> None:
    engine, vllm = recorded["engine"], recorded["vllm"]
    assert engine["config"]["speculative_method"] == "eagle3" and recorded["drafts"] > 0
    assert engine["num_blocks"] == vllm["num_blocks"] == BLOCKS
    assert engine["kv_cache_bytes"] == vllm["pool_bytes"] == BLOCKS * BLOCK_BYTES
    assert engine["bytes_per_block"] == LAYERS * vllm["page_bytes"] == BLOCK_BYTES
    # the head's layer is vLLM's `model.layers.4` (start_layer_id = the target's 4): one, numbered 4
    assert vllm["draft_layers"] == ["model.layers.4.self_attn.attn"]
    assert engine["model"]["draft_kv_layers"] == len(vllm["draft_layers"])
    numbers = {entry["name"]: entry["layer"] for entry in engine["layers"]}
    assert list(numbers) == vllm["layers"] and numbers["model.layers.4.self_attn.attn"] == 4
    assert engine["config"]["num_lookahead_tokens"] == vllm["lookahead"] == DRAFTS


def test_report_and_plan_count_the_heads_layer(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    per_token = LAYERS * recorded["vllm"]["page_bytes"] // BLOCK_SIZE  # 2,560 B
    kv = _json(["report", str(recorded["dir"])], capsys)["kv"]
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == per_token
    plan = _json(["plan", "--engine", "vllm", "--from-run", str(recorded["dir"])], capsys)
    assert (plan["num_blocks"], plan["bytes_per_block"]) == (BLOCKS, BLOCK_BYTES)
    assert plan["kv_bytes_per_token"] == per_token
    assert plan["needed_bytes"] == -(-MAX_MODEL_LEN // BLOCK_SIZE) * BLOCK_BYTES


def test_the_weights_count_the_heads_lm_head_not_the_shared_embedding(
    recorded: dict[str, Any],
) -> None:
    from safetensors import safe_open

    # GIVEN vLLM gave the head the target's embedding and kept its own lm_head, padded to 512 rows
    assert recorded["vllm"]["embedding_is_targets"]
    assert recorded["vllm"]["lm_head_rows"] == -(-DRAFT_VOCAB // 64) * 64
    # AND the bytes vLLM holds of the head's checkpoint: every tensor but t2d (vLLM skips it), the lm_head's
    # rows padded, d2t in int64: 2,103,200 B
    head = 0
    with safe_open(str(recorded["head_dir"] / "model.safetensors"), framework="pt") as checkpoint:
        for name in checkpoint.keys():  # noqa: SIM118 (safe_open is no dict)
            tensor = checkpoint.get_tensor(name)
            rows = -(-tensor.shape[0] // 64) * 64 if name == "lm_head.weight" else tensor.shape[0]
            head += 0 if name == "t2d" else rows * (tensor.numel() // tensor.shape[0]) * tensor.element_size()
    assert head == 2_103_200
    # THEN the worker's weights are the target's and the head's, the head's share apart
    profile = recorded["engine"]["memory_profile"]
    assert (profile["weights_bytes"], profile["draft_weights_bytes"]) == (TARGET_BYTES + head, head)


def test_each_events_blocks_are_its_tokens_drafts_and_lookahead(recorded: dict[str, Any]) -> None:
    from analyzers.planning.vllm_diagnose import lookahead_of, request_kv_tokens
    from analyzers.readers.engine_files import read_engine

    run = read_engine(recorded["dir"])
    assert run is not None and lookahead_of(run.info.config) == (DRAFTS, MAX_MODEL_LEN)
    held = [e for e in run.requests if e.event in ("scheduled", "blocks", "resumed")]
    # the blocks are vLLM's own (the request's block list): the slots it allocated, the lookahead included
    assert all(-(-request_kv_tokens(e, DRAFTS, MAX_MODEL_LEN) // BLOCK_SIZE) == e.blocks for e in held)
    assert any(-(-request_kv_tokens(e) // BLOCK_SIZE) < e.blocks for e in held)


def test_each_fitting_remedy_avoids_every_preemption_in_vllm(
    recorded: dict[str, Any], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the diagnosis of a run vLLM preempted in
    diagnosis = _json(["diagnose", str(recorded["dir"])], capsys)
    assert diagnosis["preemptions"] == recorded["preemptions"] > 0
    fitting = {r["knob"]: r["setting"] for r in diagnosis["remedies"] if r["fits"]}
    assert {"kv_cache_memory_bytes", "max_num_seqs"} <= set(fitting)  # fp8 where this CPU holds it
    for knob, setting in fitting.items():
        # WHEN vLLM reruns the workload with the remedy THEN it preempts no request
        overrides = {"kv_cache_memory_bytes": BLOCKS * BLOCK_BYTES, knob: setting}
        llm = make_llm(tiny_model_dir, speculative_config=recorded["spec"], **overrides)
        llm.generate(prompts(), sampling(), use_tqdm=False)
        assert metric(llm, "vllm:num_preemptions") == 0, (knob, setting)
        if knob == "kv_cache_memory_bytes":  # the 24 blocks the requests need, and the null block
            assert llm.llm_engine.vllm_config.cache_config.num_gpu_blocks == diagnosis["blocks_needed"] == 25
        del llm
        gc.collect()
