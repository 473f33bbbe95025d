"""What `kvtrace plan --from-run` says of a serving engine's run that its planners have no rules for.

The plain plan sizes transformers' per-call caches by a batch and a context; `--engine vllm` sizes a pool as
vLLM does at its start (its profile run, its null block, its check that one request of max_model_len fits).
transformers' continuous batching (`generate_batch`, engine `transformers-cb`) follows neither: its pool is
what `ContinuousBatchingConfig` fixes (num_blocks, else max_memory_percent of the memory free), two trash
sectors before the data sectors, and no request of max_model_len is checked. Planned either way, it was
misread: as a vLLM run, then refused by vLLM's max_model_len check it never makes. What kvtrace prices in its
own knobs is `kvtrace diagnose --budget` (analyzers.planning.engine_budget), so the refusal sends there.
"""

from __future__ import annotations

from pathlib import Path

from analyzers.engine import EngineInfo
from analyzers.units import human_bytes
from kvtrace.errors import shell_arg

__all__ = ["CONTINUOUS_BATCHING", "not_a_vllm_pool"]

CONTINUOUS_BATCHING = "transformers-cb"  # engine.json's name (kvtrace.integrations.hf_paged_pool)


def not_a_vllm_pool(root: Path, info: EngineInfo) -> str | None:
    """The one-line refusal for an engine run that is not vLLM's, None for a vLLM run (an engine.json
    without a name counts as vLLM's, the engine kvtrace first recorded)."""
    if info.name in ("vllm", ""):
        return None
    report = f"`kvtrace report {shell_arg(root)}` shows its use"
    if info.name != CONTINUOUS_BATCHING:
        return (
            f"{root}: a {info.name} engine run, whose pool kvtrace plan has no rules for; `kvtrace diagnose "
            f"{shell_arg(root)} --gpu-memory SIZE` prices it against a memory, {report}"
        )
    return (
        f"{root}: a transformers continuous-batching run ({info.name}){_pool(info)}: kvtrace plan does not "
        "plan such a pool (it is neither generate()'s cache nor vLLM's); "
        f"`kvtrace diagnose {shell_arg(root)} --gpu-memory SIZE` prices its num_blocks and "
        f"max_memory_percent, {report}"
    )


def _pool(info: EngineInfo) -> str:
    """The pool as the refusal says it (", its pool 32 usable 4-token blocks (96.00 KiB) + 2 trash sectors
    as ..."), "" where engine.json does not say (a run that ended before its pool was made)."""
    if not info.num_blocks or not info.block_size or not info.bytes_per_block:
        return ""
    usable = max(info.num_blocks - info.blocks_reserved, 0)  # as the report counts them
    reserved = info.blocks_reserved
    sectors = "sector" if reserved == 1 else "sectors"
    return (
        f", its pool {usable:,} usable {info.block_size}-token blocks "
        f"({human_bytes(usable * info.bytes_per_block)}) + {reserved} trash {sectors} as "
        "ContinuousBatchingConfig fixed it"
    )
