"""vLLM's KV arithmetic (blocks, concurrency, the start check and its estimate) and the refused-start
diagnosis. Expected figures are worked out by hand here, following vllm 0.32's formulas:
page = 2 * block_size * kv_heads * head_dim * dtype bytes per layer; a request of L tokens needs
layers * cdiv(L, block_size) pages; the start check compares that with the KV memory less one block of
all layers (the null block)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from analyzers.planning.hf_config import geometry_from_config
from analyzers.planning.presets import ModelGeometry, get_preset
from analyzers.planning.vllm_diagnose import RefusedDiagnosis, diagnose_engine, diagnose_refused
from analyzers.planning.vllm_plan import VllmPlanRequest, estimate_max_model_len, plan_vllm, readable_bytes
from analyzers.readers.engine_files import read_engine
from analyzers.render.vllm_diagnosis import vllm_diagnosis_to_text
from analyzers.render.vllm_plan import format_vllm_text, vllm_to_json
from kvtrace.errors import KvtraceError
from tests.engine_files import refused_engine, write_engine_run

GIB = 2**30
MIB = 2**20
TINY = ModelGeometry("tiny", 4, 8, 2, 64, 512, 1024, 1000, False)  # 4 layers, 2 KV heads of 64


def test_llama_3_8b_on_80_gib() -> None:
    # GIVEN weights 15 GiB, activations 2 GiB, 1 GiB outside torch, vLLM 0.32's default utilization 0.92
    req = VllmPlanRequest(
        geometry=get_preset("llama-3-8b"),
        gpu_memory_bytes=80 * GIB,
        weights_bytes=15 * GIB,
        activation_peak_bytes=2 * GIB,
        non_torch_bytes=1 * GIB,
        max_model_len=8192,
    )
    result = plan_vllm(req)
    page = 2 * 16 * 8 * 128 * 2  # 65,536 B per layer and block
    assert result.page_size_bytes == page and result.bytes_per_block == 32 * page == 2 * MIB
    assert result.kv_bytes_per_token == 131_072  # 128 KiB a token, Llama 3 8B's well-known figure
    available = math.ceil(80 * GIB * 0.92) - 18 * GIB
    assert result.available_kv_bytes == available
    blocks = available // (2 * MIB)
    assert result.num_blocks == blocks
    assert result.max_concurrency == pytest.approx(blocks / 512)  # 8192 tokens = 512 blocks of 16
    assert result.kv_tokens == int(blocks / 512 * 8192)
    assert result.starts and result.estimated_max_model_len is None
    text = format_vllm_text(result)
    assert f"{blocks:,}" in text and "max concurrency @ 8,192" in text
    assert vllm_to_json(result)["num_blocks"] == blocks


def test_fp8_doubles_the_blocks_and_tp_splits_heads() -> None:
    base = VllmPlanRequest(geometry=get_preset("llama-3-8b"), kv_cache_memory_bytes=10 * GIB)
    bf16 = plan_vllm(base)
    fp8 = plan_vllm(replace(base, kv_cache_dtype="fp8"))
    tp2 = plan_vllm(replace(base, tensor_parallel_size=2))
    assert bf16.num_blocks == 10 * GIB // (2 * MIB) == 5120
    assert fp8.num_blocks == 10 * GIB // MIB == 10240
    assert tp2.kv_heads_per_worker == 4 and tp2.num_blocks == 10240
    # 16 ranks for 8 KV heads: each rank keeps one head (replicated), not half of one
    assert plan_vllm(replace(base, tensor_parallel_size=16)).kv_heads_per_worker == 1


def test_cpu_pool_as_the_log_reports_it() -> None:
    # 1 MiB for 4 layers x 2 heads x 64 at block 16: 8,192 B a layer, 32,768 B a block -> 32 blocks
    result = plan_vllm(
        VllmPlanRequest(geometry=TINY, kv_cache_memory_bytes=MIB, max_model_len=256, block_size=16)
    )
    assert result.num_blocks == 32
    assert result.max_concurrency == 2.0  # 32 blocks / (256 / 16)
    assert result.kv_tokens == 512


def test_refused_start_matches_vllms_estimate() -> None:
    # 1 MiB pool, max_model_len 512 at block 16: one request needs 32 blocks = 1 MiB, but the check has
    # 1 MiB - 32,768 B (the null block) = 31 blocks -> refused, largest length 31 * 16 = 496.
    result = plan_vllm(
        VllmPlanRequest(geometry=TINY, kv_cache_memory_bytes=MIB, max_model_len=512, block_size=16)
    )
    assert not result.starts
    assert (result.needed_bytes, result.check_bytes) == (MIB, MIB - 32_768)
    assert result.estimated_max_model_len == 496
    assert "496" in format_vllm_text(result)


def test_a_block_override_sets_the_pool_whatever_the_memory() -> None:
    # GIVEN 1 MiB (32 blocks of 32,768 B at block 16) under num_gpu_blocks_override=20
    base = VllmPlanRequest(geometry=TINY, kv_cache_memory_bytes=MIB, max_model_len=256, block_size=16)
    result = plan_vllm(replace(base, num_gpu_blocks_override=20))
    # THEN vLLM takes 20 blocks as its memory: 20 / (256 / 16) = 1.25x, int(1.25 * 256) = 320 tokens
    assert (result.num_blocks, result.available_kv_bytes) == (20, 20 * 32_768)
    assert (result.max_concurrency, result.kv_tokens) == (1.25, 320)
    assert "the KV memory alone would give 32" in format_vllm_text(result)
    # AND fp8 halves the blocks' bytes, not their count; and 512 tokens (32 blocks) do not fit 19 usable
    assert plan_vllm(replace(base, num_gpu_blocks_override=20, kv_cache_dtype="fp8")).num_blocks == 20
    refused = plan_vllm(replace(base, num_gpu_blocks_override=20, max_model_len=512))
    assert not refused.starts and refused.estimated_max_model_len == 19 * 16
    # AND the memory is not needed: a geometry without its MLP size plans the override alone
    unsized = replace(TINY, intermediate_size=0)
    assert plan_vllm(VllmPlanRequest(geometry=unsized, num_gpu_blocks_override=4)).num_blocks == 4
    with pytest.raises(KvtraceError, match="num_gpu_blocks_override"):
        VllmPlanRequest(geometry=TINY, num_gpu_blocks_override=0)


def test_estimate_is_vllms_bisection() -> None:
    page = 2 * 16 * 2 * 64 * 2
    # exactly 10 blocks of all 4 layers: 160 tokens fit, 161 do not
    assert estimate_max_model_len(10 * 4 * page, 4, page, 16, 512) == 160
    assert estimate_max_model_len(10 * 4 * page, 4, page, 16, 100) == 100  # capped by max_model_len
    assert estimate_max_model_len(4 * page - 1, 4, page, 16, 512) == 0


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.00 KiB"), (MIB, "1.00 MiB"), (1_015_808, "992.00 KiB")],
)
def test_readable_bytes_never_rounds_to_zero_gib(value: int, text: str) -> None:
    assert readable_bytes(value) == text


def test_bad_requests_are_refused() -> None:
    with pytest.raises(KvtraceError, match="utilization"):
        VllmPlanRequest(geometry=TINY, gpu_memory_utilization=1.5)
    with pytest.raises(KvtraceError, match="kv_cache_dtype"):
        VllmPlanRequest(geometry=TINY, kv_cache_dtype="int3")


def _refused(tmp_path: Path) -> RefusedDiagnosis:
    run = read_engine(write_engine_run(tmp_path / "run", engine=refused_engine(), steps=[], requests=[]))
    assert run is not None
    d = diagnose_engine(run)
    assert isinstance(d, RefusedDiagnosis)
    return d


def test_refused_start_diagnosis(tmp_path: Path) -> None:
    d = _refused(tmp_path)
    assert d.needed_bytes == 32 * 32_768 == MIB
    assert d.available_bytes == MIB - 32_768 == 1_015_808
    assert d.estimated_max_model_len == 496 == d.vllm_estimated_max_model_len
    remedies = {r.knob: r for r in d.remedies}
    assert (remedies["max_model_len"].setting, remedies["max_model_len"].fits) == (496, True)
    # one request plus the null block
    assert remedies["kv_cache_memory_bytes"].setting == MIB + 32_768
    # fp8: 16,384 B a block; 32 blocks = 512 KiB <= 1 MiB - 16 KiB
    assert remedies["kv_cache_dtype"].fits is True
    # two ranks hold one KV head each: 512 KiB a request
    assert (remedies["tensor_parallel_size"].setting, remedies["tensor_parallel_size"].fits) == (2, True)
    assert remedies["max_num_seqs"].fits is False
    assert remedies["gpu_memory_utilization"].fits is None  # a CPU run has no device total
    text = vllm_diagnosis_to_text(d)
    assert "1.00 MiB" in text and "992.00 KiB" in text and "496" in text
    assert "0.0 GiB" not in text.split("vLLM said")[0]


def test_refused_start_proposes_only_a_tensor_parallel_size_vllm_accepts(tmp_path: Path) -> None:
    # GIVEN a refused start of 24 attention heads over 6 KV heads of 64 (4 layers, bf16, 512 tokens, 1 MiB)
    engine = refused_engine()
    engine["model"].update(num_attention_heads=24, num_kv_heads=6)
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine, steps=[], requests=[]))
    assert run is not None

    # one request over TP ranks of h KV heads: 4 layers x 32 blocks x 2 x 16 x h x 64 x 2 B, beside the
    # null block: 2 ranks (3 heads) need 1.5 MiB; 4 and 8 ranks would need 512 KiB (1 head), but vLLM
    # splits 6 KV heads over neither (6 % 4, 8 % 6), nor 24 attention heads over 16
    def needed(heads: int) -> int:
        return 4 * 32 * 2 * 16 * heads * 64 * 2

    assert needed(3) > MIB - needed(3) // 32 and needed(1) <= MIB - needed(1) // 32
    remedy = {r.knob: r for r in diagnose_refused(run).remedies}["tensor_parallel_size"]
    # THEN no split is proposed (it proposed 4, which vLLM refuses)
    assert (remedy.setting, remedy.fits) == (None, False)
    assert "that vLLM accepts" in remedy.sentence


def test_refused_start_on_a_gpu_prices_utilization(tmp_path: Path) -> None:
    engine = refused_engine()
    engine["config"].update(kv_cache_memory_bytes=None, device="cuda", gpu_memory_utilization=0.5)
    # a 100 MiB device at 0.5: requested 50 MiB, of which 49 MiB went to weights and activations
    engine["memory_profile"] = {"total_device_bytes": 100 * MIB, "available_kv_bytes": MIB}
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine, steps=[], requests=[]))
    assert run is not None
    d = diagnose_refused(run)
    util = {r.knob: r for r in d.remedies}["gpu_memory_utilization"]
    # needs 49 MiB + 1 MiB + 32 KiB = 50.03 MiB of 100 MiB -> 0.51
    assert (util.setting, util.fits) == (0.51, True)


def test_refused_start_on_a_gpu_under_a_block_override(tmp_path: Path) -> None:
    # GIVEN 512 tokens (32 blocks of 16) refused under num_gpu_blocks_override=20, the memory left to
    # vLLM's profile: vLLM compared one request with the 19 blocks beside the null block
    engine = refused_engine(available_bytes=19 * 32_768, estimated_max_model_len=304)
    engine["config"].update(kv_cache_memory_bytes=None, device="cuda", num_gpu_blocks_override=20)
    engine["memory_profile"] = {"total_device_bytes": 100 * MIB, "available_kv_bytes": 19 * 32_768}
    run = read_engine(write_engine_run(tmp_path / "run", engine=engine, steps=[], requests=[]))
    assert run is not None
    d = diagnose_refused(run)
    remedies = [(r.knob, r.setting, r.fits) for r in d.remedies]
    # THEN 33 blocks (32 + the null block), and without the override: unknown (no profiled memory recorded)
    assert ("num_gpu_blocks_override", 33, True) in remedies
    assert ("num_gpu_blocks_override", None, None) in remedies
    assert {knob for knob, _, fits in remedies if fits} == {"max_model_len", "num_gpu_blocks_override"}
    assert not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & {knob for knob, _, _ in remedies}
    assert d.estimated_max_model_len == 304 and d.num_gpu_blocks_override == 20
    # AND more GPUs, each with the override's 20 blocks, are said not to help: tensor and pipeline alike
    assert {("tensor_parallel_size", None, False), ("pipeline_parallel_size", None, False)} <= set(remedies)


def test_plan_cli_engine_vllm(capsys: pytest.CaptureFixture[str]) -> None:
    from kvtrace.cli import main

    argv = ["plan", "--engine", "vllm", "--preset", "llama-3-8b", "--kv-cache-memory", "10GiB"]
    assert main([*argv, "--max-model-len", "8192", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["num_blocks"] == 5120 and data["max_concurrency"] == 10.0  # 5120 blocks / 512 per request
    # 1 MiB holds no 2 MiB block: vLLM refuses, exit status 1
    assert main(["plan", "--engine", "vllm", "--preset", "llama-3-8b", "--kv-cache-memory", "1MiB"]) == 1
    assert "No available memory" in capsys.readouterr().out


def test_plan_from_a_recorded_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvtrace.cli import main

    engine = refused_engine()
    # a GPU run sized by utilization: a run's kv_cache_memory_bytes would replace the profile arithmetic
    engine["config"].update(kv_cache_memory_bytes=None, device="cuda")
    engine["memory_profile"] = {
        "total_device_bytes": 100 * MIB,
        "weights_bytes": 40 * MIB,
        "activation_peak_bytes": 3 * MIB,
        "non_torch_bytes": 1 * MIB,
    }
    folder = write_engine_run(tmp_path / "run", engine=engine, steps=[], requests=[])
    argv = ["plan", "--engine", "vllm", "--from-run", str(folder), "--max-model-len", "512", "--json"]
    assert main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    available = math.ceil(100 * MIB * 0.9) - 44 * MIB
    assert data["available_kv_bytes"] == available
    assert data["num_blocks"] == available // 32_768  # the run's model: 4 layers x 8,192 B at block 16


def _write_config(folder: Path, **fields: object) -> Path:
    """A Llama config.json of the tiny shape (8 attention heads, 2 KV heads of 64), with `fields` over it."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
        **fields,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_a_max_model_len_beyond_the_models_positions_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN a model of 512 positions and room for far more KV than one request needs
    config = _write_config(tmp_path / "m", max_position_embeddings=512)
    argv = ["plan", "--engine", "vllm", "--config", str(config), "--kv-cache-memory", "1GiB"]
    # WHEN it is planned at its 512 positions, THEN vLLM starts
    assert main([*argv, "--max-model-len", "512", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["starts"] is True and data["refusals"] == []
    assert data["request"]["geometry"]["max_position_embeddings"] == 512
    # AND one token more is refused, exit status 1, with vLLM's reason, though the memory would do
    assert main([*argv, "--max-model-len", "513"]) == 1
    text = capsys.readouterr().out
    assert "vLLM would refuse to start: max_model_len 513 is beyond the 512 positions the model takes" in text
    assert '"User-specified max_model_len (513) is greater than the derived max_model_len"' in text
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in text and "one request of" not in text
    # AND without --max-model-len the plan takes the model's 512, not 8192, and starts
    assert main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["request"]["max_model_len"] == 512
    # AND Llama 3 8B (8,192 positions) at 100,000 tokens on 80 GiB is refused, not "4.67x"
    llama = ["plan", "--engine", "vllm", "--preset", "llama-3-8b", "--gpu-memory", "80GiB"]
    assert main([*llama, "--max-model-len", "100000", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["starts"] is False and data["needed_bytes"] <= data["check_bytes"]  # the memory would do
    assert data["refusals"][0].startswith("max_model_len 100,000 is beyond the 8,192 positions")


@pytest.mark.parametrize(
    ("fields", "positions"),
    [
        ({"max_position_embeddings": 512}, 512),
        # linear and dynamic RoPE scaling stretch the positions by their factor; llama3's counts it already
        ({"max_position_embeddings": 512, "rope_scaling": {"type": "linear", "factor": 4.0}}, 2048),
        ({"max_position_embeddings": 512, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, 1024),
        (
            {
                "max_position_embeddings": 512,
                "rope_parameters": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "original_max_position_embeddings": 64,
                },
            },
            512,
        ),
        ({"n_positions": 1024, "max_position_embeddings": 2048}, 1024),  # the smallest of the names
        ({"max_position_embeddings": 2048, "model_max_length": 4096}, 4096),  # model_max_length wins
        ({}, None),  # none given: vLLM takes any max_model_len
    ],
)
def test_the_models_positions_are_derived_as_vllm_derives_them(
    tmp_path: Path, fields: dict, positions: int | None
) -> None:
    geometry = geometry_from_config(_write_config(tmp_path / "m", **fields))
    assert geometry.max_position_embeddings == positions
    request = VllmPlanRequest(
        geometry=geometry, kv_cache_memory_bytes=GIB, max_model_len=(positions or 4096) + 1
    )
    assert plan_vllm(request).starts is (positions is None)


@pytest.mark.parametrize(
    ("preset", "tp", "starts"),
    [
        ("llama-3-70b", 2, True),
        ("llama-3-70b", 3, False),  # 64 attention heads over 3 ranks
        ("llama-3-70b", 16, True),  # 8 KV heads, each on 2 of the 16 ranks
        ("llama-3-70b", 32, True),
        ("llama-3.2-3b", 6, False),  # 24 attention heads divide, 8 KV heads do not
        ("llama-3.2-3b", 12, False),  # 24 attention heads divide; 12 ranks are no multiple of 8 KV heads
        ("llama-3.2-3b", 8, True),
        ("llama-3.2-3b", 24, True),
    ],
)
def test_a_tensor_parallel_size_vllm_cannot_split_is_refused(preset: str, tp: int, starts: bool) -> None:
    geometry = get_preset(preset)
    heads, kv_heads = geometry.num_attention_heads, geometry.num_kv_heads
    # vLLM's rules: every rank holds whole attention heads, and whole KV heads or equal replicas of them
    divides = heads % tp == 0 and (kv_heads % tp == 0 if tp < kv_heads else tp % kv_heads == 0)
    assert divides is starts
    result = plan_vllm(
        VllmPlanRequest(geometry=geometry, kv_cache_memory_bytes=80 * GIB, tensor_parallel_size=tp)
    )
    assert result.starts is starts and bool(result.refusals) is not starts
    assert result.needed_bytes <= result.check_bytes  # the memory alone would do
    if heads % tp:
        assert result.refusals == (
            f"the {heads} attention heads cannot be split over tensor_parallel_size {tp} (vLLM: "
            f'"Total number of attention heads ({heads}) must be divisible by tensor parallel size ({tp}).")',
        )
    elif not starts:
        assert (
            f'vLLM asserts "{max(tp, kv_heads)} is not divisible by {min(tp, kv_heads)}"'
            in result.refusals[0]
        )


def test_plan_cli_refuses_a_tensor_parallel_size_of_the_tiny_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtrace.cli import main

    # GIVEN the tiny shape: 8 attention heads, 2 KV heads
    config = _write_config(tmp_path / "m", max_position_embeddings=512)
    argv = [
        "plan",
        "--engine",
        "vllm",
        "--config",
        str(config),
        "--gpu-memory",
        "80GiB",
        "--max-model-len",
        "512",
    ]
    # WHEN split over 3 ranks, THEN vLLM would refuse: exit status 1, its reason in the text and the JSON
    assert main([*argv, "--tensor-parallel-size", "3"]) == 1
    assert (
        "vLLM would refuse to start: the 8 attention heads cannot be split over tensor_parallel_size 3"
        in (capsys.readouterr().out)
    )
    assert main([*argv, "--tensor-parallel-size", "3", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["starts"] is False
    # AND over 4 ranks (2 attention heads each, each KV head on 2 ranks) it starts
    assert main([*argv, "--tensor-parallel-size", "4"]) == 0
