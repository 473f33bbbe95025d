"""vLLM tests: they run in the vLLM environment (.venv-vllm, `.ci/run`) and skip where vllm is absent.

The in-process tests need the engine in this process; the multiprocess and refused-start tests run their
own interpreters (tests/vllm/scripts.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.pop("KVTRACE_DIR", None)  # the plugin stays idle in this process


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    from tests.vllm.workload import write_model

    return write_model(tmp_path_factory.mktemp("vllm") / "tiny-llama3")


@pytest.fixture(scope="session")
def tensor_parallel_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The workload over 2 tensor-parallel workers (one core each), recorded by the plugin: its run folder
    (`dir`) and vLLM's own figures (tests.vllm.scripts `tensor_parallel`), one run for the tests that read
    it."""
    from tests.vllm.workload import run_script

    run_dir = tmp_path_factory.mktemp("vllm-tp") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        figures = run_script("tensor_parallel", str(tiny_model_dir), kvtrace_dir=run_dir, multiprocess=True)
    return {"dir": run_dir, **figures}


# vLLM's n-gram proposer imports numba, and so llvmlite, whose `ffi.lib` answers any attribute (`__dict__`
# too) with a C function wrapper: from then on each engine start in the process fails in vLLM's kernel
# registry scan (`vllm/triton_utils/dispatcher.py`: "'_lib_fn_wrapper' object has no attribute 'get'"),
# a vLLM bug, whatever kvtrace does. Modules that start an n-gram engine run after every other in-process one.
_NGRAM_MODULES = ("test_vllm_speculative.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name in _NGRAM_MODULES)  # stable: the order within each kept
