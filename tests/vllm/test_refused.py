"""A vLLM start refused for lack of KV memory leaves a run with vLLM's own figures: inside
`kvtrace.record(dir)` with no model (vllm not even imported when the block starts), and under KVTRACE_DIR
with the engine in its own process."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from kvtrace.run_reader import read_run
from tests.vllm.scripts import REFUSED_MAX_MODEL_LEN, REFUSED_POOL_BYTES
from tests.vllm.workload import BLOCK_BYTES, BLOCK_SIZE, run_script


def _check_refused(run_dir: Path, message: str, process: str) -> dict[str, Any]:
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    refused = engine["refused"]
    assert engine["status"] == "refused_start" and engine["process"] == process
    # vLLM's own figures, read from its message independently of kvtrace's parser
    wanted = int(re.search(r"max seq len \((\d+)\)", message).group(1))  # type: ignore[union-attr]
    estimate = int(re.search(r"maximum model length is (\d+)", message).group(1))  # type: ignore[union-attr]
    assert refused["max_model_len"] == wanted == REFUSED_MAX_MODEL_LEN
    assert refused["estimated_max_model_len"] == estimate
    # the arithmetic: max_model_len in whole blocks; the pool less the null block vLLM holds back
    assert refused["needed_bytes"] == -(-REFUSED_MAX_MODEL_LEN // BLOCK_SIZE) * BLOCK_BYTES
    assert refused["available_bytes"] == REFUSED_POOL_BYTES - BLOCK_BYTES
    assert estimate == refused["available_bytes"] // BLOCK_BYTES * BLOCK_SIZE
    assert engine["config"]["kv_cache_memory_bytes"] == REFUSED_POOL_BYTES
    manifest = read_run(run_dir).manifest
    assert manifest["ended"]["status"] == "exception" and manifest["ended"]["type"] == "ValueError"
    return engine


def test_refused_inside_record_without_a_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "refused"
    model = str(tiny_model_dir)
    result = run_script("refused_record", model, str(run_dir), kvtrace_dir=None, multiprocess=False)
    assert result["type"] == "ValueError"
    _check_refused(run_dir, result["message"], "inproc")


def test_refused_under_kvtrace_dir(tiny_model_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "refused-plugin"
    result = run_script("refused_plugin", str(tiny_model_dir), kvtrace_dir=run_dir, multiprocess=True)
    assert result["type"] == "RuntimeError"  # the front end only hears that the engine core died
    engine = json.loads((run_dir / fmt.ENGINE).read_text())
    _check_refused(run_dir, engine["refused"]["message"], "engine_core")


def test_refusal_watch_is_undone(tiny_model_dir: Path, tmp_path: Path) -> None:
    import vllm.v1.core.kv_cache_utils as kv_cache_utils

    import kvtrace
    from tests.vllm.workload import make_llm

    original = kv_cache_utils._check_enough_kv_cache_memory
    with pytest.raises(ValueError, match="estimated maximum model length is"), kvtrace.record(tmp_path / "r"):
        make_llm(
            tiny_model_dir, kv_cache_memory_bytes=REFUSED_POOL_BYTES, max_model_len=REFUSED_MAX_MODEL_LEN
        )
    assert kv_cache_utils._check_enough_kv_cache_memory is original
    assert json.loads((tmp_path / "r" / fmt.ENGINE).read_text())["status"] == "refused_start"
