"""`kvtrace plan --engine vllm`'s result (analyzers.planning.vllm_plan) as text lines and JSON. Computes
nothing: every figure is the plan's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from analyzers.planning.vllm_pipeline import layer_range_text
from analyzers.planning.vllm_plan import VllmPlan, readable_bytes
from analyzers.planning.vllm_start_remedies import StartRemedy
from kvtrace.errors import printable

__all__ = ["format_vllm_text", "vllm_to_json"]


def vllm_to_json(result: VllmPlan, remedies: Sequence[StartRemedy] = ()) -> dict[str, Any]:
    request = {k: v for k, v in asdict(result.request).items() if k != "geometry"}
    request["geometry"] = asdict(result.request.geometry)
    figures = {k: v for k, v in asdict(result).items() if k not in ("request", "notes", "refusals")}
    refusals = list(result.refusals)
    return {
        "engine": "vllm",
        "request": request,
        **figures,
        "refusals": refusals,
        "start_remedies": [asdict(remedy) for remedy in remedies],
        "notes": list(result.notes),
    }


def _block_label(result: VllmPlan) -> str:
    groups = result.kv_groups
    if result.stages and result.bound_stage is not None:
        held = result.stages[result.bound_stage].block_layers
        if groups.kind == "hybrid":
            return f"one block ({held} layer(s) of a group on the stage)"
        return "one block, the stage's layers"
    if groups.kind == "hybrid":
        return f"one block ({groups.layers_per_group} layers a group)"
    return "one block, all layers"


def _sliding_rows(result: VllmPlan) -> list[tuple[str, str]]:
    """The rows a sliding window adds: what one request holds of the pool."""
    groups = result.kv_groups
    if not groups.sliding_groups:
        return []
    kind = "every layer" if groups.kind == "sliding" else "hybrid"
    return [
        ("sliding window", f"{groups.window:,} tokens ({kind})"),
        ("blocks one request holds", f"{result.blocks_per_request:,}"),
    ]


def format_vllm_text(result: VllmPlan, remedies: Sequence[StartRemedy] = ()) -> str:
    req = result.request
    kv_dtype = req.kv_cache_dtype if req.kv_cache_dtype != "auto" else f"auto ({req.model_dtype})"
    tp = f", tensor parallel {req.tensor_parallel_size}" if req.tensor_parallel_size > 1 else ""
    pp = f", pipeline parallel {req.pipeline_parallel_size}" if req.pipeline_parallel_size > 1 else ""
    lines = [f"{req.geometry.name} on vLLM: KV {kv_dtype}, block size {req.block_size}{tp}{pp}"]
    if result.stages:
        lines.append(f"  the figures are stage {result.bound_stage}'s worker's (below: every stage's)")
    rows: list[tuple[str, str]] = []
    if req.num_gpu_blocks_override is not None:  # the memory does not size this pool
        rows.append(("KV memory (num_gpu_blocks_override)", readable_bytes(result.available_kv_bytes)))
    elif req.kv_cache_memory_bytes is not None:
        rows.append(("KV memory (kv_cache_memory_bytes)", readable_bytes(result.available_kv_bytes)))
    else:
        rows += [
            (
                f"GPU x {req.gpu_memory_utilization:g}",
                readable_bytes(math.ceil(req.gpu_memory_bytes * req.gpu_memory_utilization)),
            ),
            ("  - weights", readable_bytes(result.weights_bytes or 0)),
            *(
                [("  - vLLM's buffers (rotary cache, ...)", readable_bytes(req.buffers_bytes))]
                if req.buffers_bytes
                else []
            ),
            ("  - activation peak", readable_bytes(req.activation_peak_bytes)),
            ("  - non-torch", readable_bytes(req.non_torch_bytes)),
            ("available KV memory", readable_bytes(result.available_kv_bytes)),
        ]
    if result.node_free_bytes is not None:
        rows.append(("memory node free (at the refusal)", readable_bytes(result.node_free_bytes)))
    rows += [
        ("KV per token (this worker)", f"{result.kv_bytes_per_token:,} B"),
        (_block_label(result), readable_bytes(result.bytes_per_block)),
        ("KV blocks", f"{result.num_blocks:,}"),
        *_sliding_rows(result),
        ("KV cache size", f"{result.kv_tokens:,} tokens"),
        (
            f"max concurrency @ {req.max_model_len:,}",
            f"{result.max_concurrency:,.2f}x",
        ),
        ("one request at max_model_len", readable_bytes(result.needed_bytes)),
    ]
    width = max(len(label) for label, _ in rows)
    lines += [f"  {label:<{width}}  {value}" for label, value in rows]
    lines += _stage_lines(result)
    lines += [f"vLLM would refuse to start: {reason}." for reason in result.refusals]
    if result.check_bytes <= 0 or result.needed_bytes > result.check_bytes:  # the KV memory too small
        if result.check_bytes <= 0:
            lines.append(
                "vLLM would refuse to start: not even one block beside the null block fits "
                '("No available memory for the cache blocks").'
            )
        else:
            lines.append(
                f"vLLM would refuse to start: one request of {req.max_model_len:,} tokens needs "
                f"{readable_bytes(result.needed_bytes)}, more than the "
                f"{readable_bytes(result.check_bytes)} available (less the null block); the largest "
                f"max_model_len that fits is {result.estimated_max_model_len:,}."
            )
    if remedies:
        lines.append("To make it start (each planned again with one setting changed):")
        lines += [f"  [{'starts' if r.starts else 'no'}] {r.flag}: {r.text}" for r in remedies]
    lines += _batch_lines(result)
    lines += [f"  note: {printable(note)}" for note in result.notes]
    return "\n".join(lines)


def _batch_lines(result: VllmPlan) -> list[str]:
    """What --batch asked: whether that many requests of max_model_len tokens hold the pool at once."""
    req, at_once = result.request, result.requests_at_once
    if req.batch is None:
        return []
    requests = "request" if req.batch == 1 else "requests"
    held, free = req.batch * result.blocks_per_request, max(result.num_blocks - 1, 0)
    need = (
        f"{req.batch:,} {requests} of {req.max_model_len:,} tokens hold {held:,} blocks at once, the pool "
        f"has {free:,} beside the null block"
    )
    fit = f"{at_once:,} fit at once, max concurrency {result.max_concurrency:,.2f}x"
    if result.batch_fits:
        return [f"--batch {req.batch} fits: {need} ({fit})."]
    lines = [f"--batch {req.batch} does not fit: {need} ({fit})."]
    if at_once and result.starts:
        lines.append(
            f"  vLLM starts, and runs the others as blocks free up, preempting some; vLLM's --max-num-seqs "
            f"{at_once} keeps every running request at full length (here: --batch {at_once})"
        )
    return lines


def _stage_lines(result: VllmPlan) -> list[str]:
    """One row per pipeline stage: its layers, weights, KV memory and the blocks its memory alone gives."""
    if not result.stages:
        return []
    header = ("stage", "layers", "weights", "KV memory", "blocks", "starts")
    rows = [
        (
            str(s.stage),
            layer_range_text(s),
            "-" if s.weights_bytes is None else readable_bytes(s.weights_bytes),
            readable_bytes(s.available_kv_bytes),
            f"{s.num_blocks:,}",
            "yes" if s.starts else "no",
        )
        for s in result.stages
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [f"  pipeline stages (vLLM keeps the fewest blocks of any: {result.num_blocks:,}):"]
    for row in (header, *rows):
        lines.append(
            "    "
            + "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return lines
