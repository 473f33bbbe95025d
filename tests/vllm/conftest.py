"""vLLM tests: they run in the vLLM environment (.venv-vllm, `.ci/run`) and skip where vllm is absent.

The in-process tests need the engine in this process; the multiprocess and refused-start tests run their
own interpreters (tests/vllm/scripts.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.pop("KVTRACE_DIR", None)  # the plugin stays idle in this process


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    from tests.vllm.workload import write_model

    return write_model(tmp_path_factory.mktemp("vllm") / "tiny-llama3")
