"""`kvtrace diagnose` on the two real OOMs recorded on an H200 under a per-process cap
(sample_traces/h200): the cap PyTorch's message names, fragmentation as the cause, and remedies whose
"fits" holds even if the allocator reuses none of the bytes stranded in fragments. Batch 266 ran out;
batch 261, which the shortfall alone called enough, ran out too: a batch remedy must be below it. Every
figure is computed here from the run's own files (its OOM pickle, KV log and manifest)."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.cli_json import cli_json

H200 = Path(__file__).resolve().parents[2] / "sample_traces" / "h200"
LIVE = ("active_allocated", "active_pending_free", "active_awaiting_free")
UNITS = {"MiB": 2**20, "GiB": 2**30}
SEEN_TO_FAIL = 261  # oom_b261_fit: the batch the old diagnosis called enough ran out too


class _PlainData(pickle.Unpickler):
    """The test's own restricted unpickler: plain data only, independent of the code under test."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing {module}.{name}")


def _figures(run: Path) -> dict[str, int]:
    """The OOM's figures from the run's raw files: the oom.pickle's trace entry and segments, the cap in
    the manifest's message, the KV live at the end of the KV log and its batch."""
    with (run / "snapshots" / "oom.pickle").open("rb") as stream:
        raw = _PlainData(stream).load()
    (oom,) = [e for trace in raw["device_traces"] for e in trace if e["action"] == "oom"]
    blocks = [b for s in raw["segments"] for b in s["blocks"]]
    message = json.loads((run / "manifest.json").read_text())["ended"]["message"]
    return {
        "request": oom["size"],
        "device_free": oom["device_free"],
        "reserved": sum(s["total_size"] for s in raw["segments"]),
        "allocated": sum(b.get("requested_size") or b["size"] for b in blocks if b["state"] in LIVE),
        "largest_free": max(b["size"] for b in blocks if b["state"] == "inactive"),
        "limit": _size_in(message, "allowed;"),
        **_kv_at_end(run),
    }


def _size_in(message: str, before: str) -> int:
    """The figure PyTorch's message puts just before `before` ("24.96 GiB allowed;"), in bytes."""
    found = re.search(r"(\d+\.\d\d) (MiB|GiB) " + re.escape(before), message)
    assert found, before
    return int(float(found.group(1)) * UNITS[found.group(2)])


def _kv_at_end(run: Path) -> dict[str, int]:
    """The KV live at the end of the run's KV log, its batch (the rows of the last storage logged) and how
    many layers hold it."""
    live: dict[int, tuple[int, int]] = {}
    batch = 0
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] in ("created", "grown"):
            live[event["addr"]] = (event["layer"], event["storage_bytes"])
            batch = event["shape"][0]
        elif event["event"] == "freed":
            live.pop(event["addr"], None)
    layers = {layer for layer, nbytes in live.values() if nbytes}
    return {"kv": sum(nbytes for _, nbytes in live.values()), "batch": batch, "layers": len(layers)}


@pytest.mark.parametrize("name", ["oom_b266", "oom_b261_fit"])
def test_capped_fragmented_oom_is_priced_past_its_fragments(name: str, tmp_path: Path, capsys: Any) -> None:
    # GIVEN a copy of a real OOM recorded under a per-process cap (diagnose may not write, but a copy is safe)
    run = tmp_path / name
    shutil.copytree(H200 / name, run)
    f = _figures(run)
    # WHEN diagnosed
    d = cli_json(["diagnose", str(run), "--json"], capsys)
    # THEN fragmentation caused it: the bytes were there (reserved but unallocated, and what the cap left),
    # but neither a free block nor the cap's room held the request
    stranded = f["reserved"] - f["allocated"]
    within = max(f["limit"] - f["reserved"], 0)
    assert d["free_bytes"] == f["device_free"] > f["request"]  # the device had plenty: the cap refused
    assert d["reserved_unallocated_bytes"] == stranded
    assert d["largest_free_block_bytes"] == f["largest_free"]
    assert stranded + within >= f["request"] > max(f["largest_free"], within)
    assert d["fragmented"] is True
    # the shortfall is priced against the cap PyTorch's message says is allowed, not the device's free memory
    shortfall = f["request"] - within
    assert d["shortfall_bytes"] == shortfall
    assert d["limit_bytes"] == f["limit"] and d["free_within_limit_bytes"] == within
    # a batch that fits must free the shortfall and every stranded byte: below the batch seen to fail
    batch, kv = f["batch"], f["kv"]
    sure = shortfall + stranded
    remedy, target, tight = _batch_remedy(d, batch, kv, shortfall, sure)
    assert f"Batch {tight} covers only the" in remedy["sentence"] and tight > target
    # the allocator setting aimed at the cause leads; a static cache, which would hold all of its positions
    # from its first update where this decode step holds fewer, raises the memory instead: no fit
    assert d["remedies"][0]["kind"] == "expandable_segments" and d["remedies"][0]["fits"] is True
    (static,) = [r for r in d["remedies"] if r["kind"] == "static_cache"]
    assert static["fits"] is False and static["saved_bytes"] < 0
    assert "would raise the peak by" in static["sentence"]
    for r in d["remedies"]:  # nothing that frees bytes is called a fit short of the sure figure
        if r["fits"] and r["kind"] != "expandable_segments":
            assert r["saved_bytes"] >= sure, r
    # and the text says so, the "no" verdict gone
    cli_json_text = _text(run, capsys)
    assert "fragmentation caused it" in cli_json_text and "yes: enough free bytes in total" in cli_json_text
    assert "per-process limit" in cli_json_text and "a per-process limit applied" in cli_json_text
    assert "the shortfall is taken as the request itself" not in cli_json_text
    # the layers named are the largest 8 of those holding KV, and the label says so
    assert f["layers"] > 8 and d["kv_layers_live"] == f["layers"] and len(d["top_layers"]) == 8
    assert f"KV by layer at this moment (the largest 8 of {f['layers']} layers)" in cli_json_text


def _batch_remedy(
    d: dict[str, Any], batch: int, kv: int, shortfall: int, sure: int
) -> tuple[dict[str, Any], int, int]:
    """The batch remedy, checked to free `sure` bytes of KV (below the batch seen to fail) and to say so;
    with the batch that frees `sure` and the one that frees only the shortfall."""
    target = math.floor(batch * (kv - sure) / kv)
    tight = math.floor(batch * (kv - shortfall) / kv)
    (remedy,) = [r for r in d["remedies"] if r["kind"] == "batch"]
    assert remedy["setting"] == target < SEEN_TO_FAIL and remedy["fits"] is True
    assert remedy["saved_bytes"] == round(kv / batch * (batch - target)) >= sure
    assert f"Batch {target} instead of {batch} frees" in remedy["sentence"]
    return remedy, target, tight


def _text(run: Path, capsys: Any) -> str:
    from kvtrace.cli import main

    assert main(["diagnose", str(run)]) == 0
    return str(capsys.readouterr().out)


def _as_if_without_snapshots(run: Path) -> None:
    """Make a copy of a run look recorded with snapshots=False: no snapshots/ folder, and the manifest as
    the recorder writes it then (no snapshot listed, the snapshots section absent)."""
    shutil.rmtree(run / "snapshots")
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"] = [f for f in manifest["files"] if not f.startswith("snapshots/")]
    manifest["ended"].pop("oom_snapshot")
    manifest["snapshots"] = {"status": "absent", "reason": "snapshots=False"}
    manifest["options"]["snapshots"] = False
    path.write_text(json.dumps(manifest, indent=1))


def test_capped_oom_without_snapshot_takes_reserved_from_the_message(tmp_path: Path, capsys: Any) -> None:
    # GIVEN a copy of the batch-266 OOM as if recorded with snapshots=False: PyTorch's message is all that
    # says what the allocator held ("23.58 GiB is allocated by PyTorch, and 1.29 GiB is reserved by PyTorch
    # but unallocated"), and it names the segment it tried to reserve, not the request
    run = tmp_path / "oom_b266"
    shutil.copytree(H200 / "oom_b266", run)
    _as_if_without_snapshots(run)
    message = json.loads((run / "manifest.json").read_text())["ended"]["message"]
    allocated = _size_in(message, "is allocated by PyTorch")
    stranded = _size_in(message, "is reserved by PyTorch but unallocated")
    segment = _tried(message)
    limit = _size_in(message, "allowed;")
    held = _kv_at_end(run)
    kv, batch = held["kv"], held["batch"]
    # WHEN diagnosed
    d = cli_json(["diagnose", str(run), "--json"], capsys)
    # THEN reserved is the message's two figures together, and the free memory within the cap follows
    reserved = allocated + stranded
    within = limit - reserved
    assert d["allocated_bytes"] == allocated and d["reserved_bytes"] == reserved
    assert d["held_from_message"] is True
    assert d["reserved_unallocated_bytes"] == stranded
    assert d["limit_bytes"] == limit and d["free_within_limit_bytes"] == within
    assert d["segment_bytes"] == segment and d["requested_bytes"] is None
    shortfall = segment - within
    assert d["shortfall_bytes"] == shortfall > 0
    # no largest free block: fragmentation is possible (the bytes were there in total), not sure
    assert d["largest_free_block_bytes"] is None
    assert stranded + within >= segment
    assert d["fragmented"] is None and d["fragmentation_possible"] is True
    # so "fits" is priced past the reserved-but-unallocated bytes, as with a snapshot
    sure = shortfall + stranded
    remedy, target, tight = _batch_remedy(d, batch, kv, shortfall, sure)
    assert "reserved but unallocated is reused" in remedy["sentence"]
    assert f"Batch {tight} covers only the" in remedy["sentence"] and tight > target
    lead = d["remedies"][0]
    assert lead["kind"] == "expandable_segments" and lead["fits"] is True and lead["saved_bytes"] == stranded
    assert "what may have caused this OOM" in lead["sentence"]
    for r in d["remedies"]:
        if r["fits"] and r["kind"] != "expandable_segments":
            assert r["saved_bytes"] >= sure, r
    # and the text says where the figures come from, and "maybe", not "yes"
    text = _text(run, capsys)
    assert f"about {_gib(reserved)} (PyTorch's message)" in text and "fragmentation caused it" in text
    assert "maybe: " in text and "yes: enough free bytes" not in text
    assert "no OOM snapshot" in text


def _tried(message: str) -> int:
    """The figure after "Tried to allocate" in PyTorch's message, in bytes."""
    found = re.search(r"Tried to allocate (\d+\.\d\d) (MiB|GiB)", message)
    assert found
    return int(float(found.group(1)) * UNITS[found.group(2)])


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
