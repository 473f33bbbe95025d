"""transformers 5.17's continuous-batching pool recorded: the layer pool (a `key_cache` and a `value_cache`
tensor per layer, one `BlockManager`), the version on the GPU machine users run.

A real `generate_batch` on a tiny random Llama 3 (2 layers, 2 KV heads, head_dim 16, float32) with 32 blocks
of 4 tokens. Expected figures come from the KV arithmetic and from transformers' own block tables read while
each step's forward runs (spied on, not through kvtrace), never from the code under test. Before kvtrace read
this layout, the run had no engine files and the report said 0 bytes of KV. Runs only under transformers
5.17 (< 5.18): later ones have the sector pool, which test_hf_continuous_batching.py records."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from packaging.version import Version

pytestmark = pytest.mark.skipif(
    Version(transformers.__version__) >= Version("5.18"),
    reason=f"transformers {transformers.__version__} has the sector pool; the layer pool is 5.17's (< 5.18)",
)

from transformers import GenerationConfig  # noqa: E402
from transformers.generation.configuration_utils import ContinuousBatchingConfig  # noqa: E402
from transformers.generation.continuous_batching import cache as cb_cache  # noqa: E402
from transformers.generation.continuous_batching import offloading_manager  # noqa: E402
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor  # noqa: E402

import kvtrace  # noqa: E402
from kvtrace.cli import main  # noqa: E402
from tests.tiny import HEAD_DIM  # noqa: E402

LAYERS, KV_HEADS, BLOCK, FLOAT32, NUM_BLOCKS = 2, 2, 4, 4, 32
# transformers 5.17 pads every tensor with two blocks past `num_blocks` (read trash, write trash)
TENSOR_BYTES = (NUM_BLOCKS + 2) * BLOCK * KV_HEADS * HEAD_DIM * FLOAT32  # 17408: one layer's K (or V)
POOL_BYTES = TENSOR_BYTES * 2 * LAYERS  # 69632
BLOCK_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * BLOCK * FLOAT32  # 2048: a block id, every layer's K and V
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14]]
NEW_TOKENS = 8


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _record(
    path: Path,
    model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    num_blocks: int = NUM_BLOCKS,
    new_tokens: int = NEW_TOKENS,
) -> tuple[dict[str, Any], list[int]]:
    """Runs generate_batch under record(); returns its outputs and the blocks transformers' block tables held
    while each step's forward ran or, where more, as its offloading manager was called to schedule the step
    (the pool it offloads for: the victims' blocks are free again by the forward)."""
    if importlib.util.find_spec("psutil") is None:
        # On CPU transformers reads free memory with psutil, and without it sees none and refuses any pool:
        # the host's memory, given here (both pool sizes are set below, so it sizes nothing)
        monkeypatch.setattr(
            cb_cache, "get_device_and_memory_breakdown", lambda: (torch.device("cpu"), 2**30, 0, 0)
        )
    held: list[int] = []
    forward = ContinuousBatchProcessor._generation_step

    def counted(proc: Any, step_model: Any) -> None:
        tables = [t for manager in proc.cache.group_cache_managers for t in manager.block_table.values()]
        held.append(sum(len(t) for t in tables))  # one layer group: a block id is a whole-model block
        forward(proc, step_model)

    monkeypatch.setattr(ContinuousBatchProcessor, "_generation_step", counted)
    at_offload: dict[int, int] = {}  # step being scheduled (the forwards so far + 1) -> most held when called
    offload = offloading_manager.OffloadingManager.offload_requests

    def offloading(manager: Any) -> int:
        tables = [t for group in manager.cache.group_cache_managers for t in group.block_table.values()]
        step = len(held) + 1
        at_offload[step] = max(at_offload.get(step, 0), sum(len(t) for t in tables))
        return int(offload(manager))

    monkeypatch.setattr(offloading_manager.OffloadingManager, "offload_requests", offloading)
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=num_blocks, block_size=BLOCK, max_batch_tokens=64)  # type: ignore[call-arg]
    with kvtrace.record(path, model=model, profiler=False):
        outputs = model.generate_batch(
            inputs=PROMPTS,
            generation_config=generation,
            continuous_batching_config=batching,
            progress_bar=False,
        )
    return outputs, [max(blocks, at_offload.get(step, 0)) for step, blocks in enumerate(held, 1)]


def test_the_layer_pool_is_recorded_with_its_tensors_steps_and_requests(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a real generate_batch on 5.17's layer pool, every request fitting from the start
    run = tmp_path / "run"
    outputs, held = _record(run, cb_model, monkeypatch)
    manifest = json.loads((run / "manifest.json").read_text())
    assert len(outputs) == len(PROMPTS) and manifest["ended"]["status"] == "ok"
    assert manifest["warnings"] == []  # was: "a layout kvtrace does not read: ... not recorded"

    # THEN engine.json has the pool: 4 tensors of 34 blocks x 4 tokens, two of them padding
    engine = json.loads((run / "engine.json").read_text())
    assert (engine["name"], engine["version"]) == ("transformers-cb", transformers.__version__)
    assert engine["kv_cache_bytes"] == POOL_BYTES == sum(s["bytes"] for s in engine["storage"])
    assert len(engine["storage"]) == 2 * LAYERS
    assert engine["bytes_per_block"] == BLOCK_BYTES and engine["block_size"] == BLOCK
    assert engine["num_blocks"] == POOL_BYTES // BLOCK_BYTES == NUM_BLOCKS + 2
    assert (engine["usable_blocks"], engine["blocks_reserved"]) == (NUM_BLOCKS, 2)
    assert engine["kv_dtype"] == "float32" and engine["pool_source"] == "key_value_cache"
    assert [(x["layer"], x["bytes"]) for x in engine["layers"]] == [
        (i, 2 * TENSOR_BYTES) for i in range(LAYERS)
    ]
    assert manifest["engine"]["kv_cache_bytes"] == POOL_BYTES

    # AND the KV log has each layer's K and V tensor, its own storage, created once and freed with the pool
    events = _lines(run / "kv_events.jsonl")
    created = [e for e in events if e["event"] == "created"]
    assert sorted((e["layer"], e["kv"]) for e in created) == [(i, kv) for i in range(LAYERS) for kv in "kv"]
    for event in created:
        assert (event["storage_bytes"], event["logical_bytes"], event["dtype"]) == (
            TENSOR_BYTES,
            TENSOR_BYTES,
            "float32",
        )
        assert event["shape"] == [NUM_BLOCKS + 2, BLOCK, KV_HEADS, HEAD_DIM]
        assert event["source"] == "transformers-cb"
    addrs = {e["addr"] for e in created}
    assert addrs == {s["addr"] for s in engine["storage"]} and len(addrs) == 2 * LAYERS
    assert {e["addr"] for e in events if e["event"] == "freed"} == addrs

    # AND one engine step per forward, whose blocks are those the block tables held while it ran
    steps = _lines(run / "engine_steps.jsonl")
    assert manifest["engine"]["engine_steps"] == len(steps) == len(held) == NEW_TOKENS
    assert [s["phase"] for s in steps] == ["prefill"] + ["decode"] * (NEW_TOKENS - 1)
    assert [s["blocks_used_in_step"] for s in steps] == held
    # every prompt and all but the last generated token in KV at the last step, at least
    assert held[-1] >= sum(math.ceil((len(p) + NEW_TOKENS - 1) / BLOCK) for p in PROMPTS)
    assert steps[-1]["blocks_used"] == 0 and steps[-1]["running"] == 0  # the last step finished them all
    for s in steps:
        assert (
            s["blocks_used"] + s["blocks_free"] + s["blocks_reserved"] == s["blocks_total"] == NUM_BLOCKS + 2
        )

    # AND every request, with its prompt and its output tokens
    requests = _lines(run / "engine_requests.jsonl")
    finished = {r["request_id"]: r for r in requests if r["event"] == "finished"}
    scheduled = {r["request_id"]: r for r in requests if r["event"] == "scheduled"}
    assert set(finished) == set(scheduled) == set(outputs)
    for request_id, output in outputs.items():
        assert scheduled[request_id]["prompt_tokens"] == len(output.prompt_ids)
        assert finished[request_id]["output_tokens"] == len(output.generated_tokens) == NEW_TOKENS

    # WHEN the report reads it THEN the KV pool is the four tensors' bytes, and the engine's peak the spy's
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    got = report["engine"]
    assert (got["name"], got["kv_cache_bytes"], got["num_blocks"]) == (
        "transformers-cb",
        POOL_BYTES,
        NUM_BLOCKS + 2,
    )
    assert got["peak_blocks_used"] == max(held) and got["preemptions"] == 0
    assert report["kv"]["peak_bytes"] == POOL_BYTES
    assert report["kv"]["bytes_per_token_measured"] == BLOCK_BYTES / BLOCK


def test_a_small_layer_pool_takes_requests_out_and_the_report_counts_them(
    tmp_path: Path,
    cb_model: torch.nn.Module,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN 8 usable blocks (32 tokens) for three requests that grow to 18, 17 and 15 tokens
    run = tmp_path / "run"
    outputs, held = _record(run, cb_model, monkeypatch, num_blocks=8, new_tokens=12)
    engine = json.loads((run / "engine.json").read_text())
    steps = _lines(run / "engine_steps.jsonl")
    requests = _lines(run / "engine_requests.jsonl")
    manifest = json.loads((run / "manifest.json").read_text())
    assert engine["kv_cache_bytes"] == (8 + 2) * BLOCK_BYTES and engine["usable_blocks"] == 8

    # THEN the pool fills: each step's blocks are those the block tables held, 8 at the most (a step that
    # offloaded: as the scheduler found them, before the victim's were freed; it read 6 at step 7)
    assert [s["blocks_used_in_step"] for s in steps] == held and max(held) == 8
    # AND the scheduler takes requests out, each a `preempted` line naming what it dropped, and resumes them
    preempted = [r for r in requests if r["event"] == "preempted"]
    assert preempted and all(r["dropped_blocks"] > 0 and r["offloaded_to"] for r in preempted)
    assert sum(len(s["preempted"]) for s in steps) == len(preempted) == manifest["engine"]["preemptions"]
    resumed = {r["request_id"] for r in requests if r["event"] == "resumed"}
    assert resumed == {r["request_id"] for r in preempted}
    # every request ran to its end all the same
    assert all(len(o.generated_tokens) == 12 for o in outputs.values()) and len(outputs) == len(PROMPTS)

    # AND the report says so, the pool's bytes still the KV peak
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"]["preemptions"] == len(preempted)
    assert report["kv"]["peak_bytes"] == (8 + 2) * BLOCK_BYTES
