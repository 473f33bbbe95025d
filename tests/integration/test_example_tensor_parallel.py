"""The README's tensor-parallel example runs as written: `torchrun --nproc-per-node 2
examples/record_tensor_parallel.py runs/tp` (as `python -m torch.distributed.run`) records a tiny Llama 3
sharded by transformers' own plan on 2 gloo ranks, and `kvtrace report` adds the ranks' KV up."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not built into this torch", allow_module_level=True)
pytest.importorskip("transformers.distributed")

from kvtrace.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "record_tensor_parallel.py"
WORLD = 2


def _example() -> Any:
    """The example's module, for its model size and token counts (the inputs, not its figures)."""
    spec = importlib.util.spec_from_file_location("record_tensor_parallel", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tensor_parallel_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the README's torchrun line, run as this interpreter's torch.distributed.run into a new folder
    line = re.search(r"^torchrun (--nproc-per-node 2 \S+) runs/tp ", (ROOT / "README.md").read_text(), re.M)
    assert line is not None and line.group(1) == "--nproc-per-node 2 examples/record_tensor_parallel.py"
    out = tmp_path / "tp"
    # a free rendezvous port: torchrun reads --master-port from PET_MASTER_PORT
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PET_MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", *line.group(1).split(), str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # THEN each rank's cache holds its half of the KV heads, in float32, for every token fed: the prompt
    # and the new tokens but the last, which generate() never feeds back
    example = _example()
    size = example.SIZE
    assert (size.num_kv_heads, size.tie_embeddings) == (2, False)
    head_dim = size.hidden_size // size.num_heads
    tokens = example.PROMPT_TOKENS + example.NEW_TOKENS - 1
    rank_kv_bytes = size.num_layers * 2 * (size.num_kv_heads // WORLD) * head_dim * tokens * example.BATCH * 4
    assert rank_kv_bytes == 11_264  # the figure the README quotes

    assert main(["report", str(out), "--json"]) == 0
    group = json.loads(capsys.readouterr().out)
    assert [entry["rank"] for entry in group["ranks"]] == list(range(WORLD))
    for entry in group["ranks"]:
        assert entry["status"] == "ok" and entry["world_size"] == WORLD
        assert entry["kv"]["final_bytes"] == rank_kv_bytes
        assert (entry["kv"]["tokens_held"], entry["kv"]["batch"]) == (tokens, example.BATCH)
    assert group["kv"]["final_bytes"] == WORLD * rank_kv_bytes

    # AND one rank's report is that rank's share: 1 of the model's 2 KV heads
    assert main(["report", str(out / "rank-0"), "--json"]) == 0
    rank_kv = json.loads(capsys.readouterr().out)["kv"]
    assert rank_kv["final_bytes"] == rank_kv_bytes
    assert rank_kv["rank_heads"] == {
        "rank": 0,
        "world_size": WORLD,
        "kv_heads_held": size.num_kv_heads // WORLD,
        "model_kv_heads": size.num_kv_heads,
    }
