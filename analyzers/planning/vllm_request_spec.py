"""What one vLLM request of a length takes of the pool, as a run's KV specs say (`vllm_specs`), and the blocks
a refused start's request needs: vLLM's own figure where its refusal recorded one. Shared by the diagnoses of
refused starts (`vllm_refused`, `vllm_node_refused`). Pure, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analyzers.planning.vllm_plan import estimate_max_model_len_of
from analyzers.planning.vllm_specs import KvGroups, blocks_per_request

__all__ = ["RequestSpec", "blocks_needed"]


@dataclass(frozen=True)
class RequestSpec:
    """What one request of a length takes of the pool, as the run's KV specs say (vllm_specs)."""

    groups: KvGroups
    in_flight: int
    block_size: int
    bytes_per_block: int

    def blocks(self, max_model_len: int) -> int:
        return blocks_per_request(self.groups, self.block_size, max_model_len, self.in_flight)

    def needed(self, max_model_len: int) -> int:
        return self.blocks(max_model_len) * self.bytes_per_block

    def estimate(self, check: int, max_model_len: int) -> int:
        return estimate_max_model_len_of(
            check, self.bytes_per_block, self.groups, self.block_size, max_model_len, self.in_flight
        )


def blocks_needed(
    refused: dict[str, Any], spec: RequestSpec, max_len: int, notes: list[str]
) -> tuple[int, bool]:
    """(blocks one request of max_len takes, whether the run's KV specs give them): vLLM's own figure where
    the refusal records it (its needed bytes over a block's), the specs' otherwise."""
    modelled = spec.blocks(max_len)
    recorded = refused.get("needed_bytes")
    if not isinstance(recorded, int) or isinstance(recorded, bool) or recorded <= 0:
        return modelled, True
    if recorded == modelled * spec.bytes_per_block:
        return modelled, True
    if recorded % spec.bytes_per_block:  # not whole blocks of this geometry: its pages are not vLLM's
        notes.append(
            f"vLLM reported {recorded:,} B needed, not a whole number of the geometry's "
            f"{spec.bytes_per_block:,} B blocks; the geometry gives {modelled * spec.bytes_per_block:,} B "
            "(padded KV specs are not modelled)"
        )
        return modelled, True
    blocks = recorded // spec.bytes_per_block
    notes.append(
        f"vLLM reported {recorded:,} B needed ({blocks:,} blocks); the KV specs engine.json gives "
        f"({_specs_text(spec.groups)}) make {modelled * spec.bytes_per_block:,} B: vLLM's figure is used, "
        "and what depends on the length (the largest max_model_len at other settings) is not priced"
    )
    return blocks, False


def _specs_text(groups: KvGroups) -> str:
    if groups.kind == "full":
        return "every layer full attention"
    if groups.kind == "sliding":
        return f"every layer sliding over {groups.window:,} tokens"
    return f"hybrid, {groups.full_groups} full and {groups.sliding_groups} sliding groups"
