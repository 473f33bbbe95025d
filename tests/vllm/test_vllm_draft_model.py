"""Speculative decoding with a drafter that keeps KV (a draft model, an EAGLE head; both run on vLLM's CPU
build): vLLM puts the drafter's attention layers in the target's pool, a page of every block each, and gives
each request `num_lookahead_tokens` slots past its scheduled tokens for the drafter to write. The run says how
many layers are the drafter's, and the report's arithmetic, `plan --from-run` and the request events count
them as vLLM did: a pool of (4 + drafter) layers a block, not the target's 4."""

from __future__ import annotations

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
    prompts,
    record_drafting,
    sampling,
)

DRAFTS = 3
BLOCKS = 16  # the pool asked for: 16 blocks of every layer, one of them the null block; 8 x 3 wanted
# the drafter's attention layers: a 2-layer Llama as a draft model, a 1-layer EAGLE head
DRAFTER_LAYERS = {"draft_model": 2, "eagle": 1}


def _block_bytes(layers: int) -> int:
    return layers * 2 * SIZE.num_kv_heads * HEAD_DIM * BLOCK_SIZE * DTYPE_BYTES


def _write_draft_model(folder: Path, layers: int) -> Path:
    """A random-weight Llama of the target's shape and vocabulary, with fewer layers."""
    import dataclasses

    import torch

    from kvtrace.llama import build_model

    build_model(dataclasses.replace(SIZE, num_layers=layers), dtype=torch.bfloat16, seed=1).save_pretrained(
        folder
    )
    return folder


def _write_eagle_head(folder: Path, layers: int) -> Path:
    """A random-weight EAGLE head for the target (vLLM's `EagleLlamaForCausalLM`): decoder layers without
    their first input norm, and `fc`, which mixes the token's embedding with the target's hidden state."""
    import dataclasses

    import torch
    from safetensors.torch import save_file

    from kvtrace.llama import build_model

    model = build_model(dataclasses.replace(SIZE, num_layers=layers), dtype=torch.bfloat16, seed=2)
    weights = {
        name.removeprefix("model."): tensor.contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith("model.")
        and name not in ("model.norm.weight", "model.layers.0.input_layernorm.weight")
    }
    torch.manual_seed(3)
    weights["fc.weight"] = (torch.randn(SIZE.hidden_size, 2 * SIZE.hidden_size) * 0.02).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    config = model.config.to_dict() | {"architectures": ["EagleLlamaForCausalLM"]}
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder


@pytest.fixture(scope="module", params=sorted(DRAFTER_LAYERS))
def recorded(
    request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    method: str = request.param
    layers = DRAFTER_LAYERS[method]
    folder = tmp_path_factory.mktemp(f"drafter-{method}")
    drafter = (_write_draft_model if method == "draft_model" else _write_eagle_head)(folder, layers)
    llm = make_llm(
        tiny_model_dir,
        speculative_config={"method": method, "model": str(drafter), "num_speculative_tokens": DRAFTS},
        kv_cache_memory_bytes=BLOCKS * _block_bytes(SIZE.num_layers + layers),
    )
    run_dir = tmp_path_factory.mktemp(f"vllm-{method}") / "run"
    figures = record_drafting(llm, run_dir, prompts(), sampling())
    figures.update(method=method, drafter_layers=layers, drafter_dir=drafter)
    del llm
    gc.collect()  # before the next engine starts
    return figures


def _held_bytes(folder: Path) -> tuple[int, int]:
    """(parameters, bytes vLLM holds) of a checkpoint's tensors: each tensor's bytes, the embedding's
    vocabulary padded to a multiple of 64 rows (vLLM's `DEFAULT_VOCAB_PADDING_SIZE`). A tied lm_head is not in
    the checkpoint, nor an EAGLE head's (vLLM gives it the target's)."""
    from safetensors import safe_open

    params = held = 0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as checkpoint:
        for name in checkpoint.keys():  # noqa: SIM118 (safe_open is no dict)
            tensor = checkpoint.get_tensor(name)
            rows = tensor.shape[0]
            if name.endswith("embed_tokens.weight"):
                rows = -(-rows // 64) * 64
            params += tensor.numel()
            held += rows * (tensor.numel() // tensor.shape[0]) * tensor.element_size()
    return params, held


def _json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_run_says_the_drafter_and_its_lookahead(recorded: dict[str, Any]) -> None:
    engine = recorded["engine"]
    assert engine["config"]["speculative_method"] == recorded["method"]
    assert engine["config"]["num_speculative_tokens"] == DRAFTS
    assert engine["config"]["num_lookahead_tokens"] == DRAFTS  # the drafter writes KV past the drafts
    assert engine["model"]["num_layers"] == SIZE.num_layers
    assert engine["model"]["draft_kv_layers"] == recorded["drafter_layers"]
    assert recorded["drafts"] > 0


def test_the_pool_holds_the_drafters_layers_under_their_own_numbers(recorded: dict[str, Any]) -> None:
    engine = recorded["engine"]
    layers = SIZE.num_layers + recorded["drafter_layers"]
    assert engine["num_blocks"] == BLOCKS
    assert engine["bytes_per_block"] == _block_bytes(layers)
    assert engine["kv_cache_bytes"] == BLOCKS * _block_bytes(layers)
    # a draft model's layers are `draft_model.model.layers.0`, ...: numbered after the target's, not as its 0
    assert [entry["layer"] for entry in engine["layers"]] == list(range(layers))


def test_the_reports_arithmetic_counts_the_drafters_layers(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    kv = _json(["report", str(recorded["dir"])], capsys)["kv"]
    per_token = (
        (SIZE.num_layers + recorded["drafter_layers"]) * 2 * SIZE.num_kv_heads * HEAD_DIM * DTYPE_BYTES
    )
    assert kv["bytes_per_token_measured"] == per_token
    assert kv["bytes_per_token_expected"] == per_token  # was the target's 4 layers' 2,048


def test_plan_from_run_gives_the_pool_vllm_made(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    layers = SIZE.num_layers + recorded["drafter_layers"]
    plan = _json(["plan", "--engine", "vllm", "--from-run", str(recorded["dir"])], capsys)
    assert plan["bytes_per_block"] == recorded["engine"]["bytes_per_block"] == _block_bytes(layers)
    assert plan["num_blocks"] == recorded["engine"]["num_blocks"] == BLOCKS  # was 24 (16 x 6 / 4)
    assert plan["kv_bytes_per_token"] == _block_bytes(layers) // BLOCK_SIZE
    assert plan["needed_bytes"] == -(-MAX_MODEL_LEN // BLOCK_SIZE) * _block_bytes(layers)


def test_each_events_kv_tokens_and_lookahead_fill_the_blocks_vllm_gave(recorded: dict[str, Any]) -> None:
    from analyzers.planning.vllm_diagnose import lookahead_of, request_kv_tokens
    from analyzers.readers.engine_files import read_engine

    run = read_engine(recorded["dir"])
    assert run is not None
    assert lookahead_of(run.info.config) == (DRAFTS, MAX_MODEL_LEN)
    assert sum(e.event == "preempted" for e in run.requests) == recorded["preemptions"] > 0
    held = [e for e in run.requests if e.event in ("scheduled", "blocks", "resumed")]
    for e in held:
        # vLLM allocates slots for the computed tokens, the drafts scheduled, and the drafter's lookahead
        assert -(-request_kv_tokens(e, DRAFTS, MAX_MODEL_LEN) // BLOCK_SIZE) == e.blocks, e
    # without the lookahead, some requests hold a block more than their tokens fill
    assert any(-(-request_kv_tokens(e) // BLOCK_SIZE) < e.blocks for e in held)


def test_the_diagnosis_prices_blocks_of_every_layer(
    recorded: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    diagnosis = _json(["diagnose", str(recorded["dir"])], capsys)
    block = _block_bytes(SIZE.num_layers + recorded["drafter_layers"])
    assert diagnosis["preemptions"] == recorded["preemptions"]
    assert diagnosis["bytes_per_block"] == block
    assert diagnosis["kv_cache_memory_bytes_needed"] == diagnosis["blocks_needed"] * block
    # AND its model line says the drafts and the lookahead apart (it said "up to 6 draft tokens a step")
    assert (
        f"gives up to {DRAFTS} draft tokens a step their slots before they are accepted, and the drafter "
        f"{DRAFTS} lookahead slots besides"
    ) in diagnosis["model"]


def test_the_weights_are_the_targets_and_the_drafters(recorded: dict[str, Any], tiny_model_dir: Path) -> None:
    # GIVEN the bytes vLLM holds of each checkpoint, from its safetensors: the draft model's (tied, 2 layers)
    # 2,886,144 B; the EAGLE head's 1,966,592 B (its embedding, random, differs from the target's and is kept;
    # its lm_head is the target's)
    target_params, target = _held_bytes(tiny_model_dir)
    _, drafter = _held_bytes(recorded["drafter_dir"])
    assert target == 5_247_488
    engine = recorded["engine"]
    # THEN the worker's weights are both (they were the target's 5,247,488 B alone), the drafter's share apart
    assert engine["memory_profile"]["weights_bytes"] == target + drafter
    assert engine["memory_profile"]["draft_weights_bytes"] == drafter
    # AND the parameters name the target's checkpoint, not the drafter's
    assert engine["model"]["num_params"] == target_params


def test_the_plan_and_the_report_weigh_the_drafter(
    recorded: dict[str, Any], tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, target = _held_bytes(tiny_model_dir)
    _, drafter = _held_bytes(recorded["drafter_dir"])
    run = str(recorded["dir"])
    # WHEN the plan sizes the pool from a GPU's memory less the run's weights, buffers, ...
    argv = ["plan", "--engine", "vllm", "--from-run", run, "--gpu-memory", "1GiB"]
    plan = _json(argv, capsys)
    targets_only = _json([*argv, "--weights-bytes", str(target)], capsys)
    # THEN its weights are the target's and the drafter's, and its KV memory that much the less
    assert plan["weights_bytes"] == target + drafter
    assert targets_only["available_kv_bytes"] - plan["available_kv_bytes"] == drafter
    assert f"weights: the target's {target:,} B and the drafter's {drafter:,} B" in " ".join(plan["notes"])
    # AND the report says both where it says what the trace missed
    assert main(["report", run, "--json", "--no-export", "-q"]) == 0
    notes = " ".join(json.loads(capsys.readouterr().out)["notes"])
    assert (
        f"the model's weights ({(target + drafter) / 2**20:.2f} MiB, engine.json: the target's "
        f"{target / 2**20:.2f} MiB and the drafter's {drafter / 2**20:.2f} MiB)"
    ) in notes
