"""Data parallelism on 2 gloo ranks: every rank the whole Hugging Face Llama, its own rows and prompt length
(rank 0: 2 rows of 6 + 3 tokens, rank 1: 3 rows of 8 + 3), so the ranks hold different token counts. What
the job does is what the ranks do together."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ranks_worker as worker

from analyzers.render.json import report_to_json
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.run_reader import read_run

WORLD = 2
HEAD_DIM = worker.DIM // worker.N_HEADS
GENERATED_PER_ROW = 1 + worker.DECODE_STEPS  # the prefill's token, then one per decode step


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("dp")
    out, facts_dir = root / "group", root / "facts"
    facts = worker.launch_facts("hf-dp-uneven", out, facts_dir, WORLD)
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


def test_bytes_per_token_of_ranks_holding_different_tokens_divide_their_token_rows(group, capsys):
    out, facts = group
    whole_model = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4  # every rank holds all KV heads
    token_rows = sum(f["rows"] * f["tokens"] for f in facts)  # 2 x 9 + 3 x 11
    # WHEN the group is reported
    assert main(["report", str(out), "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN the JSON holds together: the final bytes are the token-rows held at one rank's bytes per token
    assert kv["final_bytes"] == sum(f["kv_bytes"] for f in facts) == whole_model * token_rows
    assert kv["token_rows"] == token_rows == 51
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == whole_model == 512
    assert (kv["tokens_held"], kv["batch"]) == (11, 5)  # the fullest rank's tokens, every rank's rows
    # AND the text says the same token-rows, not 11 tokens x 5 rows (which would be 27.50 KiB, not 25.50)
    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "final 25.50 KiB" in text
    assert "bytes per token: measured 512.0 (51 tokens over 5 rows, up to 11 a row), arithmetic 512" in text


def test_build_report_on_a_group_gives_the_group_and_shows_it_in_a_notebook(group, capsys):
    out, facts = group
    whole_model = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4  # 512 bytes per token, each rank
    # WHEN the notebook API reads the group
    source, report = build_report(out)
    # THEN its report is the group's: both ranks' devices and every rank's KV (2 x 9 + 3 x 11 token-rows) ...
    assert report.source_kind == "run_group" and report.path == str(out)
    assert [d.device for d in report.devices] == ["rank0/cpu", "rank1/cpu"]
    assert report.kv.final_bytes == sum(f["kv_bytes"] for f in facts) == whole_model * 51 == 26112
    assert report.group is not None and [r.rank for r in report.group.ranks] == [0, 1]
    # ... the figures and notes `kvtrace report --json` gives for the group, and the rank to look at's source
    assert main(["report", str(out), "--json", "--no-export"]) == 0
    cli = json.loads(capsys.readouterr().out)
    mine = report_to_json(report)
    assert (mine["kv"], mine["devices"][0]["peak_allocated_bytes"]) == (
        cli["kv"],
        cli["devices"][0]["peak_allocated_bytes"],
    )
    assert report.notes == cli["notes"] and any("every rank holds all KV heads" in n for n in report.notes)
    assert source.path == str(out / f"rank-{cli['focus']['rank']}")
    # AND the cell shows the group: the ranks side by side (rank 0: 9.00 KiB, rank 1: 16.50 KiB), then the sum
    html = report._repr_html_()
    assert f"<code>{out}</code> (run group, world size 2)" in html
    assert "<tr><td>0</td><td>ok</td><td>cpu</td>" in html and "<td>9.00 KiB</td>" in html
    assert "<tr><td>1</td><td>ok</td><td>cpu</td>" in html and "<td>16.50 KiB</td>" in html
    assert f"look at rank {cli['focus']['rank']}: it {cli['focus']['reason']}" in html
    assert "KV summed over ranks" in html and "<tr><td>final</td><td>25.50 KiB</td></tr>" in html
    assert "every rank holds all KV heads" in html
    assert html.count("<svg") == 2  # a timeline per rank


def test_a_single_rank_keeps_its_tokens_times_rows(group, capsys):
    out, facts = group
    rows, tokens = facts[1]["rows"], facts[1]["tokens"]
    assert main(["report", str(out / "rank-1"), "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert (kv["tokens_held"], kv["batch"], kv["token_rows"]) == (tokens, rows, tokens * rows) == (11, 3, 33)
    assert main(["report", str(out / "rank-1")]) == 0
    assert "measured 512.0 (11 tokens x 3 rows), arithmetic 512" in capsys.readouterr().out


def test_caches_of_different_ranks_are_not_matched_by_id(tmp_path, capsys):
    # GIVEN rank 0 fills two caches in turn (the first dropped: ids 1 and 2), rank 1 one (id 1)
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    facts = worker.launch_facts("hf-dp-two-caches", out, facts_dir, WORLD)
    whole_model = worker.N_LAYERS * 2 * worker.N_KV_HEADS * HEAD_DIM * 4
    assert [f["kv_bytes"] for f in facts] == [whole_model * f["rows"] * f["tokens"] for f in facts]
    # WHEN the group is reported
    assert main(["report", str(out), "--json"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # THEN one row per layer: each rank's held cache, summed (rank 0's cache 2 with rank 1's cache 1)
    layer_bytes = [sum(f["kv_bytes"] for f in facts) // (2 * worker.N_LAYERS)] * worker.N_LAYERS
    assert [row["layer"] for row in kv["per_layer"]] == list(range(worker.N_LAYERS))
    assert [row["k_bytes"] for row in kv["per_layer"]] == layer_bytes
    assert [row["v_bytes"] for row in kv["per_layer"]] == layer_bytes
    assert [row["cache"] for row in kv["per_layer"]] == [None] * worker.N_LAYERS  # no id names both
    assert kv["final_bytes"] == sum(f["kv_bytes"] for f in facts) == 2 * sum(layer_bytes) == 13824
    assert (kv["main_cache"], kv["caches"]) == (None, [])
    # AND the text says the same: no table of caches, no cache column
    assert main(["report", str(out), "--no-export"]) == 0
    text = capsys.readouterr().out
    assert "caches (" not in text
    assert "    layer      K bytes      V bytes  tokens/row  evicted (all rows)" in text
    assert f"        0 {layer_bytes[0]:>12,} {layer_bytes[0]:>12,} " in text


def test_the_rank_killed_first_is_the_one_to_look_at(tmp_path, capsys):
    # GIVEN rank 1 is SIGKILLed inside record(), and rank 0 a second later (as a launcher stops it)
    out, facts_dir = tmp_path / "group", tmp_path / "facts"
    statuses = worker.launch("hf-dp-kill-first", out, facts_dir, WORLD)
    assert statuses == [-9, -9], (facts_dir / "rank-0.log").read_text()[-3000:]
    killed = [int((facts_dir / f"rank-{r}.killed").read_text()) for r in range(WORLD)]
    assert killed[1] < killed[0]
    # neither has an end time; their logs stop in the order they died
    runs = [read_run(out / f"rank-{r}") for r in range(WORLD)]
    assert [run.manifest["ended"] for run in runs] == [{"status": "running"}] * WORLD
    last = [max(run.kv_events[-1].t_ns, run.memory_samples[-1]["t_ns"]) for run in runs]
    assert last[1] < killed[1] < last[0] < killed[0]
    # WHEN the group is reported and diagnosed, THEN the rank that died first is the one named
    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["failed_ranks"] == [0, 1]
    assert data["focus"] == {"rank": 1, "reason": "never finished (the process died)"}
    assert main(["diagnose", str(out)]) == 0
    first_line = capsys.readouterr().out.splitlines()[0]
    assert "diagnosing rank 1, which never finished (the process died)" in first_line
