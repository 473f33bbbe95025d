"""A serving engine's KV pool that the KV log shows but whose engine files are gone (a partial copy of a run).
Pure, torch-free.

An engine's pool is one tensor of blocks allocated whole at its start and sized by its knobs: its first
dimension is blocks, not sequences, and its capacity is the pool's, not tokens a sequence held. Read as a
generate() cache, it would be priced in that cache's remedies (a smaller batch, a shorter context, a
window), which change nothing of its size. Its KV events keep the engine's reserved cache id
(kvtrace.format), so the pool is known without engine.json; what it held in blocks, requests and
preemptions is not, and `kvtrace diagnose` says so instead of pricing those remedies.
"""

from __future__ import annotations

from analyzers.model import MemorySource
from analyzers.summary import Report
from kvtrace.format import CB_CACHE_ID, ENGINE, VLLM_CACHE_ID

__all__ = ["pool_without_engine_files"]

# The engine whose pool logs its KV events under each reserved cache id
_POOL_ENGINES = {
    CB_CACHE_ID: "transformers' continuous batching pool (transformers-cb)",
    VLLM_CACHE_ID: "vLLM's pool",
}


def pool_without_engine_files(source: MemorySource, report: Report) -> str | None:
    """The note for a run whose main KV cache is an engine's pool read without engine.json: what is unknown
    and why no generate()-cache remedy is priced. None for any other input."""
    if source.kind != "run" or source.meta.get("engine") is not None:
        return None
    engine = _POOL_ENGINES.get(report.kv.main_cache) if report.kv.main_cache is not None else None
    if engine is None:
        return None
    return (
        f"cache {report.kv.main_cache} in the KV log is {engine}, read without {ENGINE}: its blocks, "
        "requests and preemptions are unknown, and the pool is allocated whole at the engine's start, so a "
        "smaller batch, a shorter context, a window or a quantized cache would not change its size: no "
        f"remedy is priced (restore {ENGINE} for the engine's diagnosis in its blocks)"
    )
