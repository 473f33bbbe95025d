"""`kvtrace report` and `kvtrace diagnose` on a hand-made vLLM run directory (tests/engine_files.py):
the engine object in the JSON, the pool as the KV peak, the text section and the HTML pool panel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analyzers.render.html import report_to_html
from analyzers.render.json import report_to_json
from analyzers.render.text import report_to_text
from analyzers.report import build_report
from kvtrace.cli import main
from tests.engine_files import first_stage_engine, refused_engine, write_engine_run


def _vllm_run(folder: Path, **kwargs) -> Path:
    write_engine_run(folder, **kwargs)
    manifest = {"format": "kvtrace-run", "schema_version": 1, "ended": {"status": "ok"}, "pid": 1}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_report_json_text_and_html(tmp_path: Path) -> None:
    source, report = build_report(_vllm_run(tmp_path / "run"))
    data = report_to_json(report)
    engine = data["engine"]
    assert engine["name"] == "vllm" and engine["version"] == "0.32.0"
    assert (engine["num_blocks"], engine["block_size"], engine["kv_cache_bytes"]) == (5, 4, 640)
    assert (engine["peak_blocks_used"], engine["preemptions"], engine["preempted_tokens"]) == (4, 1, 7)
    assert engine["prefix_cache_evicted_blocks"] == 3
    assert data["kv"]["peak_bytes"] == 640  # the pool's storage, counted once
    text = report_to_text(report)
    assert "KV pool: 5 blocks of 4 tokens" in text and "preemptions: 1" in text
    page = report_to_html(source, report)
    assert "kvtrace-engine-pool" in page and "preemption" in page and "req A" in page


def test_a_hf_run_has_no_engine(tmp_path: Path) -> None:
    folder = _vllm_run(tmp_path / "run")
    for name in ("engine.json", "engine_steps.jsonl", "engine_requests.jsonl"):
        (folder / name).unlink()
    _, report = build_report(folder)
    assert report_to_json(report)["engine"] is None


def test_diagnose_cli_on_preemption_and_refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["diagnose", str(_vllm_run(tmp_path / "pre")), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] == "preemption" and out["kv_cache_memory_bytes_needed"] == 768
    refused = _vllm_run(tmp_path / "refused", engine=refused_engine(), steps=[], requests=[])
    assert main(["diagnose", str(refused)]) == 0
    text = capsys.readouterr().out
    assert "refused to start" in text and "496" in text and "1.00 MiB" in text


def test_demo_engine_vllm_without_vllm_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: tests/vllm runs the demo")
    assert main(["demo", "--engine", "vllm", "--out", "unused"]) == 1  # a part not installed (README)
    err = capsys.readouterr().err.strip()
    assert "needs vLLM" in err and "\n" not in err


@pytest.mark.parametrize("stages", [True, False])
def test_a_pipeline_parallel_run_is_its_first_stages_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stages: bool
) -> None:
    # GIVEN the first pipeline stage's worker's engine.json, with or without each stage's share
    folder = _vllm_run(tmp_path / "run", engine=first_stage_engine(stages))

    # WHEN it is reported and planned
    _, report = build_report(folder)
    data = report_to_json(report)
    assert main(["plan", "--engine", "vllm", "--from-run", str(folder), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)

    # THEN the arithmetic is the stage's 2 layers, as measured (it had all 4: 64 B), and the plan gives
    # the pool's 5 blocks of 128 B (it gave 2 of 256 B)
    per_token = 2 * 2 * 1 * 4 * 2
    assert data["kv"]["bytes_per_token_measured"] == data["kv"]["bytes_per_token_expected"] == per_token
    assert (plan["num_blocks"], plan["bytes_per_block"], plan["kv_bytes_per_token"]) == (5, 128, per_token)
    (note,) = [n for n in data["notes"] if n.startswith("pipeline parallel 2:")]
    assert "holding the KV of layers 0-1 of the model's 4" in note
    if stages:
        assert note.endswith(
            "the 2 stages hold 640 B (layers 0-1), 640 B (layers 2-3) over the same 5 blocks, 1.25 KiB in all"
        )
    else:
        assert "each stage's share not recorded" in note


def test_a_tensor_and_pipeline_parallel_run_is_one_stages_first_worker(tmp_path: Path) -> None:
    # GIVEN the first worker's engine.json of 2 pipeline stages of 2 tensor-parallel workers: it holds 1 of
    # the model's 2 KV heads of layers 0-1, and its rank's share of the first stage's weights
    engine = first_stage_engine(stages=True)
    engine["model"]["num_kv_heads"] = 2
    engine["config"]["tensor_parallel_size"] = 2
    engine["memory_profile"] = {"weights_bytes": 2048}

    # WHEN it is reported
    _, report = build_report(_vllm_run(tmp_path / "run", engine=engine))
    data = report_to_json(report)

    # THEN the arithmetic is the worker's (2 layers x 1 head), the pipeline note's whole pool is the 2
    # stages' 640 B on each of 2 ranks, and the tensor-parallel note's total is a stage's (it said the 2
    # ranks' 1.25 KiB were the whole, where the 4 workers hold 2.50 KiB), the weights the first worker's
    per_token = 2 * 2 * 1 * 4 * 2
    assert data["kv"]["bytes_per_token_measured"] == data["kv"]["bytes_per_token_expected"] == per_token
    (staged,) = [n for n in data["notes"] if n.startswith("pipeline parallel 2:")]
    assert staged.endswith("on each of its 2 tensor-parallel workers over the same 5 blocks, 2.50 KiB in all")
    (split,) = [n for n in data["notes"] if n.startswith("tensor parallel 2:")]
    assert split.endswith(
        "holding 1 of the model's 2 KV heads; each of its pipeline stage's 2 workers holds a pool of this "
        "size, 1.25 KiB a stage"
    )
    (weights,) = [n for n in data["notes"] if "engine.json)" in n]
    assert weights.startswith(
        "the first pipeline stage's first worker's share of the weights (2.00 KiB, engine.json)"
    )
