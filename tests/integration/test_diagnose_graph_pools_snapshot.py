"""`kvtrace diagnose` of a CUDA OOM WITH a snapshot whose segments a private pool owns (CUDA graphs:
torch.compile's mode="reduce-overhead", torch.cuda.graph).

torch.cuda.memory._snapshot() writes each segment's `segment_pool_id` (torch/cuda/memory.py, `_snapshot`'s
Segment: "id of the memory pool owning this segment"), c10's `SegmentInfo.owner_private_pool_id`, which stays
{0, 0} for the default pool (c10/core/CachingDeviceAllocator.h). The free blocks of a private pool's segments
serve only that pool's allocations (its graphs' replays): c10's OOM message sums them apart, "with P allocated
in private pools (e.g., CUDA Graphs)", counted in the allocated figure, not the unallocated one.

No published snapshot has a private pool (every one in ../shared/real_traces/snapshots and sample_traces has
(0, 0) or, torch 2.0, no key), so the inputs here are the real batch-266 OOM (sample_traces/h200/oom_b266)
with the `segment_pool_id` of some of its real segments set to a graph's pool id, written back with the stdlib
pickle as torch's `_dump_snapshot` writes it, and its message rewritten as c10 words it for that state. Every
figure is computed here from the raw pickle."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.cli_json import cli_json
from tests.integration.test_diagnose_capped_oom import H200, LIVE, _PlainData, _size_in, _text
from tests.integration.test_diagnose_graph_pools_oom import _message, _state

GRAPH_POOL = (1, 0)  # a CUDA graph's pool: (capture id, 0), as torch.cuda.graph's capture_begin makes it
FRAGMENTS = 128 * 2**20  # the run's big fragments: its free blocks of 133 MiB and so, in nine segments

SegmentPick = Callable[[dict[str, Any]], bool]


def _free(segment: dict[str, Any]) -> list[int]:
    return [b["size"] for b in segment["blocks"] if b["state"] == "inactive"]


def _holds_a_fragment(segment: dict[str, Any]) -> bool:
    return max(_free(segment), default=0) >= FRAGMENTS


def _holds_any_free(segment: dict[str, Any]) -> bool:
    return bool(_free(segment))


def _with_graph_pool(tmp_path: Path, pick: SegmentPick) -> tuple[Path, dict[str, int]]:
    """A copy of the real OOM whose segments `pick` chooses belong to a graph's pool, its message the one c10
    writes then; and the figures the raw pickle gives."""
    run = tmp_path / "oom_b266"
    shutil.copytree(H200 / "oom_b266", run)
    pickled = run / "snapshots" / "oom.pickle"
    with pickled.open("rb") as stream:
        raw = _PlainData(stream).load()
    assert {tuple(s["segment_pool_id"]) for s in raw["segments"]} == {(0, 0)}  # as recorded: the default pool
    pooled = [s for s in raw["segments"] if pick(s)]
    for segment in pooled:
        segment["segment_pool_id"] = GRAPH_POOL
    with pickled.open("wb") as stream:
        pickle.dump(raw, stream)
    in_pools = sum(sum(_free(s)) for s in pooled)
    # c10's message for that state: the pools' free bytes move from "reserved but unallocated" to "allocated"
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    block_allocated, reserved = _state(run)
    assert _message(block_allocated, reserved, 0) == manifest["ended"]["message"]
    manifest["ended"]["message"] = _message(block_allocated, reserved, in_pools)
    path.write_text(json.dumps(manifest, indent=1))
    (oom,) = [e for trace in raw["device_traces"] for e in trace if e["action"] == "oom"]
    blocks = [b for s in raw["segments"] for b in s["blocks"]]
    live = sum(b.get("requested_size") or b["size"] for b in blocks if b["state"] in LIVE)
    outside = [size for s in raw["segments"] if s not in pooled for size in _free(s)]
    return run, {
        "segments": len(pooled),
        "in_pools": in_pools,
        "request": oom["size"],
        "reserved": reserved,
        "live": live,
        "largest_outside": max(outside, default=0),
        "limit": _size_in(manifest["ended"]["message"], "allowed;"),
    }


def test_graph_pool_fragments_are_held_not_the_requests(tmp_path: Path, capsys: Any) -> None:
    # GIVEN the real OOM (fragmentation caused it: 1.30 GiB reserved but unallocated, no free block of the
    # 133.52 MiB request) with the nine segments holding its big free blocks owned by a graph's pool
    run, f = _with_graph_pool(tmp_path, _holds_a_fragment)
    assert f["segments"] == 9 and f["in_pools"] == 1_254_205_440 and f["largest_outside"] == 4 * 2**20
    # WHEN diagnosed
    d = cli_json(["diagnose", str(run), "--json"], capsys)
    # THEN the pools' free blocks are held, as c10's message counts them: in allocated, not unallocated
    assert d["private_pool_bytes"] == f["in_pools"]
    assert d["allocated_bytes"] == f["live"] + f["in_pools"] and d["reserved_bytes"] == f["reserved"]
    unallocated = f["reserved"] - f["live"] - f["in_pools"]
    assert d["reserved_unallocated_bytes"] == unallocated == 137_945_272
    # no block of theirs is the largest free block: the largest left is a 4 MiB one
    assert d["largest_free_block_bytes"] == f["largest_outside"]
    # the bytes outside the pools and those left within the cap still reach the request, no block holds it
    within = f["limit"] - f["reserved"]
    assert d["free_within_limit_bytes"] == within
    assert unallocated + within >= f["request"] > max(f["largest_outside"], within)
    assert d["fragmented"] is True
    # expandable_segments recovers only the bytes outside the pools
    (expandable,) = [r for r in d["remedies"] if r["kind"] == "expandable_segments"]
    assert expandable["saved_bytes"] == unallocated and expandable["fits"] is True
    assert "recovering up to the 131.55 MiB reserved but not allocated" in expandable["sentence"]
    # AND the text names the pools' bytes, and where they count
    text = _text(run, capsys)
    assert re.search(r"in private pools \(CUDA graphs\), counted in allocated +1\.17 GiB\n", text), text
    assert re.search(r"largest free block in reserved segments outside private pools +4\.00 MiB\n", text)
    assert "private pools (segment_pool_id other than (0, 0); CUDA graphs" in text
    assert "hold 1.17 GiB in free blocks, counted as allocated here" in text
    assert "Without them, allocated is 23.57 GiB (the live blocks)" in text


def test_graph_pools_holding_every_free_block_rule_fragmentation_out(tmp_path: Path, capsys: Any) -> None:
    # GIVEN the real OOM with every segment that has a free block owned by a graph's pool
    run, f = _with_graph_pool(tmp_path, _holds_any_free)
    assert f["segments"] == 44 and f["in_pools"] == 1_386_126_336 and f["largest_outside"] == 0
    # WHEN diagnosed
    d = cli_json(["diagnose", str(run), "--json"], capsys)
    # THEN outside the pools only the live blocks' rounding is unallocated: with what the cap left, too
    # little for the request, so fragmentation did not cause it
    unallocated = f["reserved"] - f["live"] - f["in_pools"]
    assert d["private_pool_bytes"] == f["in_pools"]
    assert d["reserved_unallocated_bytes"] == unallocated == 6_024_376
    assert d["largest_free_block_bytes"] == 0
    assert unallocated + (f["limit"] - f["reserved"]) < f["request"]
    assert d["fragmented"] is False and d["fragmentation_possible"] is False
    (expandable,) = [r for r in d["remedies"] if r["kind"] == "expandable_segments"]
    assert expandable["saved_bytes"] == unallocated and expandable["fits"] is False
    assert d["remedies"][0]["kind"] != "expandable_segments"
    text = _text(run, capsys)
    assert re.search(r"fragmentation caused it +no: not enough free memory in total within the limit\n", text)
    assert re.search(r"largest free block in reserved segments outside private pools +0 B\n", text)


def test_bare_snapshot_counts_graph_pools_the_same(tmp_path: Path, capsys: Any) -> None:
    # GIVEN the OOM snapshot pickle alone (no message, so no cap known), its fragments in a graph's pool
    run, f = _with_graph_pool(tmp_path, _holds_a_fragment)
    # WHEN diagnosed
    d = cli_json(["diagnose", str(run / "snapshots" / "oom.pickle"), "--json"], capsys)
    # THEN the same held and free figures as with the run
    assert d["private_pool_bytes"] == f["in_pools"]
    assert d["allocated_bytes"] == f["live"] + f["in_pools"]
    assert d["reserved_unallocated_bytes"] == f["reserved"] - f["live"] - f["in_pools"]
    assert d["largest_free_block_bytes"] == f["largest_outside"]
    (expandable,) = [r for r in d["remedies"] if r["kind"] == "expandable_segments"]
    assert expandable["saved_bytes"] == d["reserved_unallocated_bytes"]


def test_default_pool_snapshot_has_no_private_pool_bytes(capsys: Any) -> None:
    # GIVEN the real OOM snapshot as recorded: every segment in the default pool, (0, 0)
    pickled = H200 / "oom_b266" / "snapshots" / "oom.pickle"
    with pickled.open("rb") as stream:
        raw = _PlainData(stream).load()
    # WHEN diagnosed
    d = cli_json(["diagnose", str(pickled), "--json"], capsys)
    # THEN nothing is in a private pool, and the largest free block is any segment's
    assert d["private_pool_bytes"] is None
    assert d["largest_free_block_bytes"] == max(size for s in raw["segments"] for size in _free(s))
