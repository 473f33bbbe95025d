"""Blocks live before a snapshot's ring buffer began are attributed by their own stacks: the weights of
FlexGen's OPT-1.3B snapshots (allocated by `init_weight_list`) show as weights, figures from the raw file."""

from __future__ import annotations

import io
import json
import pickle
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main

SNAPSHOTS = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"


class _Plain(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _weights_bytes_from_raw(path: Path) -> tuple[int, int]:
    """(bytes of live blocks whose allocation stack passes through init_weight*, all live bytes)."""
    snapshot = _Plain(io.BytesIO(path.read_bytes())).load()
    traced = {
        entry.get("addr")
        for trace in snapshot.get("device_traces", [])
        for entry in trace
        if entry.get("action") == "alloc"
    }
    weights = total = 0
    for segment in snapshot["segments"]:
        address = segment["address"]
        for block in segment["blocks"]:
            here, address = address, address + block["size"]
            if block["state"] not in ("active_allocated", "active_pending_free") or here in traced:
                continue
            history = block.get("history") or [{}]
            size = block.get("requested_size") or history[0].get("real_size") or block["size"]
            frames = block.get("frames") or history[-1].get("frames") or []
            total += size
            if any(frame["name"].startswith("init_weight") for frame in frames):
                weights += size
    return weights, total


@pytest.mark.parametrize("name", ["oom_snapshot.pickle", "1.3b_snapshot.pickle"])
def test_baseline_blocks_are_split_by_their_stacks(name: str) -> None:
    path = SNAPSHOTS / name
    if not path.exists():
        pytest.skip(f"{path} is not here")
    weights, total = _weights_bytes_from_raw(path)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(path), "--json", "-q"]) == 0
    data = json.loads(out.getvalue())
    at_peak = data["devices"][0]["categories_at_peak"]
    assert weights > 0
    assert at_peak["weights"] == weights
    assert at_peak["kv"] == 0
    assert sum(at_peak.values()) == data["devices"][0]["peak_allocated_bytes"]
    assert total <= data["devices"][0]["peak_allocated_bytes"]
