"""`kvtrace export` of real vLLM runs: the KV dtype of an fp8 pool (vLLM stores it in uint8 tensors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from kvtrace import format as fmt
from tests.vllm.workload import BLOCK_SIZE, POOL_BYTES, SIZE, fp8_kv_unsupported, run_script

pytestmark = pytest.mark.skipif(fp8_kv_unsupported() is not None, reason=str(fp8_kv_unsupported()))


@pytest.fixture(scope="module")
def fp8_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run_dir = tmp_path_factory.mktemp("vllm-fp8") / "run"
    result = run_script("fp8_record", str(tiny_model_dir), str(run_dir), kvtrace_dir=None, multiprocess=False)
    return {"dir": run_dir, **result}


def test_an_fp8_pool_exports_as_fp8_with_its_bytes(
    fp8_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    from kvtrace.cli import main

    # GIVEN vLLM's own facts: an fp8 cache, kept in uint8 tensors that are views of one storage
    assert fp8_run["cache_dtype"] == "fp8" and fp8_run["tensor_dtypes"] == ["uint8"]
    assert fp8_run["storage_bytes"] == [POOL_BYTES]
    # one byte an element: a block of all layers is 4 x 2 x 2 kv heads x 64 x 32 tokens = 32 KiB
    head_dim = SIZE.hidden_size // SIZE.num_heads
    fp8_block = SIZE.num_layers * 2 * SIZE.num_kv_heads * head_dim * BLOCK_SIZE
    assert fp8_run["num_gpu_blocks"] == POOL_BYTES // fp8_block == 32
    assert fp8_run["tensor_bytes"] == [POOL_BYTES // SIZE.num_layers] * SIZE.num_layers
    # engine.json keeps what the tensors are (unchanged)
    assert json.loads((fp8_run["dir"] / fmt.ENGINE).read_text())["kv_dtype"] == "uint8"
    # WHEN exported
    out = tmp_path / "tables"
    assert main(["export", str(fp8_run["dir"]), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    (run,) = pq.read_table(out / "runs").to_pylist()
    kv_rows = pq.read_table(out / "kv_events").to_pylist()
    # THEN the runs row and every KV row of the pool say fp8, as the report does
    assert main(["report", str(fp8_run["dir"]), "--json", "--no-export", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["engine"]["kv_dtype"] == "fp8"
    assert run["kv_dtype"] == "fp8"
    assert len(kv_rows) == 2 * SIZE.num_layers
    assert {(row["dtype"], row["source"], row["event"]) for row in kv_rows} == {("fp8", "vllm", "created")}
    # with the tensors' bytes: each K and V half of a layer's view, the one storage of the pool
    assert {row["storage_bytes"] for row in kv_rows} == {POOL_BYTES}
    assert sorted((row["layer"], row["kv"], row["logical_bytes"]) for row in kv_rows) == [
        (layer, kv, fp8_run["tensor_bytes"][layer] // 2) for layer in range(SIZE.num_layers) for kv in "kv"
    ]
    assert run["kv_cache_bytes"] == POOL_BYTES and json.loads(run["engine_json"])["kv_dtype"] == "uint8"
