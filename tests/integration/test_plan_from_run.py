"""`kvtrace plan --from-run` on a recorded transformers run: with no other flag it plans the run itself, so
its KV (final and peak) and weights must be the recording's, and each flag typed moves one setting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, record_generate, tiny_size, weights_bytes

LAYERS, KV_HEADS, BATCH, PROMPT, NEW = 2, 2, 2, 11, 6
TOKEN_ROW = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # every layer's K and V of one token of one row, float32


@pytest.fixture(scope="module")
def model() -> Any:
    return build_model(tiny_size(LAYERS, KV_HEADS)).eval()


def _json(argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 0) -> dict[str, Any]:
    assert main(argv) == code, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _recorded(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    return _json(["report", str(run), "--json", "--no-export", "-q"], capsys)["kv"]


@pytest.mark.parametrize(
    ("options", "cache", "kv_dtype", "final"),
    [
        ({}, "dynamic", "fp32", TOKEN_ROW * BATCH * (PROMPT + NEW - 1)),
        # A StaticCache generate() makes: PROMPT + NEW positions (its max_length), one never written
        ({"cache_implementation": "static"}, "static", "fp32", TOKEN_ROW * BATCH * (PROMPT + NEW - 1)),
        # fp8 QuantizedCache: 1 byte an element and a float32 scale per K and per V per layer
        (
            {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}},
            "quantized",
            "fp8",
            LAYERS * 2 * (KV_HEADS * HEAD_DIM * BATCH * (PROMPT + NEW - 1) + 4),
        ),
    ],
    ids=["dynamic", "static", "fp8-quantized"],
)
def test_a_plan_from_a_run_with_no_other_flag_is_the_run_itself(
    model: Any,
    options: dict[str, Any],
    cache: str,
    kv_dtype: str,
    final: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a greedy generate() of NEW tokens after PROMPT on BATCH rows, recorded without the profiler
    run = tmp_path / "run"
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0, **options,
        )  # fmt: skip
    recorded = _recorded(run, capsys)
    assert recorded["final_bytes"] == final
    # WHEN it is planned from the run alone
    plan = _json(["plan", "--from-run", str(run), "--json"], capsys)
    # THEN the plan is the run's settings: its cache, dtypes, rows, context and prompt
    request = plan["request"]
    assert (request["cache"], request["kv_dtype"], request["weights_dtype"]) == (cache, kv_dtype, "fp32")
    assert (request["batch"], request["context"], request["prompt"]) == (BATCH, PROMPT + NEW, PROMPT)
    # and its figures the recording's: the weights as measured, the KV final and peak as logged
    assert plan["weights_bytes"] == weights_bytes(model)
    assert (plan["kv_bytes"], plan["kv_peak_bytes"]) == (final, recorded["peak_bytes"])
    assert any("the run was on cpu" in note for note in plan["notes"])


def test_flags_typed_after_from_run_win_and_an_older_run_plans_from_its_manifest(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a recorded run
    run = tmp_path / "run"
    record_generate(model, run, BATCH, PROMPT, NEW, profiler=False)
    # WHEN a batch, context and GPU are typed
    argv = ["plan", "--from-run", str(run), "--batch", "8", "--context", "1025", "--gpu-memory", "1GiB"]
    plan = _json([*argv, "--json"], capsys)
    # THEN those win (the prompt then is the worst one for that context), the weights stay the run's
    assert (plan["request"]["batch"], plan["request"]["context"], plan["request"]["prompt"]) == (
        8,
        1025,
        None,
    )
    assert plan["kv_bytes"] == TOKEN_ROW * 8 * 1024
    assert plan["weights_bytes"] == weights_bytes(model)
    assert plan["request"]["gpu_memory_bytes"] == 1 << 30
    # and the text says whose weights they are
    assert main(argv) == 0
    assert "(the run's)" in capsys.readouterr().out
    # GIVEN the same run as kvtrace wrote it before model_config.json: the manifest's geometry plans it
    (run / "model_config.json").unlink()
    older = _json(["plan", "--from-run", str(run), "--json"], capsys)
    assert (older["kv_bytes"], older["kv_bytes_per_token"]) == (
        TOKEN_ROW * BATCH * (PROMPT + NEW - 1),
        TOKEN_ROW,
    )
    assert any("model_config.json" in note for note in older["notes"])


def test_from_run_refuses_what_it_cannot_plan_in_one_line(
    model: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    record_generate(model, run, 1, 5, 2, profiler=False)
    # a model besides the run's own
    assert main(["plan", "--from-run", str(run), "--preset", "llama-3-8b"]) == 2
    assert "drop --preset/--config" in capsys.readouterr().err
    # a folder that is not a run
    assert main(["plan", "--from-run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
