"""Meta-style attention sharded by hand over 2 gloo ranks, its caches grown by torch.cat in the layout Meta's
reference code and flash-attn use, [batch, seq, kv_heads, head_dim], and given to `kvtrace.track`.

Said with `layout="bshd"`, each rank holds 1 of the 2 KV heads for every token; unsaid, the log reads the
tensors as [batch, heads, seq, head_dim] and must not turn that guess into a data-parallel verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_worker as worker

from kvtrace.cli import main

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
TOKENS = worker.PROMPT_LEN + worker.DECODE_STEPS
LOCAL_KV_HEADS = worker.N_KV_HEADS // WORLD
# One rank's arithmetic: layers x K,V x its KV heads x head_dim x float32.
RANK_PER_TOKEN = worker.N_LAYERS * 2 * LOCAL_KV_HEADS * HEAD_DIM * 4


def test_tracked_bshd_tensors_read_tokens_and_heads_from_their_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two tensor-parallel ranks whose tracked caches are [batch, seq, kv_heads, head_dim]
    out, facts_dir = tmp_path / "groups", tmp_path / "facts"
    facts = worker.launch_facts("track-bshd", out, facts_dir, WORLD)
    for rank_facts in facts:
        shape = [worker.MAX_BATCH, TOKENS, LOCAL_KV_HEADS, HEAD_DIM]
        assert rank_facts["said"]["shapes"] == [shape] * 2 * worker.N_LAYERS
        assert rank_facts["said"]["kv_bytes"] == RANK_PER_TOKEN * TOKENS * worker.MAX_BATCH == 4608

    # WHEN the run tracked with layout="bshd" is reported
    assert main(["report", str(out / "said"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    # THEN each rank holds 9 tokens of 2 rows, 1 KV head of 2: 256 bytes per token, measured and arithmetic
    for entry in data["ranks"]:
        kv = entry["kv"]
        assert kv["final_bytes"] == facts[entry["rank"]]["said"]["kv_bytes"]
        assert (kv["tokens_held"], kv["batch"]) == (TOKENS, worker.MAX_BATCH) == (9, 2)
        assert kv["bytes_per_token_expected"] == kv["bytes_per_token_measured"] == RANK_PER_TOKEN == 256
        assert [layer["tokens"] for layer in kv["per_layer"]] == [TOKENS] * worker.N_LAYERS
    # AND the group is tensor parallel: the same 2 rows, the ranks' heads adding up to the model's
    assert (data["kv"]["tokens_held"], data["kv"]["batch"]) == (9, 2)
    assert data["kv"]["bytes_per_token_measured"] == WORLD * RANK_PER_TOKEN == 512
    assert not any("data parallel" in note for note in data["notes"])

    # WHEN the same tensors were tracked without saying their layout
    assert main(["report", str(out / "unsaid"), "--json"]) == 0
    unsaid = json.loads(capsys.readouterr().out)
    # THEN no data-parallel verdict is drawn from heads the model cannot have (9 of 2), and a note says
    # how to track them
    assert unsaid["kv"]["batch"] == worker.MAX_BATCH
    assert not any("data parallel" in note for note in unsaid["notes"])
    assert any('layout="bshd"' in note for note in unsaid["notes"])
