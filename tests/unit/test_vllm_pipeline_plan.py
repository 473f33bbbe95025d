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
from tests.engine_files import ENGINE_JSON, first_stage_engine, write_engine_run

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

    # THEN each stage's rank holds half of its layers' projections and their 2 norms whole, the first half
    # the embedding's rows, the last half the lm_head's (128,256 x 8,192 each, untied) and the final norm
    # whole (vLLM's RMSNorm is never split)
    hidden = 8_192
    embedding = lm_head = 128_256 * hidden
    per_layer = (param_count(geometry) - embedding - lm_head - hidden) // 80
    assert param_count(geometry) - embedding - lm_head - hidden == 80 * per_layer
    rank_layer = (per_layer - 2 * hidden) // 2 + 2 * hidden
    params = [27 * rank_layer + embedding // 2, 27 * rank_layer, 26 * rank_layer + hidden + lm_head // 2]
    weights = [2 * p for p in params]
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


def test_a_hybrid_models_stage_holds_its_share_of_each_group() -> None:
    # GIVEN Gemma 3's pattern on 12 layers (5 sliding, 1 full, twice) over 2 stages of 6: vLLM groups them 2 a
    # group and deals each kind to its groups in turn (full: 5, 11; sliding: 0 and 6, 1 and 7, ... 4 and 10)
    slides = tuple(layer % 6 != 5 for layer in range(12))
    geometry = replace(
        get_preset("llama-3-8b"), num_layers=12, sliding_window=1024, sliding_layers=10, layer_slides=slides
    )
    page = 2 * 16 * 8 * 128 * 2
    request = VllmPlanRequest(
        geometry=geometry, pipeline_parallel_size=2, kv_cache_memory_bytes=1000 * page, max_model_len=8192
    )
    result = plan_vllm(request)
    # THEN each stage holds one layer of every group: a block is one page, 1,000 of them (in pairs of
    # neighbours a stage would hold two of a group, and 500)
    assert [s.block_layers for s in result.stages] == [1, 1] and result.num_blocks == 1000
    # AND 3 stages of 4 split the full layers 5 and 11 over stages 1 and 2, and the sliding pairs (0, 6)...
    # (4, 10) one layer each but (2, 8), (3, 9) on stages 0 and 2 and (0, 6), (1, 7) on 0 and 1: one page
    three = plan_vllm(replace(request, pipeline_parallel_size=3))
    assert [s.block_layers for s in three.stages] == [1, 1, 1]
    # AND a split that puts both layers of a group on one stage pays two pages there
    lopsided = plan_vllm(replace(request, pp_layer_partition=(11, 1)))
    assert [s.block_layers for s in lopsided.stages] == [2, 1] and lopsided.num_blocks == 500


def test_a_hybrid_model_whose_layer_order_is_unknown_is_refused() -> None:
    geometry = replace(get_preset("llama-3-8b"), sliding_window=1024, sliding_layers=16)  # half slide
    with pytest.raises(KvtraceError, match="which of its layers slide is not known"):
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

    folder = write_engine_run(tmp_path / "run", engine=first_stage_engine(stages=False))
    # THEN it is planned as that worker, said in a note, and stages cannot be asked of it
    assert main(["plan", "--engine", "vllm", "--from-run", str(folder), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stages"] == [] and data["request"]["geometry"]["num_layers"] == 2
    assert any("planned for the first stage's worker" in note for note in data["notes"])
    argv = ["plan", "--engine", "vllm", "--from-run", str(folder), "--pipeline-parallel-size", "2"]
    assert main(argv) == 2
    assert "add --config PATH" in capsys.readouterr().err


def _staged_run(folder: Path, weights: list[int | None], device: str = "cuda") -> Path:
    """A 2-stage run of ENGINE_JSON's model made 4 layers (1 KV head of 4, blocks of 4: 64 B a layer and
    block), stages of 1 and 3 layers, the pool sized by the profile: 100 KiB at 0.9, no activations."""
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["model"].update(num_layers=4, hidden_size=8, intermediate_size=16, vocab_size=100)
    engine["config"].update(pipeline_parallel_size=2, kv_cache_memory_bytes=None, device=device)
    engine["memory_profile"] = {"total_device_bytes": 100 * 1024, "weights_bytes": 1000}
    engine["layers"] = [
        {"layer": 0, "name": "model.layers.0.self_attn.attn", "shape": [5, 1, 4, 8], "dtype": "bfloat16",
         "bytes": 320, "storage_addr": 1000, "view_offset": 0}
    ]  # fmt: skip
    engine["pipeline_stages"] = [
        {"stage": s, "layers": layers, "kv_cache_bytes": 320 * len(layers), "weights_bytes": w}
        for s, (layers, w) in enumerate(zip([[0], [1, 2, 3]], weights, strict=True))
    ]
    return write_engine_run(folder, engine=engine)


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    """`kvtrace plan --engine vllm ARGV --json`: (exit status, its JSON, {} when none; its stderr)."""
    from kvtrace.cli import main

    status = main(["plan", "--engine", "vllm", *argv, "--json"])
    out, err = capsys.readouterr()
    return status, json.loads(out) if out else {}, err


def test_a_recorded_runs_stages_keep_their_measured_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose stages measured 1,000 and 3,000 B of weights
    folder = _staged_run(tmp_path / "run", [1000, 3000])
    available = [math.ceil(100 * 1024 * 0.9) - w for w in (1000, 3000)]
    blocks = [available[0] // 64, available[1] // (3 * 64)]
    # THEN each stage is planned with its own, from the run and with --config alike
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"model_type": "llama", "num_hidden_layers": 4, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 4, "hidden_size": 8, "intermediate_size": 16,
             "vocab_size": 100}
        )
    )  # fmt: skip
    for argv in ([], ["--config", str(config)]):
        _, plan, _ = _plan(capsys, "--from-run", str(folder), *argv)
        assert [s["weights_bytes"] for s in plan["stages"]] == [1000, 3000]
        assert [s["num_blocks"] for s in plan["stages"]] == blocks and plan["num_blocks"] == min(blocks)
    # AND a weight typed is each stage's, as a typed flag wins
    _, plan, _ = _plan(capsys, "--from-run", str(folder), "--weights-bytes", "500")
    assert [s["weights_bytes"] for s in plan["stages"]] == [500, 500]


def test_a_recorded_runs_stages_without_weights_keep_their_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose second stage's weights are not recorded: its split still holds, the weights computed
    folder = _staged_run(tmp_path / "run", [1000, None])
    _, plan, _ = _plan(capsys, "--from-run", str(folder))
    assert [s["layers"] for s in plan["stages"]] == [1, 3] and plan["bound_stage"] == 1
    assert (
        plan["num_blocks"] == plan["stages"][1]["num_blocks"]
        and plan["request"]["stage_weights_bytes"] is None
    )


def test_a_split_typed_replaces_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _staged_run(tmp_path / "run", [1000, 3000])
    # a size or split typed drops the run's split and its measured weights (those of other stages)
    _, plan, _ = _plan(capsys, "--from-run", str(folder), "--pipeline-parallel-size", "4")
    assert [s["layers"] for s in plan["stages"]] == [1, 1, 1, 1]
    assert plan["request"]["stage_weights_bytes"] is None
    _, plan, _ = _plan(capsys, "--from-run", str(folder), "--pp-layer-partition", "2,2")
    assert [s["layers"] for s in plan["stages"]] == [2, 2]
    assert plan["request"]["stage_weights_bytes"] is None
    # and a split of another length than the stages is refused, as vLLM refuses it
    status, _, err = _plan(capsys, "--preset", "llama-3.1-70b", "--pp-layer-partition", "40,40")
    assert status == 2 and "add --pipeline-parallel-size 2" in err


def test_a_pipelines_sliding_layers_hold_a_batch_in_flight_in_each_stage() -> None:
    # vLLM's max_concurrent_batches: a batch in each of the 4 stages, one more under async scheduling (GPU)
    geometry = replace(get_preset("llama-3-8b"), sliding_window=4096)  # every layer slides (Mistral-like)
    request = VllmPlanRequest(
        geometry=geometry, pipeline_parallel_size=4, max_model_len=32768, max_num_batched_tokens=2048
    )
    on = plan_vllm(request)
    off = plan_vllm(replace(request, async_scheduling=False))
    assert (on.max_in_flight_tokens, off.max_in_flight_tokens) == (5 * 2048, 4 * 2048)
    # a request holds cdiv(4095 + in flight, 16) + 1 blocks
    assert on.blocks_per_request == -(-(4095 + 5 * 2048) // 16) + 1 == 897
    assert any(
        "5 batches in flight (one in each of the 4 pipeline stages and one more" in n for n in on.notes
    )


def test_a_recorded_pipeline_that_cannot_be_sized_says_what_to_add(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a staged run without the MLP size, one stage's weights unrecorded: nothing sizes that stage
    folder = _staged_run(tmp_path / "run", [1000, None])
    engine = json.loads((folder / "engine.json").read_text())
    del engine["model"]["intermediate_size"]
    (folder / "engine.json").write_text(json.dumps(engine))
    status, _, err = _plan(capsys, "--from-run", str(folder))
    assert status == 2 and "add --config PATH" in err and "Traceback" not in err
    # AND a size typed below one, or a model that the run's stages do not split, is refused in one line
    status, _, err = _plan(capsys, "--preset", "llama-3-8b", "--pipeline-parallel-size", "0")
    assert status == 2 and "--pipeline-parallel-size must be at least 1, got 0" in err
    status, _, err = _plan(
        capsys, "--from-run", str(_staged_run(tmp_path / "ok", [1, 1])), "--preset", "llama-3-8b"
    )
    assert status == 2 and "its pipeline stages hold 1,3 layers, not a split of the 32 layers planned" in err


def test_a_hybrid_pipeline_run_without_its_layer_types_is_its_first_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a staged run of a model with sliding and full layers, recorded before kvtrace kept layer_types:
    # its groups on each stage cannot be told, so it is planned as its first stage's worker, as before
    folder = _staged_run(tmp_path / "run", [1000, 3000])
    engine = json.loads((folder / "engine.json").read_text())
    engine["model"].update(sliding_window=8, sliding_layers=2)
    (folder / "engine.json").write_text(json.dumps(engine))
    status, plan, _ = _plan(capsys, "--from-run", str(folder))
    assert status == 0 and plan["stages"] == [] and plan["request"]["geometry"]["num_layers"] == 1
    assert any("or which layers slide" in note for note in plan["notes"])
    # AND with its layer_types it is planned by stage
    engine["model"]["layer_types"] = ["sliding_attention", "full_attention"] * 2
    (folder / "engine.json").write_text(json.dumps(engine))
    _, plan, _ = _plan(capsys, "--from-run", str(folder))
    assert [s["layers"] for s in plan["stages"]] == [1, 3]
