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
    number, unit = re.search(r"(\d+\.\d\d) (MiB|GiB) allowed;", message).groups()  # type: ignore[union-attr]
    live: dict[int, int] = {}
    batch = 0
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["event"] in ("created", "grown"):
            live[event["addr"]] = event["storage_bytes"]
            batch = event["shape"][0]
        elif event["event"] == "freed":
            live.pop(event["addr"], None)
    return {
        "request": oom["size"],
        "device_free": oom["device_free"],
        "reserved": sum(s["total_size"] for s in raw["segments"]),
        "allocated": sum(b.get("requested_size") or b["size"] for b in blocks if b["state"] in LIVE),
        "largest_free": max(b["size"] for b in blocks if b["state"] == "inactive"),
        "limit": int(float(number) * UNITS[unit]),
        "kv": sum(live.values()),
        "batch": batch,
    }


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
    target = math.floor(batch * (kv - sure) / kv)
    tight = math.floor(batch * (kv - shortfall) / kv)
    (remedy,) = [r for r in d["remedies"] if r["kind"] == "batch"]
    assert remedy["setting"] == target < SEEN_TO_FAIL and remedy["fits"] is True
    assert remedy["saved_bytes"] == round(kv / batch * (batch - target)) >= sure
    assert f"Batch {target} instead of {batch} frees" in remedy["sentence"]
    assert f"Batch {tight} covers only the" in remedy["sentence"] and tight > target
    # the allocator setting aimed at the cause leads; a static cache, which frees less, does not fit
    assert d["remedies"][0]["kind"] == "expandable_segments" and d["remedies"][0]["fits"] is True
    (static,) = [r for r in d["remedies"] if r["kind"] == "static_cache"]
    assert static["fits"] is False and shortfall <= static["saved_bytes"] < sure
    for r in d["remedies"]:  # nothing that frees bytes is called a fit short of the sure figure
        if r["fits"] and r["kind"] != "expandable_segments":
            assert r["saved_bytes"] >= sure, r
    # and the text says so, the "no" verdict gone
    cli_json_text = _text(run, capsys)
    assert "fragmentation caused it" in cli_json_text and "yes: enough free bytes in total" in cli_json_text
    assert "per-process limit" in cli_json_text and "a per-process limit applied" in cli_json_text
    assert "the shortfall is taken as the request itself" not in cli_json_text


def _text(run: Path, capsys: Any) -> str:
    from kvtrace.cli import main

    assert main(["diagnose", str(run)]) == 0
    return str(capsys.readouterr().out)
