"""kvtrace without vLLM: importing and recording never import vllm; the vLLM plugin costs nothing without
KVTRACE_DIR; the refusal parser and the import watch work on their own (no vLLM needed)."""

from __future__ import annotations

import json
import subprocess
import sys

from kvtrace.integrations.vllm import RefusalWatch, is_vllm_object, parse_refusal

# vLLM 0.32's message for a 4-layer model with 2 KV heads of 64 in a 1 MiB pool (FIELD_NOTES.md)
MESSAGE = (
    "To serve at least one request with the model's max seq len (512), (0.0 GiB KV cache is needed, which is "
    "larger than the available KV cache memory (0.0 GiB). Based on the available memory, the estimated "
    "maximum model length is 496. Try increasing `gpu_memory_utilization` ..."
)


def _modules_after(code: str) -> set[str]:
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_recording_without_vllm_never_imports_it(tmp_path) -> None:
    code = (
        "import kvtrace\n"
        f"with kvtrace.record({str(tmp_path / 'run')!r}, profiler=False):\n"
        "    pass\n"
        "assert not [f for f in sys.meta_path if type(f).__name__ == '_AfterImport']\n"
    )
    loaded = _modules_after(code)
    assert "kvtrace.recorder" in loaded
    assert not any(name == "vllm" or name.startswith("vllm.") for name in loaded)


def test_plugin_without_kvtrace_dir_does_nothing() -> None:
    code = (
        "import os; os.environ.pop('KVTRACE_DIR', None)\n"
        "from kvtrace.integrations.vllm_plugin import register, _STATE\n"
        "before = list(sys.meta_path)\n"
        "register()\n"
        "assert sys.meta_path == before and not _STATE\n"
    )
    loaded = _modules_after(code)
    assert "torch" not in loaded and "vllm" not in loaded


def test_vllm_objects_are_recognised_by_module_name() -> None:
    fake_llm = type("LLM", (), {"__module__": "vllm.entrypoints.llm"})()
    assert is_vllm_object(fake_llm)
    assert not is_vllm_object(object()) and not is_vllm_object(None)
    assert "vllm" not in sys.modules


def test_refusal_message_parsed() -> None:
    refused = parse_refusal(MESSAGE)
    assert refused is not None
    assert refused["max_model_len"] == 512 and refused["estimated_max_model_len"] == 496
    assert parse_refusal("CUDA out of memory") is None


def test_refusal_watch_waits_for_the_import_and_leaves_nothing() -> None:
    before = list(sys.meta_path)
    watch = RefusalWatch(lambda refused, config: None)
    watch.install()
    # vllm not imported: a finder waits for each module the watch patches (the KV-pool check's; on CPU, the
    # worker that refuses a pool its memory node cannot hold)
    added = [finder for finder in sys.meta_path if finder not in before]
    assert sorted(finder._name for finder in added) == [  # type: ignore[attr-defined]
        "vllm.v1.core.kv_cache_utils",
        "vllm.v1.worker.cpu_worker",
    ]
    watch.uninstall()
    assert sys.meta_path == before


def test_a_multiprocess_engine_is_refused_in_one_line(tmp_path) -> None:
    import pytest

    import kvtrace
    from kvtrace.errors import KvtraceError

    # GIVEN an LLM whose engine core is a client of another process (vLLM's default, SyncMPClient)
    client = type("SyncMPClient", (), {"__module__": "vllm.v1.engine.core_client"})()
    engine = type("LLMEngine", (), {"__module__": "vllm.v1.engine.llm_engine", "engine_core": client})()
    llm = type("LLM", (), {"__module__": "vllm.entrypoints.llm", "llm_engine": engine})()
    # THEN record() says what to do before it writes anything (a half-made run would block the retry), and
    # leaves no recording active
    expected = r"VLLM_ENABLE_V1_MULTIPROCESSING=0.*KVTRACE_DIR"
    with pytest.raises(KvtraceError, match=expected):
        kvtrace.record(tmp_path / "run", model=llm, profiler=False)
    assert not (tmp_path / "run").exists()
    with kvtrace.record(tmp_path / "next", profiler=False):
        pass
    # AND a vLLM object that is no engine (its torch model, SamplingParams) is named, with what to pass
    params = type("SamplingParams", (), {"__module__": "vllm.sampling_params"})()
    said = r"a vllm.LLM \(or LLMEngine\) is needed, got vLLM's SamplingParams"
    with pytest.raises(KvtraceError, match=said):
        kvtrace.record(tmp_path / "params", model=params, profiler=False)
    assert not (tmp_path / "params").exists()


def test_overwrite_removes_a_previous_vllm_runs_engine_files(tmp_path) -> None:
    import kvtrace
    from kvtrace import format as fmt

    # GIVEN a run directory that held a vLLM run
    with kvtrace.record(tmp_path, profiler=False):
        pass
    for name in fmt.ENGINE_FILES:
        (tmp_path / name).write_text('{"step": 1}\n')
    # WHEN it is recorded again with overwrite=True (by a run that is not vLLM's)
    with kvtrace.record(tmp_path, profiler=False, overwrite=True):
        pass
    # THEN no engine file of the old run is left to be read with the new one
    assert not [name for name in fmt.ENGINE_FILES if (tmp_path / name).exists()]
