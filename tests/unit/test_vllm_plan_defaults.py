"""`kvtrace plan --engine vllm` without a length takes vLLM's own default, the model's whole length (it took
8192, and said vLLM starts where `vllm serve` without --max-model-len refuses); `--batch` asks whether that
many requests fit the pool at once (it was ignored). vLLM's own derivation of the default is checked against
these configs in tests/vllm/test_vllm_plan_defaults.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyzers.planning.hf_config import geometry_from_config
from kvtrace.cli import main
from tests.engine_files import refused_engine, write_engine_run

GIB = 2**30
# Llama 3 (8B and 70B): 8 KV heads of 128, bf16: a block of 16 tokens is 2 x 16 x 8 x 128 x 2 B a layer
LLAMA_PAGE = 2 * 16 * 8 * 128 * 2


def _plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    """`kvtrace plan --engine vllm ARGV`: (exit status, its --json, its text)."""
    status = main(["plan", "--engine", "vllm", *argv, "--json"])
    data = json.loads(capsys.readouterr().out)
    assert main(["plan", "--engine", "vllm", *argv]) == status
    return status, data, capsys.readouterr().out


def test_without_a_length_the_plan_takes_vllms_default_and_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN Llama 3.1 8B on a 24 GiB GPU, no --max-model-len: vLLM serves its 131,072 positions
    argv = ["--preset", "llama-3.1-8b", "--gpu-memory", "24GiB"]
    # WHEN planned
    status, data, text = _plan(capsys, *argv)
    # THEN at 131,072 tokens one request needs 8,192 blocks of 32 layers: 16 GiB, more than the 7.12 GiB
    # there, and vLLM refuses to start, as it does (the plan said "7.12x" at 8,192 and exit 0)
    assert data["request"]["max_model_len"] == 131_072
    assert data["needed_bytes"] == 131_072 // 16 * 32 * LLAMA_PAGE == 16 * GIB
    assert status == 1 and data["starts"] is False
    assert "vLLM would refuse to start: one request of 131,072 tokens needs 16.00 GiB" in text
    # AND the first note says the length is vLLM's default, from the model, and how to plan another
    said = (
        "max_model_len 131,072, vLLM's default when none is given: the model's max_position_embeddings; "
        "--max-model-len N plans another length"
    )
    assert data["notes"][0] == said and f"  note: {said}" in text
    # AND a length typed, or --context (max_model_len with --engine vllm), is planned without that note
    for flag, length in (("--max-model-len", 8192), ("--context", 32_768)):
        status, data, _ = _plan(capsys, *argv, flag, str(length))
        assert data["request"]["max_model_len"] == length
        assert not any("vLLM's default" in note for note in data["notes"])
    assert _plan(capsys, *argv, "--max-model-len", "8192")[0] == 0
    # AND Llama 3 8B's default is its own 8,192 positions
    assert _plan(capsys, "--preset", "llama-3-8b")[1]["request"]["max_model_len"] == 8192


def _config(folder: Path, **fields: object) -> Path:
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
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder / "config.json"


_LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
_LONGROPE = {"rope_type": "longrope", "long_factor": [1.0] * 32, "short_factor": [1.0] * 32}
# (config fields, vLLM's max_model_len when none is given, where it comes from): as tests/vllm checks them
DEFAULTS = [
    ({"max_position_embeddings": 512}, 512, "the model's max_position_embeddings"),
    (
        {"max_position_embeddings": 512, "rope_scaling": {"type": "linear", "factor": 4.0}},
        512 * 4,
        "the model's max_position_embeddings x its RoPE scaling factor 4",
    ),
    (  # llama3's factor is in max_position_embeddings already
        {"max_position_embeddings": 512, "rope_scaling": _LLAMA3},
        512,
        "the model's max_position_embeddings",
    ),
    ({"max_position_embeddings": 2048, "n_positions": 1024}, 1024, "the model's n_positions"),
    ({"max_position_embeddings": 512, "model_max_length": 1024}, 1024, "the model's model_max_length"),
    (  # LongRoPE: its pretraining length, not the 4,096 it takes
        {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "max_position_embeddings": 4096,
            "original_max_position_embeddings": 512,
            "rope_scaling": _LONGROPE,
        },
        512,
        "the model's original_max_position_embeddings, vLLM's default for a LongRoPE model",
    ),
    (  # Phi-3's config class gives original_max_position_embeddings 4,096 where the file does not
        {
            "architectures": ["Phi3ForCausalLM"],
            "model_type": "phi3",
            "max_position_embeddings": 8192,
            "rope_scaling": _LONGROPE,
        },
        4096,
        "the model's original_max_position_embeddings, vLLM's default for a LongRoPE model",
    ),
    ({}, 2048, "the config gives no length: 2,048, vLLM's fallback"),
    (
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        2048 * 2,
        "the config gives no length: 2,048 x its RoPE scaling factor 2, vLLM's fallback",
    ),
]
DEFAULT_IDS = [
    *("plain", "linear", "llama3", "n_positions", "model_max_length", "longrope", "phi3", "none", "none-x2")
]


@pytest.mark.parametrize(("fields", "length", "source"), DEFAULTS, ids=DEFAULT_IDS)
def test_a_configs_default_length_is_derived_as_vllm_derives_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fields: dict, length: int, source: str
) -> None:
    # GIVEN a config.json WHEN planned without a length on a pool that holds it
    config = _config(tmp_path / "m", **fields)
    status, data, _ = _plan(capsys, "--config", str(config), "--kv-cache-memory", "1GiB")
    # THEN vLLM's default is planned, and the note names where it comes from
    assert status == 0 and data["request"]["max_model_len"] == length
    said = f"max_model_len {length:,}, vLLM's default when none is given: {source}"
    assert data["notes"][0].startswith(said)
    assert geometry_from_config(config).vllm_default_len == length


def test_a_runs_length_is_kept_and_a_run_without_one_asks_for_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a recorded run vLLM served at max_model_len 512
    run = write_engine_run(tmp_path / "run", engine=refused_engine(), steps=[], requests=[])
    # WHEN planned from it THEN its 512 is the length, with no default's note
    _, data, _ = _plan(capsys, "--from-run", str(run))
    assert data["request"]["max_model_len"] == 512
    assert not any("vLLM's default" in note for note in data["notes"])
    # AND a run whose engine.json lacks the length (engine.json keeps no config's positions) is refused with
    # what to add, not planned at a guess
    engine = refused_engine()
    del engine["config"]["max_model_len"]
    bare = write_engine_run(tmp_path / "bare", engine=engine, steps=[], requests=[])
    assert main(["plan", "--engine", "vllm", "--from-run", str(bare)]) == 2
    err = capsys.readouterr().err
    assert f"{bare}: its engine.json does not give max_model_len" in err and "add --max-model-len N" in err
    assert err.count("\n") == 1
    # AND --config gives vLLM's default for the run's model
    config = _config(tmp_path / "m", max_position_embeddings=512)
    _, data, _ = _plan(capsys, "--from-run", str(bare), "--config", str(config))
    assert data["request"]["max_model_len"] == 512
    assert data["notes"][0].startswith("max_model_len 512, vLLM's default")


def test_batch_asks_whether_that_many_requests_fit_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a 10 GiB pool of Llama 3 8B at 8,192 tokens: 5,120 blocks of 32 layers (2 MiB), 512 a request;
    # vLLM logs 10.00x, but its block pool keeps one block back (the null block): 5,119 for requests
    argv = ["--preset", "llama-3-8b", "--kv-cache-memory", "10GiB", "--max-model-len", "8192"]
    blocks, per_request = 10 * GIB // (32 * LLAMA_PAGE), 8192 // 16
    assert (blocks, per_request) == (5120, 512)
    at_once = (blocks - 1) // per_request
    assert at_once == 9
    # WHEN 9 are asked THEN they fit, exit 0
    status, data, text = _plan(capsys, *argv, "--batch", "9")
    assert status == 0 and data["batch_fits"] is True and data["requests_at_once"] == at_once
    assert data["request"]["batch"] == 9 and data["max_concurrency"] == 10.0
    assert "--batch 9 fits: 9 requests of 8,192 tokens hold 4,608 blocks at once" in text
    # AND 10 do not: exit 1, though vLLM starts, saying how many do and the max_num_seqs that keeps them
    status, data, text = _plan(capsys, *argv, "--batch", "10")
    assert status == 1 and data["starts"] is True and data["batch_fits"] is False
    assert (
        "--batch 10 does not fit: 10 requests of 8,192 tokens hold 5,120 blocks at once, the pool has 5,119 "
        "beside the null block (9 fit at once, max concurrency 10.00x)."
    ) in text
    assert "vLLM's --max-num-seqs 9 keeps every running request at full length (here: --batch 9)" in text
    # (`kvtrace plan` has no --max-num-seqs: "unrecognized arguments" where a user typed the advice back)
    # AND without --batch nothing is asked: null, and the exit status is the start's alone
    status, data, text = _plan(capsys, *argv)
    assert status == 0 and data["batch_fits"] is None and data["request"]["batch"] is None
    assert "--batch" not in text
    # AND 0 is refused as a bad argument
    assert main(["plan", "--engine", "vllm", *argv, "--batch", "0"]) == 2
    assert "--batch must be at least 1, got 0" in capsys.readouterr().err


def test_the_reviews_batch_of_200_is_no_longer_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN Llama 3.1 70B over 4 GPUs of 80 GiB at 32,768 tokens (2,048 blocks a request)
    argv = ["--preset", "llama-3.1-70b", "--tensor-parallel-size", "4", "--gpu-memory", "80GiB"]
    argv += ["--context", "32768"]
    _, plain, _ = _plan(capsys, *argv)
    at_once = (plain["num_blocks"] - 1) // (32_768 // 16)
    # WHEN 200 and 16 requests are asked THEN 200 are said not to fit (exit 1), 16 to (exit 0)
    many, few = _plan(capsys, *argv, "--batch", "200"), _plan(capsys, *argv, "--batch", "16")
    assert at_once == 16 and many[1]["requests_at_once"] == few[1]["requests_at_once"] == at_once
    assert (many[0], many[1]["batch_fits"], few[0], few[1]["batch_fits"]) == (1, False, 0, True)
    assert "--batch 200 does not fit" in many[2] and "(16 fit at once" in many[2]


def test_a_plan_without_gpu_memory_says_its_80_gib_is_the_default(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a vLLM plan of a preset, no --gpu-memory: the GPU line's memory is the 80 GiB default
    said = (
        "--gpu-memory not given: planned for an 80.00 GiB GPU, the default; name yours (--gpu-memory H100, "
        "L4, 24GiB)"
    )
    _, data, text = _plan(capsys, "--preset", "llama-3-8b")
    assert data["notes"][-1] == said and f"  note: {said}" in text
    # AND a GPU given, or a pool given in bytes, needs no such note
    for given in (["--gpu-memory", "H100"], ["--kv-cache-memory", "10GiB"]):
        _, data, _ = _plan(capsys, "--preset", "llama-3-8b", *given)
        assert said not in data["notes"]
