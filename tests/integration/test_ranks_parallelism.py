"""Data or tensor parallel, told from what the ranks' runs hold: a group of two copies of this repo's sample
run (a whole Llama on each rank, all its KV heads) is data parallel; the same with each rank's attention
weights a half share of the query heads (tensor parallelism over more ranks than KV heads) is not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from analyzers.group import build_group_report
from kvtrace.format import MANIFEST, WEIGHTS
from kvtrace.run_reader import read_run

SAMPLE = Path(__file__).resolve().parents[2] / "sample_traces" / "dynamic_b2"


def _group(tmp_path: Path, q_shape: list[int] | str | None, o_shape: list[int] | None) -> Path:
    """Two ranks copied from the sample; `q_shape`/`o_shape`: their q_proj/o_proj as weights.jsonl says
    (`"fused"`: a whole qkv_proj in place of q_proj)."""
    group = tmp_path / "group"
    for rank in (0, 1):
        folder = group / f"rank-{rank}"
        shutil.copytree(SAMPLE, folder, ignore=shutil.ignore_patterns("kv_counters*", "tb_*", "profiler"))
        manifest = json.loads((folder / MANIFEST).read_text())
        manifest.update(rank=rank, world_size=2)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        weights = [json.loads(line) for line in (folder / WEIGHTS).read_text().splitlines()]
        for weight in weights:
            if weight["name"].endswith("q_proj.weight") and q_shape == "fused":  # as Phi-3's qkv_proj
                weight["name"] = weight["name"].replace("q_proj", "qkv_proj")
                weight["shape"] = [(8 + 2 * 2) * 16, 128]
            elif weight["name"].endswith("q_proj.weight") and q_shape is not None:
                weight["shape"] = q_shape
            if weight["name"].endswith("o_proj.weight") and o_shape is not None:
                weight["shape"] = o_shape
        (folder / WEIGHTS).write_text("".join(json.dumps(w) + "\n" for w in weights))
    return group


@pytest.mark.parametrize(
    ("q_shape", "o_shape", "data_parallel"),
    [
        (None, None, True),  # as recorded: [128, 128], 8 heads x 16 = hidden 128, whole
        ([64, 128], [128, 64], False),  # half the query heads on each rank
        ([64, 128], None, False),  # q_proj alone says so
        ("fused", [128, 64], False),  # q, k and v in one projection: o_proj says so
        ("fused", None, True),
        ([8192, 1], [8192, 1], True),  # packed 4-bit storage: no verdict from the weights
        ([48, 128], [128, 48], True),  # not a share of 8 heads x 16: no verdict
    ],
)
def test_sharded_attention_weights_make_a_group_tensor_parallel(tmp_path, q_shape, o_shape, data_parallel):
    sample = json.loads((SAMPLE / MANIFEST).read_text())["model"]
    assert (sample["num_attention_heads"] * sample["head_dim"], sample["hidden_size"]) == (128, 128)
    last = [e for e in read_run(SAMPLE).kv_events if e.shape][-1]  # each rank's cache, from the raw log
    rows, heads, tokens = last.shape[0], last.shape[1], last.tokens
    assert heads == sample["num_kv_heads"]  # every rank holds all KV heads

    group = build_group_report(_group(tmp_path, q_shape, o_shape))

    assert group.replicas is data_parallel
    kv = group.total.kv
    if data_parallel:  # each rank its own 2 rows
        assert (kv.batch, kv.token_rows) == (2 * rows, 2 * rows * tokens)
        assert any("data parallel" in note for note in group.notes)
    else:  # the same 2 rows on both ranks, each with a copy of the KV heads
        assert (kv.batch, kv.token_rows) == (rows, rows * tokens)
        assert any("tensor parallel, each rank a copy of the KV heads" in note for note in group.notes)
        per_rank = sample["num_layers"] * 2 * heads * sample["head_dim"] * 4  # fp32 K and V
        assert kv.bytes_per_token_measured == kv.bytes_per_token_expected == 2 * per_rank
