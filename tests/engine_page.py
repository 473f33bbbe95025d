"""An engine run's pool table as `kvtrace report -o` writes it, and the rows it should hold, worked out here
from the run's raw engine files (engine.json, engine_steps.jsonl, engine_requests.jsonl), never from the
code under test. Shared by the vLLM sample tests and the transformers continuous-batching ones."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

# vLLM's finish reasons for a request that ran to its end; transformers' continuous batching gives none
_COMPLETED = {"length", "stop", None}


def pool_table(page: str) -> dict[str, str]:
    """The page's `<name> <version> KV pool` table as {label: figure}, unescaped."""
    found = re.search(r"<h2>[^<]* KV pool</h2><table class='summary'>(.*?)</table>", page, flags=re.S)
    assert found is not None, "no KV pool table on the page"
    cells = re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", found[1])
    return {html.unescape(label): html.unescape(value) for label, value in cells}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def _blocks_cell(engine: dict[str, Any]) -> str:
    """The pool's blocks and what of them no request gets: vLLM's null block (engine.json's
    `blocks_reserved`, 1 where absent), transformers' two trash sectors."""
    blocks, reserved = engine["num_blocks"], engine.get("blocks_reserved", 1)
    what = {
        ("vllm", 1): "is vLLM's null block",
        ("transformers-cb", 2): "are transformers' trash sectors",
    }[(engine["name"], reserved)]
    kept = f"{reserved} of the {blocks:,} blocks {what}, never handed out"
    return f"{blocks:,} blocks of {engine['block_size']} tokens ({kept})"


def expected_pool_rows(run: Path) -> dict[str, str]:
    """The rows the text report's engine lines say, from the raw files: the pool (its storage's bytes, its KV
    dtype), the steps, the peak of what requests held while each step ran against the blocks the
    engine lets them take (total less reserved) and its first step, the preemptions (first step, tokens
    dropped, tokens recomputed on resuming) and the prefix-cache evictions."""
    engine = json.loads((run / "engine.json").read_text())
    steps = _lines(run / "engine_steps.jsonl")
    requests = _lines(run / "engine_requests.jsonl")
    reasons = {r.get("finish_reason") for r in requests if r["event"] == "finished"}
    assert reasons <= _COMPLETED, f"every request ran to its end (else the requests row says how): {reasons}"
    held = [max(s["blocks_used"], s["blocks_used_in_step"]) for s in steps]
    usable = steps[0]["blocks_total"] - steps[0]["blocks_reserved"]
    peak = max(held)
    preempted = [r for r in requests if r["event"] == "preempted"]
    preemptions = "none"
    if preempted:
        first = min(r["step"] for r in preempted)
        dropped = sum(r["dropped_tokens"] for r in preempted)
        recomputed = sum(r.get("recomputed_tokens", 0) for r in requests if r["event"] == "resumed")
        preemptions = (
            f"{len(preempted)} (first at step {first}), {dropped:,} tokens dropped, {recomputed:,} recomputed"
        )
    share = round(100 * peak / usable)
    return {
        "blocks": _blocks_cell(engine),
        "pool": f"{_human(sum(s['bytes'] for s in engine['storage']))} ({engine['kv_dtype']})",
        "engine steps": f"{len(steps):,}",
        "requests": f"{len({r['request_id'] for r in requests})} requests",
        "peak": (
            f"{peak:,} of {usable:,} usable blocks used ({share}%, counted while each step ran) "
            f"at step {steps[held.index(peak)]['step']}"
        ),
        "preemptions": preemptions,
        "prefix-cache blocks evicted": f"{sum(s['prefix_evicted_blocks'] for s in steps):,}",
    }
