"""A process group of one (fairscale and others initialize gloo with world size 1): a plain run in
out_dir, not a group, with its rank facts in the manifest all the same."""

from __future__ import annotations

import json
import socket

import torch

import kvtrace
from kvtrace.format import MANIFEST, is_run_dir, is_run_group


def test_world_of_one_records_a_plain_run_with_rank_facts(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)  # the launcher did not say: null, not a guess
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1
    )
    try:
        with kvtrace.record(tmp_path / "run", profiler=False, nvtx=False):
            kv = torch.zeros(1, 2, 4, 8)
            kvtrace.track(kv, layer=0, kind="k")
    finally:
        torch.distributed.destroy_process_group()
    out = tmp_path / "run"
    assert is_run_dir(out) and not is_run_group(out)
    assert not any(p.name.startswith("rank-") for p in out.iterdir())
    manifest = json.loads((out / MANIFEST).read_text())
    assert {k: manifest[k] for k in ("rank", "world_size", "local_rank", "hostname", "backend")} == {
        "rank": 0,
        "world_size": 1,
        "local_rank": None,
        "hostname": socket.gethostname(),
        "backend": "gloo",
    }


def test_outside_a_process_group_the_manifest_has_no_rank(tmp_path):
    assert not torch.distributed.is_initialized()
    with kvtrace.record(tmp_path / "run", profiler=False, nvtx=False):
        pass
    manifest = json.loads((tmp_path / "run" / MANIFEST).read_text())
    assert "rank" not in manifest and "world_size" not in manifest
