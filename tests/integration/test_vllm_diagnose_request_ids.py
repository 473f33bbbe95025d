"""`kvtrace diagnose` of a served vLLM run: its request ids are the server's
(`cmpl-<16 hex>-<prompt>-<8 hex>`, 32 characters, or a client's own, any length), which pushed the
per-request table's columns apart. The text elides an id over 20 characters in its middle and keeps the
columns aligned; --json keeps the ids whole.

The committed vLLM sample run (sample_traces/vllm_preempt) with its requests renamed as vLLM's OpenAI
server names them (`OpenAIServingCompletion`: `cmpl-{random_uuid()}-{i}`, then the engine's
`-{random_uuid():.8}`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kvtrace.cli import main

PREEMPT = Path(__file__).resolve().parents[2] / "sample_traces" / "vllm_preempt"
ROW = re.compile(r"    (?:request (\S+) +|total +)(\d+) blocks")


@pytest.fixture
def served(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The sample with its requests renamed as a server names them: (the run, sample id -> served id)."""
    run = tmp_path / "served"
    shutil.copytree(PREEMPT, run)
    lines = (run / "engine_requests.jsonl").read_text().splitlines()
    ids = sorted({json.loads(line)["request_id"] for line in lines if line.strip()})
    # "0-9771d797": the sample's prompt index and vLLM's own 8 hex digits, kept in the served id
    names = {rid: f"cmpl-{0x5EED0000 + i:016x}-{rid}" for i, rid in enumerate(ids)}
    for name in ("engine_requests.jsonl", "engine_steps.jsonl"):
        text = (run / name).read_text()
        for old, new in names.items():
            text = text.replace(f'"{old}"', f'"{new}"')
        (run / name).write_text(text)
    return run, names


def test_diagnose_keeps_its_request_table_aligned_with_a_servers_long_ids(
    served: tuple[Path, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    run, names = served
    assert {len(served_id) for served_id in names.values()} == {32}

    # WHEN diagnosed as JSON, THEN the ids are whole
    assert main(["diagnose", str(run), "--json"]) == 0
    held = json.loads(capsys.readouterr().out)["held_at_first"]
    assert len(held) == 7 and {h["request_id"] for h in held} <= set(names.values())

    # AND the text shows each as its head and tail around "...", 20 characters, its blocks in one column
    # with the total's
    assert main(["diagnose", str(run)]) == 0
    text = capsys.readouterr().out
    rows = [(m, line) for line in text.splitlines() if (m := ROW.match(line))]
    assert len(rows) == len(held) + 1
    shown = [m[1] for m, _ in rows[:-1]]
    assert shown == [h["request_id"][:8] + "..." + h["request_id"][-9:] for h in held]
    assert {len(s) for s in shown} == {20}
    assert len({line.index(" blocks") for _, line in rows}) == 1
    assert sum(int(m[2]) for m, _ in rows[:-1]) == int(rows[-1][0][2])
