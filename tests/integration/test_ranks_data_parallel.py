"""Data parallelism on 2 gloo ranks: every rank the whole Hugging Face Llama, its own rows and prompt length
(rank 0: 2 rows of 6 + 3 tokens, rank 1: 3 rows of 8 + 3), so the ranks hold different token counts. What
the job does is what the ranks do together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_worker as worker

from kvtrace.cli import main
from kvtrace.format import read_run

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
GENERATED_PER_ROW = 1 + worker.DECODE_STEPS  # the prefill's token, then one per decode step


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("dp")
    out, facts_dir = root / "group", root / "facts"
    statuses = worker.launch("hf-dp-uneven", out, facts_dir, WORLD)
    logs = "".join((facts_dir / f"rank-{r}.log").read_text()[-3000:] for r in range(WORLD))
    assert statuses == [0] * WORLD, logs
    facts = [json.loads((facts_dir / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    assert [(f["rows"], f["tokens"]) for f in facts] == [(2, 9), (3, 11)]
    return out, facts


def _seconds(run: Path) -> float:
    """A rank's generation time from its raw samples: the start sample to the last step's end."""
    samples = read_run(run).memory_samples
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    return (end - start) / 1e9


def test_compare_counts_every_data_parallel_ranks_tokens_per_second(group, capsys):
    out, facts = group
    # WHEN the group is compared (beside its own rank 0)
    assert main(["compare", str(out), str(out / "rank-0"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    # THEN its tokens/s is the ranks' sum, each rank's rows x generated tokens over its own time
    rates = [f["rows"] * GENERATED_PER_ROW / _seconds(out / f"rank-{f['rank']}") for f in facts]
    assert row["tokens_per_second"] == pytest.approx(sum(rates))
    assert row["tokens_per_second"] > max(rates)  # not rank 0's alone
    # AND per row, the same over the 5 rows of both ranks; each row generated 4 tokens
    assert row["batch"] == 5
    assert row["tokens_per_second_per_row"] == pytest.approx(sum(rates) / 5)
    assert row["generated_tokens_per_row"] == GENERATED_PER_ROW == 4
