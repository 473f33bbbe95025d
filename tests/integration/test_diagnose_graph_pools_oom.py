"""`kvtrace diagnose` of a CUDA OOM without a snapshot whose PyTorch message names memory in private pools
(CUDA graphs: torch.compile's mode="reduce-overhead" on a static cache), as torch 2.4 on writes it.

c10/cuda/CUDACachingAllocator.cpp (pytorch/pytorch, DeviceCachingAllocator::malloc) builds the sentence from
the allocated_bytes and reserved_bytes stats and the bytes of the blocks cached free in the graphs' private
pools (P): "Of the allocated memory <allocated + P> is allocated by PyTorch, with <P> allocated in private
pools (e.g., CUDA Graphs), and <reserved - allocated - P> is reserved by PyTorch but unallocated." (the
"with" clause only where P > 0; "HIP Graphs" on ROCm). The messages here are built by those rules, each size
by c10's format_size, from the exact allocator state of a real CUDA OOM (sample_traces/h200/oom_b266, its
snapshot) with part of its free bytes put in a private pool; the builder first reproduces that run's real
message where P is 0."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.cli_json import cli_json
from tests.integration.test_diagnose_capped_oom import H200, LIVE, _as_if_without_snapshots, _PlainData, _text

UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
IN_POOLS = 1300 * 2**20  # of the run's 1.29 GiB reserved but unallocated, cached free in a graph's pool
SEGMENT = 134 * 2**20  # "Tried to allocate 134.00 MiB": the segment the run's allocator tried to reserve


def _format_size(nbytes: int) -> str:
    """c10's format_size: up to 1 KiB in bytes, then KiB, MiB up to 1 GiB, else GiB, two decimals."""
    if nbytes <= 1024:
        return f"{nbytes} bytes"
    for limit, unit in ((2**20, "KiB"), (2**30, "MiB")):
        if nbytes <= limit:
            return f"{nbytes / UNITS[unit]:.2f} {unit}"
    return f"{nbytes / 2**30:.2f} GiB"


def _parsed(size: str) -> int:
    """A size as the message prints it, in bytes (what its two decimals say)."""
    number, unit = size.split(" ")
    return int(float(number) * UNITS[unit])


def _state(run: Path) -> tuple[int, int]:
    """The allocator's allocated_bytes and reserved_bytes at the OOM, from the run's own snapshot: the
    sizes of its live blocks and of its segments."""
    with (run / "snapshots" / "oom.pickle").open("rb") as stream:
        raw = _PlainData(stream).load()
    allocated = sum(b["size"] for s in raw["segments"] for b in s["blocks"] if b["state"] in LIVE)
    return allocated, sum(s["total_size"] for s in raw["segments"])


# What precedes the sentence: the process figures NVML gives (absent without it, as on ROCm), the
# per-process cap (set_per_process_memory_fraction), and the allocator's name (HIP's on ROCm)
THIS_PROCESS = "Including non-PyTorch memory, this process has 25.58 GiB memory in use. "
WORDINGS = {
    "this process": ("CUDA", THIS_PROCESS, True),
    "other process": ("CUDA", "Process 4242 has 1.02 GiB memory in use. " + THIS_PROCESS, True),
    "no NVML": ("CUDA", "", True),
    "no cap": ("CUDA", THIS_PROCESS, False),
    "ROCm": ("HIP", "", True),
}


def _message(allocated: int, reserved: int, pools: int, wording: str = "this process") -> str:
    """PyTorch's message for this allocator state, as c10 builds it (torch 2.4 on)."""
    name, processes, capped = WORDINGS[wording]
    graphs = "HIP Graphs" if name == "HIP" else "CUDA Graphs"
    in_pools = f"with {_format_size(pools)} allocated in private pools (e.g., {graphs}), " if pools else ""
    allowed = "24.96 GiB allowed; " if capped else ""
    return (
        f"{name} out of memory. Tried to allocate {_format_size(SEGMENT)}. GPU 0 has a total capacity of "
        f"139.80 GiB of which 114.21 GiB is free. {processes}{allowed}Of the allocated memory "
        f"{_format_size(allocated + pools)} is allocated by PyTorch, {in_pools}and "
        f"{_format_size(reserved - allocated - pools)} is reserved by PyTorch but unallocated. If reserved "
        "but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to "
        "avoid fragmentation.  See documentation for Memory Management  "
        "(https://docs.pytorch.org/docs/stable/notes/cuda.html#optimizing-memory-usage-with-pytorch-cuda-alloc-conf)"
    )


def _run_with(tmp_path: Path, pools: int, wording: str = "this process") -> tuple[Path, str]:
    """A copy of the real batch-266 OOM as if recorded with snapshots=False, its message the one c10 writes
    for its allocator state with `pools` of its free bytes cached in private pools."""
    run = tmp_path / "oom_b266"
    shutil.copytree(H200 / "oom_b266", run)
    allocated, reserved = _state(run)
    path = run / "manifest.json"
    manifest = json.loads(path.read_text())
    # the builder follows c10: with no private pool it writes the message this run really ended with
    assert _message(allocated, reserved, 0) == manifest["ended"]["message"]
    message = _message(allocated, reserved, pools, wording)
    manifest["ended"]["message"] = message
    path.write_text(json.dumps(manifest, indent=1))
    _as_if_without_snapshots(run)
    return run, message


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def _held(message: str) -> tuple[int, int, int]:
    """The three figures the message prints: allocated by PyTorch, in private pools (0 where it names
    none), reserved but unallocated."""
    size = r"(\d+(?:\.\d\d)? (?:bytes|KiB|MiB|GiB))"
    pools = f"(?:with {size} allocated in private pools .*?)?"
    found = re.search(f"{size} is allocated by PyTorch, {pools}and {size} is reserved", message)
    assert found
    return _parsed(found.group(1)), _parsed(found.group(2)) if found.group(2) else 0, _parsed(found.group(3))


def test_graph_pool_oom_counts_pool_bytes_as_held_not_reusable(tmp_path: Path, capsys: Any) -> None:
    # GIVEN the real OOM with 1300 MiB of its 1.29 GiB reserved-but-unallocated cached in a CUDA graph's
    # private pool: PyTorch's message counts them in "allocated by PyTorch" and leaves 21.91 MiB unallocated
    run, message = _run_with(tmp_path, IN_POOLS)
    allocated, reserved = _state(H200 / "oom_b266")
    assert (
        "24.85 GiB is allocated by PyTorch, with 1.27 GiB allocated in private pools (e.g., CUDA Graphs), "
        "and 21.91 MiB is reserved by PyTorch but unallocated." in message
    )
    held, pools, unallocated = _held(message)
    limit = 24.96 * 2**30
    # WHEN diagnosed
    d = cli_json(["diagnose", str(run), "--json"], capsys)
    # THEN allocated counts the pools' bytes as the message does, reserved is the two main figures' sum (the
    # pools' segments are reserved memory), and only the 21.91 MiB outside the pools is reserved but
    # unallocated
    assert d["held_from_message"] is True
    assert d["allocated_bytes"] == held and d["reserved_bytes"] == held + unallocated
    assert d["reserved_unallocated_bytes"] == unallocated
    assert d["private_pool_bytes"] == pools == _parsed("1.27 GiB")
    assert abs(d["reserved_bytes"] - reserved) < 2**30 / 100  # within the message's rounding of the truth
    assert abs(d["allocated_bytes"] - (allocated + IN_POOLS)) < 2**30 / 200
    # the free memory within the cap and the shortfall follow from that reserved figure
    within = int(limit) - (held + unallocated)
    assert d["free_within_limit_bytes"] == within and d["shortfall_bytes"] == SEGMENT - within
    # the pools' bytes cannot serve the request: without them too few bytes were free for the segment, so
    # fragmentation is not offered as a cause, and expandable_segments recovers only the bytes outside them
    assert unallocated + within < SEGMENT <= unallocated + pools + within
    assert d["fragmentation_possible"] is None and d["fragmented"] is None
    (expandable,) = [r for r in d["remedies"] if r["kind"] == "expandable_segments"]
    assert expandable["saved_bytes"] == unallocated and expandable["fits"] is False
    assert d["remedies"][0]["kind"] != "expandable_segments"
    # AND the text names the pools' bytes, where they count, and what frees them
    text = _text(run, capsys)
    row = r"in private pools \(CUDA graphs\), counted in allocated +about 1\.27 GiB \(PyTorch's message\)\n"
    assert re.search(row, text), text
    assert "maybe: " not in text
    assert "counts 1.27 GiB cached free in private pools (CUDA graphs" in text
    assert "only their own graphs can use those blocks" in text
    assert f"torch.cuda.memory_allocated() leaves them out: about {_gib(held - pools)}" in text


# Each wording with private pools, and the two without NVML's figures without them too
CASES = [(wording, IN_POOLS) for wording in WORDINGS] + [("no NVML", 0), ("ROCm", 0)]
CASE_IDS = [f"{wording}, {'pools' if pools else 'none'}" for wording, pools in CASES]


@pytest.mark.parametrize(("wording", "pools"), CASES, ids=CASE_IDS)
def test_every_wording_of_the_sentence_reads_the_same(
    tmp_path: Path, capsys: Any, wording: str, pools: int
) -> None:
    # GIVEN the real OOM's state in each wording torch 2.4 on writes: NVML's process figures or none, a
    # cap or none, HIP's name on ROCm, private pools or none (the "with" clause then absent)
    run, message = _run_with(tmp_path, pools, wording)
    held, in_pools, unallocated = _held(message)
    # WHEN diagnosed
    d = cli_json(["diagnose", str(run), "--json"], capsys)
    # THEN the same figures come out of every one
    assert d["held_from_message"] is True
    assert (d["allocated_bytes"], d["reserved_bytes"]) == (held, held + unallocated)
    assert d["reserved_unallocated_bytes"] == unallocated
    assert d["private_pool_bytes"] == in_pools
    assert d["segment_bytes"] == SEGMENT
    assert d["limit_bytes"] == (int(24.96 * 2**30) if WORDINGS[wording][2] else None)
