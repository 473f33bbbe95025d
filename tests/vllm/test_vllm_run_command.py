"""`kvtrace run script.py` of a script that builds an in-process vLLM `LLM`: the engine is found at its
first generate() (record(model="auto")) and followed as `record(model=llm)` follows it: the pool, the
engine steps and the preemptions equal vLLM's own figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.cli import main
from tests.vllm.workload import POOL_BYTES, REQUESTS, ROOT

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tests.vllm.workload import make_llm, metric, run_workload

    llm = make_llm(sys.argv[1])
    outputs = run_workload(llm)
    said = {"outputs": len(outputs), "preemptions": metric(llm, "vllm:num_preemptions")}
    print("VLLM " + json.dumps(said))
    """
)


def test_a_vllm_script_is_recorded_with_its_engine_found(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a script that builds an in-process LLM and runs the workload (it preempts), under `kvtrace run`
    script, run = tmp_path / "serve.py", tmp_path / "run"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "PYTHONPATH": str(ROOT)}
    env.pop("KVTRACE_DIR", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtrace.cli",
            "run",
            "--no-profiler",
            "-o",
            str(run),
            str(script),
            str(tiny_model_dir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    said = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("VLLM "))[5:])
    assert said["outputs"] == REQUESTS
    assert "kvtrace run: recorded" in done.stderr and "(vLLM engine of LLM)" in done.stderr

    # THEN the run holds the engine's pool and steps, as record(model=llm) gives them
    engine = json.loads((run / fmt.ENGINE).read_text())
    assert engine["kv_cache_bytes"] == POOL_BYTES
    manifest = json.loads((run / fmt.MANIFEST).read_text())
    assert manifest["engine"]["preemptions"] == said["preemptions"] > 0
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"]["preemptions"] == said["preemptions"]
    assert report["engine"]["requests"] == REQUESTS
    assert report["kv"]["final_bytes"] == POOL_BYTES
