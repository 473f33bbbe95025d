"""`kvtrace plan --engine vllm --pipeline-parallel-size N`: each stage's worker sized as vLLM sizes it
(analyzers.planning.vllm_pipeline). vLLM's own figures for a 1, 2, 1 split are checked in
tests/vllm/test_multiprocess.py; here the arithmetic at Llama 3 sizes, by hand."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from analyzers.planning.param_count import param_count
from analyzers.planning.presets import get_preset
from analyzers.planning.vllm_pipeline import stage_layer_counts
from analyzers.planning.vllm_plan import VllmPlanRequest, plan_vllm
from analyzers.render.vllm_plan import format_vllm_text
from kvtrace.errors import KvtraceError
from tests.engine_files import ENGINE_JSON, write_engine_run

GIB = 2**30


@pytest.mark.parametrize(
    ("layers", "stages", "counts"),
    [
        (80, 3, (27, 27, 26)),  # the remainder of 2 to the two stages before the last
        (32, 3, (11, 11, 10)),
        (32, 5, (6, 6, 7, 7, 6)),  # remainder 2 of 5 stages: the 4th and 3rd, not the first or last
        (126, 2, (63, 63)),  # Llama 3.1 405B over two nodes
        (4, 3, (1, 2, 1)),
        (32, 4, (8, 8, 8, 8)),
    ],
)
def test_layers_split_as_vllms_get_pp_indices(layers: int, stages: int, counts: tuple[int, ...]) -> None:
    assert stage_layer_counts(layers, stages) == counts


def test_a_partition_is_checked_as_vllm_checks_it() -> None:
    assert stage_layer_counts(80, 3, (26, 27, 27)) == (26, 27, 27)
    with pytest.raises(KvtraceError, match="has 2 stages, not the pipeline parallel size 3"):
        stage_layer_counts(80, 3, (40, 40))
    with pytest.raises(KvtraceError, match="add up to the model's 80"):
        stage_layer_counts(80, 3, (27, 27, 27))
    with pytest.raises(KvtraceError, match="more than the model's 4 layers"):
        stage_layer_counts(4, 5)


def test_llama_3_1_70b_over_three_stages_is_bound_by_the_embeddings_stage() -> None:
    # GIVEN Llama 3.1 70B in bf16 over 3 stages of 2 tensor-parallel 48 GiB GPUs, 32k tokens
    geometry = get_preset("llama-3.1-70b")
    request = VllmPlanRequest(
        geometry=geometry,
        gpu_memory_bytes=48 * GIB,
        tensor_parallel_size=2,
        pipeline_parallel_size=3,
        max_model_len=32768,
    )
    result = plan_vllm(request)

    # THEN each stage holds its layers' share of the weights, the first the embedding, the last the lm_head
    # (128,256 x 8,192 each, untied) and the final norm, each over 2 ranks
    embedding = lm_head = 128_256 * 8_192
    per_layer = (param_count(geometry) - embedding - lm_head - 8_192) // 80
    assert param_count(geometry) - embedding - lm_head - 8_192 == 80 * per_layer
    params = [27 * per_layer + embedding, 27 * per_layer, 26 * per_layer + 8_192 + lm_head]
    weights = [math.ceil(2 * p / 2) for p in params]
    assert [s.weights_bytes for s in result.stages] == weights
    # AND each worker's KV memory is its share of 48 GiB less its weights, a block a page of each of its
    # layers (4 KV heads of 128 on each rank: 16 x 4 x 128 x 2 x 2 = 32 KiB a layer)
    page = 2 * 16 * 4 * 128 * 2
    available = [math.ceil(48 * GIB * 0.92) - w for w in weights]
    blocks = [a // (page * n) for a, n in zip(available, (27, 27, 26), strict=True)]
    assert [s.num_blocks for s in result.stages] == blocks
    # AND vLLM keeps the fewest, the first stage's (26,293), whose figures the plan's rows are
    assert result.num_blocks == min(blocks) == blocks[0] == 26_293 and result.bound_stage == 0
    assert result.bytes_per_block == 27 * page and result.kv_bytes_per_token == 27 * page // 16
    assert result.max_concurrency == pytest.approx(blocks[0] / 2048)  # 32,768 tokens = 2,048 blocks
    text = format_vllm_text(result)
    assert "pipeline parallel 3" in text.splitlines()[0]
    assert "stage 0's worker's" in text and "27-53" in text and f"{blocks[2]:,}" in text


def test_a_tied_embedding_is_loaded_again_on_the_last_stage() -> None:
    # Llama 3.2 1B ties its lm_head to the embedding: one copy on one GPU, two over 2 stages
    geometry = get_preset("llama-3.2-1b")
    assert geometry.tie_word_embeddings
    one = plan_vllm(VllmPlanRequest(geometry=geometry, max_model_len=8192))
    two = plan_vllm(replace(one.request, pipeline_parallel_size=2))
    embedding = 128_256 * geometry.hidden_size * 2
    assert sum(s.weights_bytes or 0 for s in two.stages) == one.weights_bytes + embedding


def test_the_first_refused_stage_stops_the_start() -> None:
    # GIVEN a KV memory of 9 blocks of the widest stage's (2 layers of 16 x 2 x 64 x 2 x 2 = 8 KiB): 4 layers
    # over 3 stages, 1, 2, 1; one request of 256 tokens needs 16 blocks and the null block
    geometry = replace(get_preset("llama-3-8b"), num_layers=4, num_kv_heads=2, head_dim=64)
    page = 2 * 16 * 2 * 64 * 2
    request = VllmPlanRequest(
        geometry=geometry, pipeline_parallel_size=3, kv_cache_memory_bytes=18 * page, max_model_len=256
    )
    result = plan_vllm(request)
    # THEN the 1-layer stages have 18 blocks and fit (16 + the null block), the 2-layer one 9 and does not:
    # vLLM stops at it, and the plan shows it, with its estimate (8 blocks after the null block: 128 tokens)
    assert [(s.num_blocks, s.starts) for s in result.stages] == [(18, True), (9, False), (18, True)]
    assert not result.starts and result.bound_stage == 1 and result.num_blocks == 9
    assert result.estimated_max_model_len == 128


def test_a_hybrid_model_under_pipeline_parallelism_is_refused() -> None:
    geometry = replace(get_preset("llama-3-8b"), sliding_window=1024, sliding_layers=16)  # half slide
    with pytest.raises(KvtraceError, match="pipeline parallelism of a model whose layers differ in kind"):
        plan_vllm(VllmPlanRequest(geometry=geometry, pipeline_parallel_size=2, max_model_len=8192))


def test_the_cli_plans_stages_and_refuses_a_bad_partition(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtrace.cli import main

    argv = ["plan", "--engine", "vllm", "--preset", "llama-3-8b", "--kv-cache-memory", "10GiB", "--json"]
    assert main([*argv, "--pipeline-parallel-size", "3", "--pp-layer-partition", "10,11,11"]) == 0
    data = json.loads(capsys.readouterr().out)
    # 10 GiB of 11 layers' 64 KiB pages a block: the widest stages' 14,894 blocks
    assert [s["layers"] for s in data["stages"]] == [10, 11, 11]
    assert data["num_blocks"] == 10 * GIB // (11 * 65_536) and data["bound_stage"] == 1
    assert main([*argv, "--pipeline-parallel-size", "3", "--pp-layer-partition", "10,x,11"]) == 2
    assert "--pp-layer-partition '10,x,11'" in capsys.readouterr().err
    assert main(["plan", "--preset", "llama-3-8b", "--pipeline-parallel-size", "2"]) == 2
    assert "add --engine vllm" in capsys.readouterr().err


def test_a_pipeline_run_recorded_without_its_stages_is_planned_by_its_first_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a 2-stage run whose engine.json has the first stage's 2 layers alone (no `pipeline_stages`)
    from kvtrace.cli import main

    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["model"]["num_layers"] = 4
    engine["config"]["pipeline_parallel_size"] = 2
    engine["layers"] = [
        {"layer": i, "name": f"model.layers.{i}.self_attn.attn", "shape": [5, 1, 4, 8], "dtype": "bfloat16",
         "bytes": 320, "storage_addr": 1000, "view_offset": 320 * i}
        for i in (0, 1)
    ]  # fmt: skip
    folder = write_engine_run(tmp_path / "run", engine=engine)
    # THEN it is planned as that worker, said in a note, and stages cannot be asked of it
    assert main(["plan", "--engine", "vllm", "--from-run", str(folder), "--json"]) in (0, 1)
    data = json.loads(capsys.readouterr().out)
    assert data["stages"] == [] and data["request"]["geometry"]["num_layers"] == 2
    assert any("planned for the first stage's worker" in note for note in data["notes"])
    argv = ["plan", "--engine", "vllm", "--from-run", str(folder), "--pipeline-parallel-size", "2"]
    assert main(argv) == 2
    assert "add --config PATH" in capsys.readouterr().err
