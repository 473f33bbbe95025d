"""Broken or hostile engine files: one line naming the file and the problem, exit status 2, no traceback;
and the engine modules import neither torch nor vllm."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvtrace.cli import main
from tests.engine_files import ENGINE_JSON, refused_engine, write_engine_run


def _run_dir(folder: Path, engine: dict) -> Path:
    write_engine_run(folder, engine=engine, steps=[], requests=[])
    manifest = {"format": "kvtrace-run", "schema_version": 1, "ended": {"status": "ok"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("engine", "needle"),
    [
        ({**ENGINE_JSON, "block_size": 0}, "block_size"),
        ({**ENGINE_JSON, "num_blocks": -3}, "num_blocks"),
        ({**refused_engine(), "model": {"num_layers": 4}}, "num_kv_heads"),
        ({**refused_engine(), "model": {"num_layers": 4, "num_kv_heads": 2, "head_dim": True}}, "head_dim"),
        ({**ENGINE_JSON, "pipeline_stages": {"layers": [0]}}, "'pipeline_stages' must be a list of objects"),
        ({**ENGINE_JSON, "pipeline_stages": [{"layers": ["0"]}]}, "pipeline_stages[0].layers"),
        ({**ENGINE_JSON, "pipeline_stages": [{"layers": [0], "kv_cache_bytes": -1}]}, "kv_cache_bytes"),
    ],
)
def test_bad_engine_json_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], engine: dict, needle: str
) -> None:
    folder = _run_dir(tmp_path / "run", engine)
    assert main(["diagnose", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "engine.json" in err and needle in err and "\n" not in err and "Traceback" not in err


def test_engine_modules_import_neither_torch_nor_vllm() -> None:
    code = (
        "import json, sys\n"
        "import analyzers.engine, analyzers.planning.vllm_plan, analyzers.planning.vllm_diagnose\n"
        "import analyzers.render.engine, analyzers.render.vllm_diagnosis\n"
        "import kvtrace.commands.plan_vllm, kvtrace.commands.demo_vllm\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "analyzers.planning.vllm_diagnose" in loaded
    assert "torch" not in loaded and "vllm" not in loaded and "plotly" not in loaded
