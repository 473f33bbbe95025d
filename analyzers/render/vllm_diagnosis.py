"""A vLLM diagnosis (refused start or preemptions) as text and JSON. Computes nothing."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from analyzers.planning.vllm_diagnose import PreemptionDiagnosis, RefusedDiagnosis
from analyzers.planning.vllm_plan import readable_bytes


def vllm_diagnosis_to_json(d: RefusedDiagnosis | PreemptionDiagnosis) -> dict[str, Any]:
    return {"engine": "vllm", **asdict(d)}


def _remedy_lines(d: RefusedDiagnosis | PreemptionDiagnosis) -> list[str]:
    marks = {True: "[fits]", False: "[no]  ", None: "[?]   "}
    return [f"  {marks[r.fits]} {r.sentence}" for r in d.remedies]


def _refused_text(d: RefusedDiagnosis) -> list[str]:
    vllm_estimate = (
        ""
        if d.vllm_estimated_max_model_len is None
        else f" (vLLM's own estimate: {d.vllm_estimated_max_model_len:,})"
    )
    lines = [
        f"kvtrace diagnose: {d.path}: vLLM refused to start, not enough KV memory for max_model_len "
        f"{d.max_model_len:,}",
        f"  needed     {readable_bytes(d.needed_bytes):>12}  ({d.needed_blocks:,} blocks x "
        f"{readable_bytes(d.bytes_per_block)}; a block: {d.block_size} tokens over all {d.num_layers} "
        f"layers, {readable_bytes(d.bytes_per_block // max(d.num_layers, 1))} a layer)",
        f"  available  {readable_bytes(d.available_bytes):>12}  ({d.available_bytes:,} B)",
        f"  short by   {readable_bytes(d.needed_bytes - d.available_bytes):>12}",
        f"  largest max_model_len that fits: {d.estimated_max_model_len:,}{vllm_estimate}",
    ]
    if d.message:
        lines.append(f"  vLLM said: {d.message.strip()}")  # whole: it is what is being diagnosed
    lines.append("Remedies, in vLLM's settings:")
    return lines + _remedy_lines(d)


def _preemption_text(d: PreemptionDiagnosis) -> list[str]:
    lines = [
        f"kvtrace diagnose: {d.path}: vLLM preempted {d.preemptions} time(s), "
        f"{d.preempted_tokens:,} KV tokens dropped, {d.recomputed_tokens:,} recomputed",
        f"  pool: {d.num_blocks:,} blocks of {d.block_size} tokens ({d.usable_blocks:,} usable), "
        f"{readable_bytes(d.kv_cache_bytes)}, {readable_bytes(d.bytes_per_block)} a block",
        f"  at the first preemption (step {d.first_preemption_step}) the pool held:",
    ]
    for held in d.held_at_first:
        as_of = "" if held.as_of_step == d.first_preemption_step else f", as of step {held.as_of_step}"
        lines.append(
            f"    request {held.request_id:<10} {held.blocks:>5} blocks {held.tokens:>7,} tokens "
            f"(prompt {held.prompt_tokens:,}, output {held.output_tokens:,}{as_of})"
        )
    total = sum(h.blocks for h in d.held_at_first)
    lines.append(f"    total      {'':<10} {total:>5} blocks")
    lines += [
        f"  demand if nothing were preempted: {d.demand_bound_blocks:,} blocks "
        f"(+{d.blocks_needed - d.demand_bound_blocks} null = {d.blocks_needed:,}); "
        f"on the recorded schedule it peaked at {d.recorded_peak_demand_blocks:,}",
        f"  model: {d.model}",
    ]
    lines += [f"  note: {n}" for n in d.notes]
    lines.append("Would have avoided every preemption:")
    return lines + _remedy_lines(d)


def vllm_diagnosis_to_text(d: RefusedDiagnosis | PreemptionDiagnosis) -> str:
    lines = _refused_text(d) if isinstance(d, RefusedDiagnosis) else _preemption_text(d)
    lines += [f"  note: {n}" for n in d.notes] if isinstance(d, RefusedDiagnosis) else []
    return "\n".join(lines)
