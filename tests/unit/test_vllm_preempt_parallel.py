"""More GPUs for a vLLM run that preempted (analyzers.planning.vllm_preempt_parallel), on the hand-made engine
files of tests/engine_files.py: 2 layers, blocks of 4 tokens, head_dim 4, bf16. Every figure is worked out
here from that geometry: a block on a worker is its layers x K and V x 4 tokens x its KV heads x 4 x 2 B, and
the same KV memory per worker holds that memory // a block's bytes blocks, one of them vLLM's null block."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from analyzers.planning.engine_budget import engine_budget
from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, diagnose_preemptions
from analyzers.readers.engine_files import read_engine
from analyzers.render.vllm_diagnosis import vllm_diagnosis_to_json, vllm_diagnosis_to_text
from tests.engine_files import ENGINE_JSON, REQUESTS, STEPS, _req, first_stage_engine, write_engine_run


def _block(layers: int, kv_heads: int) -> int:
    return layers * 2 * 4 * kv_heads * 4 * 2


def _diagnose(
    folder: Path,
    engine: dict[str, Any] | None = None,
    steps: list[dict[str, Any]] | None = None,
    requests: list[dict[str, Any]] | None = None,
    budget: tuple[int, int] | None = None,
) -> PreemptionDiagnosis:
    run = read_engine(write_engine_run(folder, engine=engine, steps=steps, requests=requests))
    assert run is not None
    priced = None
    if budget is not None:  # (budget, bytes besides the pool)
        pool = run.info.kv_cache_bytes or 0
        limit, other = budget
        crossing = {
            "bytes": limit,
            "crossed": other + pool > limit,
            "peak_bytes": other + pool,
            "step": 0,
            "before_first_step": True,
            "request_bytes": pool,
            "request_category": "kv",
            "allocated_before_bytes": other,
            "allocated_after_bytes": other + pool,
            "partial": False,
            "unseen_bytes": 0,
        }
        priced = engine_budget(run, crossing, None)
    return diagnose_preemptions(run, priced)


def _four_heads() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The hand-made run with 4 KV heads (8 attention heads): 512 B a block, the same 5 blocks in 2,560 B;
    request A runs to 30 output tokens, 6 + 30 - 1 = 35 tokens of KV, 9 blocks; B's 2 beside it: 11."""
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["model"].update(num_kv_heads=4, num_attention_heads=8)
    pool = 5 * _block(2, 4)
    engine.update(bytes_per_block=_block(2, 4), kv_cache_bytes=pool)
    engine["config"]["kv_cache_memory_bytes"] = pool
    engine["storage"] = [{"addr": 1000, "bytes": pool, "device": "cpu"}]
    ends = _req(4, "A", "finished", 0, 35, 6, 30)
    requests = [ends if (r["request_id"], r["event"]) == ("A", "finished") else r for r in REQUESTS]
    return engine, requests


def test_the_smallest_tensor_parallel_size_whose_ranks_hold_the_demand_is_offered(tmp_path: Path) -> None:
    # GIVEN a run that needs 11 blocks together (12 with the null block) in a pool of 5 of 512 B
    engine, requests = _four_heads()
    d = _diagnose(tmp_path / "run", engine=engine, requests=requests)
    assert (d.demand_bound_blocks, d.blocks_needed, d.recorded_peak_demand_blocks) == (11, 12, 11)
    remedies = {r.knob: r for r in d.remedies}
    # THEN 2 ranks of 2 heads hold 2,560 // 256 = 10 blocks (9 usable < 11): short; 4 ranks of 1 head hold
    # 2,560 // 128 = 20 (19 usable): tensor_parallel_size=4
    tp = remedies["tensor_parallel_size"]
    assert (tp.setting, tp.fits) == (4, True)
    assert tp.sentence.startswith(
        "tensor_parallel_size=4 splits the 4 KV heads over 4 GPUs: a block is 128 B"
    )
    assert (
        "the same 2.50 KiB of KV memory per GPU (sharded weights free more) holds 20 blocks (19 usable; "
        in (tp.sentence)
    )
    assert "this run's requests need 11 together at most), which avoids every preemption." in tp.sentence
    # AND 2 stages of 1 layer hold 2,560 // 256 = 10 (9 usable), short of the 11 the run needed together
    # even on its own schedule, and 4 stages are more than the 2 layers: none
    pp = remedies["pipeline_parallel_size"]
    assert (pp.setting, pp.fits) == (None, False)
    assert pp.sentence.startswith("pipeline_parallel_size: no size vLLM takes avoids every preemption.")
    assert (
        "pipeline_parallel_size=2 puts at most 1 of the 2 layers on each GPU: a block is 256 B" in pp.sentence
    )
    assert "holds 10 blocks (9 usable; " in pp.sentence and pp.sentence.endswith("it likely still preempts.")
    # AND more GPUs come last, after the knobs of the same GPU, in the text and the JSON alike
    knobs = [r.knob for r in d.remedies]
    assert knobs == [
        "kv_cache_memory_bytes",
        "max_num_seqs",
        "kv_cache_dtype",
        "tensor_parallel_size",
        "pipeline_parallel_size",
    ]
    lines = vllm_diagnosis_to_text(d).splitlines()
    assert lines[-2] == f"  [fits] {tp.sentence}" and lines[-1] == f"  [no]   {pp.sentence}"
    said = json.loads(json.dumps(vllm_diagnosis_to_json(d)))["remedies"]
    assert [(r["knob"], r["setting"], r["fits"]) for r in said[-2:]] == [
        ("tensor_parallel_size", 4, True),
        ("pipeline_parallel_size", None, False),
    ]


def test_a_block_override_is_no_more_blocks_on_more_gpus(tmp_path: Path) -> None:
    # GIVEN the hand-made run's pool sized by num_gpu_blocks_override=5
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["config"]["num_gpu_blocks_override"] = 5
    d = _diagnose(tmp_path / "run", engine=engine)
    remedies = {r.knob: r for r in d.remedies}
    # THEN neither split is said to help: vLLM keeps the override's blocks on every worker
    for knob in ("tensor_parallel_size", "pipeline_parallel_size"):
        assert (remedies[knob].setting, remedies[knob].fits) == (None, False)
        assert remedies[knob].sentence.endswith("but num_gpu_blocks_override=5 keeps 5 blocks on each.")


def test_a_staged_run_is_priced_on_its_widest_stage_and_offered_no_more_stages(tmp_path: Path) -> None:
    # GIVEN the first of 2 pipeline stages' engine.json, 2 KV heads (4 attention heads): each stage's
    # worker holds 2 of the 4 layers, 256 B a block, 5 blocks in 1,280 B
    engine = first_stage_engine(stages=True)
    engine["model"].update(num_kv_heads=2, num_attention_heads=4)
    pool = 5 * _block(2, 2)
    engine.update(bytes_per_block=_block(2, 2), kv_cache_bytes=pool)
    engine["config"]["kv_cache_memory_bytes"] = pool
    engine["storage"] = [{"addr": 1000, "bytes": pool, "device": "cpu"}]
    for i, layer in enumerate(engine["layers"]):
        layer.update(shape=[5, 2, 4, 8], bytes=pool // 2, view_offset=pool // 2 * i)
    for stage in engine["pipeline_stages"]:
        stage["kv_cache_bytes"] = pool
    d = _diagnose(tmp_path / "run", engine=engine)
    knobs = {r.knob: r for r in d.remedies}
    # THEN 2 ranks of each stage hold 1 head: 128 B a block, 1,280 // 128 = 10 blocks, 9 usable >= 5
    tp = knobs["tensor_parallel_size"]
    assert (tp.setting, tp.fits) == (2, True) and "a block is 128 B on each" in tp.sentence
    assert "holds 10 blocks (9 usable; this run's requests need 5 together at most)" in tp.sentence
    # AND more stages than the run's are not offered (its engine.json is one stage's)
    assert "pipeline_parallel_size" not in knobs


def test_more_gpus_over_a_budget_are_unknown_not_refused(tmp_path: Path) -> None:
    # GIVEN the hand-made run against a budget of 1,500 B with 1,000 B besides its 640 B pool: the same
    # pool per GPU is over it, but the weights the split moves off each GPU are not in this run
    d = _diagnose(tmp_path / "run", budget=(1_500, 1_000))
    pp = {r.knob: r for r in d.remedies}["pipeline_parallel_size"]
    # THEN 2 stages avoid every preemption (10 blocks of 64 B in 640 B), but whether they fit is unknown
    assert (pp.setting, pp.fits) == (2, None)
    assert (
        "which avoids every preemption. With a 640 B pool this GPU peaked at 1.60 KiB, over the "
        in pp.sentence
    )
    assert pp.sentence.endswith("cannot be told from this run; rerun to know.")


def test_a_split_short_of_a_demand_counting_shared_blocks_again_is_unknown(tmp_path: Path) -> None:
    # GIVEN the hand-made run whose requests shared 4 prefix-cached tokens: the demand of 5 blocks counts
    # a shared block once per request
    steps = [*STEPS[:-1], {**STEPS[-1], "prefix_hits": 4, "prefix_queries": 8}]
    d = _diagnose(tmp_path / "run", steps=steps)
    tp = {r.knob: r for r in d.remedies}["tensor_parallel_size"]
    # THEN 2 ranks replicating the 1 KV head hold 640 // 128 = 5 blocks (4 usable < 5): short of the bound,
    # which sharing lowers: unknown (it was refused without sharing)
    assert (tp.setting, tp.fits) == (2, None)
    assert "replicates the 1 KV head over 2 GPUs, 1 on each" in tp.sentence
    assert tp.sentence.endswith(
        "is still short of the 6-block worst case. The run shared blocks between requests (prefix caching): "
        "rerun with tensor_parallel_size=2 to know."
    )


def test_a_drafter_sharing_the_pool_leaves_more_gpus_unknown_or_out(tmp_path: Path) -> None:
    # GIVEN the hand-made run with 2 KV heads (4 attention heads) and a drafter's layer in the pool: a block
    # holds 3 layers' pages, 384 B, 5 of them in 1,920 B
    engine = json.loads(json.dumps(ENGINE_JSON))
    engine["model"].update(num_kv_heads=2, num_attention_heads=4, draft_kv_layers=1)
    pool = 5 * _block(3, 2)
    engine.update(bytes_per_block=_block(3, 2), kv_cache_bytes=pool)
    engine["config"]["kv_cache_memory_bytes"] = pool
    engine["storage"] = [{"addr": 1000, "bytes": pool, "device": "cpu"}]
    knobs = {r.knob: r for r in _diagnose(tmp_path / "run", engine=engine).remedies}
    # THEN 2 ranks of 1 head would hold 1,920 // 192 = 10 blocks, but how vLLM splits the drafter's heads
    # is not modelled: unknown, not said to fit
    tp = knobs["tensor_parallel_size"]
    assert (tp.setting, tp.fits) == (2, None) and "holds 10 blocks (9 usable; " in tp.sentence
    assert tp.sentence.endswith("rerun with tensor_parallel_size=2 to know.")
    # AND stages are not offered, as for a refused start: the drafter's layers are not split over them
    assert "pipeline_parallel_size" not in knobs
