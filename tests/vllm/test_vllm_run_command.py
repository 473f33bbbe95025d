"""`kvtrace run script.py` of a script that builds a vLLM `LLM`: the engine is found at its first generate()
(record(model="auto")) and followed as `record(model=llm)` follows it: the pool, the engine steps and the
preemptions equal vLLM's own figures. With VLLM_ENABLE_V1_MULTIPROCESSING unset (vLLM's default: the engine
core in a process of its own) kvtrace run puts the engine core in the script's process; set to 1 by the
user, the run says that the engine ran elsewhere and how to record it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.cli import main
from tests.vllm.workload import POOL_BYTES, REQUESTS, ROOT

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tests.vllm.workload import make_llm, metric, run_workload

    if __name__ == "__main__":  # a multiprocess engine core starts by spawn, which imports this script
        llm = make_llm(sys.argv[1])
        outputs = run_workload(llm)
        said = {"outputs": len(outputs), "preemptions": metric(llm, "vllm:num_preemptions")}
        print("VLLM " + json.dumps(said))
    """
)


def _kvtrace_run(script: Path, run: Path, model_dir: Path, multiprocessing: str | None) -> Any:
    """`kvtrace run --no-profiler -o RUN script MODEL` in its own interpreter, the vLLM variable as given."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KVTRACE_DIR", None)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if multiprocessing is not None:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = multiprocessing
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "kvtrace.cli",
            "run",
            "--no-profiler",
            "-o",
            str(run),
            str(script),
            str(model_dir),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
    )


def test_a_vllm_script_is_recorded_with_its_engine_found(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a script that builds an LLM as vLLM's docs do (no multiprocessing variable set: vLLM would put
    # the engine core in a process of its own) and runs the workload (it preempts), under `kvtrace run`
    script, run = tmp_path / "serve.py", tmp_path / "run"
    script.write_text(SCRIPT, encoding="utf-8")
    done = _kvtrace_run(script, run, tiny_model_dir, multiprocessing=None)
    assert done.returncode == 0, done.stderr[-4000:]
    said = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("VLLM "))[5:])
    assert said["outputs"] == REQUESTS
    assert "kvtrace run: recorded" in done.stderr
    assert "(vLLM engine of LLM, in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by kvtrace run))" in (
        done.stderr
    )

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


def test_an_engine_the_user_keeps_in_its_own_process_is_said_not_recorded(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the same script with VLLM_ENABLE_V1_MULTIPROCESSING=1 set by the user (kvtrace run keeps it)
    script, run = tmp_path / "serve.py", tmp_path / "run"
    script.write_text(SCRIPT, encoding="utf-8")
    done = _kvtrace_run(script, run, tiny_model_dir, multiprocessing="1")

    # THEN the script ran as its own; the run says that the LLM's engine ran elsewhere, and how to record it
    # (it said "no transformers or vLLM generate() call" of a script that made one)
    assert done.returncode == 0, done.stderr[-4000:]
    said = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("VLLM "))[5:])
    assert said["outputs"] == REQUESTS
    line = next(line for line in done.stderr.splitlines() if line.startswith("kvtrace run: recorded"))
    assert "a vLLM LLM whose engine ran in its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1)" in line
    # (the command to paste is the script's own, its argument, the model's folder, with it: it said
    # `python serve.py`, which the script refuses without the folder)
    assert f"KVTRACE_DIR={run}-engine python {script} {tiny_model_dir});" in line
    assert "no transformers or vLLM generate() call" not in line
    assert not (run / fmt.ENGINE).exists()
    # AND its report says so too, not that the script called no generate() ("found no generate() call, so
    # the run has no model ... call the model's generate() while it records")
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(
        "found a vLLM LLM at its first generate(), but its engine ran in a process" in n for n in notes
    )
    assert not any("found no generate() call" in note for note in notes)
    # AND a plan from it says why it has no model ("recorded without model=", an argument its user never
    # gives), and its diagnosis that no KV remedy can be priced, in one line
    assert main(["plan", "--from-run", str(run)]) == 2
    said = "no model geometry (its vLLM engine ran in a process of its own (VLLM_ENABLE_V1_MULTIPROCESSING=1)"
    assert said in capsys.readouterr().err
    assert main(["diagnose", str(run)]) == 0
    text = capsys.readouterr().out
    assert "cannot be priced: no KV cache was held in this run" in text and "cannot be computed" not in text


KILLED_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from tests.vllm.workload import make_llm, prompts, sampling

    llm = make_llm(sys.argv[1])
    llm.generate(prompts(2), sampling(4))  # the engine is found here and its steps logged
    time.sleep(0.5)  # the writer thread flushes the logs every 0.1 s
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer or `kill -9` ends it: no manifest end
    """
)


def test_a_killed_vllm_script_is_not_said_to_have_called_no_generate(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a vLLM script under `kvtrace run` killed (SIGKILL) after its engine was found and two requests
    # ran: its manifest still says running and lists no files, but engine.json and its logs are there
    script, run = tmp_path / "killed.py", tmp_path / "run"
    script.write_text(KILLED_SCRIPT, encoding="utf-8")
    done = _kvtrace_run(script, run, tiny_model_dir, multiprocessing=None)
    assert done.returncode == -9, done.stderr[-4000:]
    manifest = json.loads((run / fmt.MANIFEST).read_text())
    assert manifest["ended"]["status"] == "running" and "files" not in manifest
    assert (run / fmt.ENGINE).is_file()

    # WHEN it is reported
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)

    # THEN the report reads the engine's two requests, and does not say that the script called no
    # generate() (it said "found no generate() call, so the run has no model", beside the engine's figures)
    assert report["engine"]["requests"] == 2
    assert any("never finished" in note for note in report["notes"])
    assert not any("found no generate() call" in note for note in report["notes"])
