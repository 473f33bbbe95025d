"""`diagnose`, `compare` and `sweep` end to end on small CPU runs, plus their one-line errors."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import kvtrace
from analyzers.render.sweep import sweep_to_text
from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model, llama3_config
from kvtrace.run_reader import read_run
from tests.hf_versions import needs_fp8_cache
from tests.plotly_figures import page_figure
from tests.terminal import stderr_on_a_terminal
from tests.tiny import HEAD_DIM, cache_arg, tiny_size

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"
SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
NEW_TOKENS = 3


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 2x1 sweep on the tiny model; its two run directories also feed `compare`."""
    out = tmp_path_factory.mktemp("sweep")
    argv = ["sweep", "--size", "tiny", "--batch", "1,2", "--context", "16", "--cache", "dynamic"]
    status = main([*argv, "--new-tokens", str(NEW_TOKENS), "--budget", "1GiB", "--out", str(out)])
    assert status == 0
    return out


def _sweep_stderr(out: Path, *flags: str, on_a_terminal: bool) -> str:
    """What a one-point sweep writes on stderr: a pipe, or a terminal (a pseudo-terminal here)."""
    argv = [sys.executable, "-m", "kvtrace.cli", "sweep", "--batch", "1", "--context", "8", "--new-tokens"]
    argv += ["2", "--cache", "dynamic", "--device", "cpu", "--overwrite", "--out", str(out), *flags]
    env = {**os.environ, "PYTHONPATH": str(SAMPLES.parent)}
    if not on_a_terminal:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stderr
    status, said = stderr_on_a_terminal(argv, env)
    assert status == 0
    return said


def test_sweep_draws_its_progress_bar_on_a_terminal_only(tmp_path: Path) -> None:
    # WHEN a sweep's stderr is a file or a pipe THEN no bar is in it (its \r-redrawn lines used to be)
    assert _sweep_stderr(tmp_path / "piped", on_a_terminal=False) == ""
    # WHEN it is a terminal THEN the bar is drawn, as report and export draw theirs; -q leaves it out
    assert "sweep: 100%" in _sweep_stderr(tmp_path / "terminal", on_a_terminal=True)
    assert _sweep_stderr(tmp_path / "quiet", "-q", on_a_terminal=True) == ""


def _chromium_check(html_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: the HTML was not opened in a browser")
    done = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            html_path.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console, console
    assert "plot-container" in done.stdout and "scatterlayer" in done.stdout
    # a page that may hold private traces offers no button posting them to cloud.plotly.com, no logo link
    assert 'data-title="Share chart' not in done.stdout and 'data-title="Produced with' not in done.stdout


def test_sweep_writes_json_and_html(sweep_dir: Path) -> None:
    data = json.loads((sweep_dir / "sweep.json").read_text())
    rows = data["rows"]
    assert [(r["batch"], r["context"], r["cache"]) for r in rows] == [(1, 16, "dynamic"), (2, 16, "dynamic")]
    for row in rows:
        assert row["status"] == "ok" and row["fits_budget"] is True and row["tokens_per_second"] > 0
        # tiny: 4 layers x K,V x 2 KV heads x head_dim 16 x fp32 = 1024 B per position per sequence;
        # a dynamic cache holds context + new_tokens - 1 positions at the end.
        assert row["kv_final_bytes"] == 1024 * row["batch"] * (16 + NEW_TOKENS - 1)
        assert row["peak_bytes"] > row["kv_peak_bytes"] >= row["kv_final_bytes"]
    _chromium_check(sweep_dir / "sweep.html")


def test_export_of_a_sweep_folder_takes_its_runs_and_names_nothing_left_out(
    sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a sweep's folder: sweep.json, sweep.html and a run a point under runs/
    # WHEN it is exported
    assert main(["export", str(sweep_dir), "-o", str(tmp_path / "tables"), "-q", "--json"]) == 0
    said = capsys.readouterr()
    summary = json.loads(said.out)

    # THEN every point's run is exported, and sweep.json, its own table, is not named as a file left out
    # (the note said "name the file to export it", and exporting it named is refused: not a trace)
    assert summary["rows"]["runs"] == 2
    assert summary["left_out"] == [] and "left out" not in said.err, said.err


def _reddish(color: str) -> bool:
    """Whether a "#rrggbb" or named color reads as red: its red channel above its green and blue together."""
    if not color.startswith("#"):
        return color.lower() in ("red", "crimson", "darkred", "firebrick", "tomato", "orangered")
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return r > g + b


def test_sweep_overwrite_replaces_the_old_points_and_a_cut_sweep_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a 2-point sweep (batch 1 and 2) in OUT
    out = tmp_path / "sweep"
    argv = ["sweep", "--size", "tiny", "--context", "8", "--cache", "dynamic", "--new-tokens", "2", "-q"]
    assert main([*argv, "--batch", "1,2", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["b1_c8_dynamic", "b2_c8_dynamic"]
    # WHEN it is replaced by a 1-point sweep (batch 1) with --overwrite
    assert main([*argv, "--batch", "1", "--out", str(out), "--overwrite"]) == 0
    # THEN OUT holds that point's run only, as sweep.json lists it, and an export of OUT finds one run
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["batch"], r["context"]) for r in rows] == [(1, 8)]
    assert [p.name for p in (out / "runs").iterdir()] == ["b1_c8_dynamic"]
    capsys.readouterr()
    assert main(["export", str(out), "-o", str(tmp_path / "tables"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"]["runs"] == 1
    # AND a sweep cut short (its point runs there, no sweep.json yet) is refused without --overwrite
    (out / "sweep.json").unlink()
    assert main([*argv, "--batch", "2", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in (out / "runs").iterdir()] == ["b1_c8_dynamic"]


def test_sweep_overwrite_keeps_the_users_runs_and_never_follows_a_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a 1-point sweep in OUT, beside which the user keeps runs of their own in OUT/runs/: a run copied
    # in, one that a `kvtrace demo` would name, and a symbolic link to a run kept outside OUT
    out, precious = tmp_path / "sweep", tmp_path / "precious"
    argv = ["sweep", "--size", "tiny", "--context", "8", "--cache", "dynamic", "--new-tokens", "2", "-q"]
    assert main([*argv, "--batch", "1", "--out", str(out)]) == 0
    point = out / "runs" / "b1_c8_dynamic"
    shutil.copytree(point, precious / "baseline")
    shutil.copytree(point, out / "runs" / "mine")
    shutil.copytree(point, out / "runs" / "demo-dynamic")
    (out / "runs" / "baseline").symlink_to(precious / "baseline", target_is_directory=True)
    kept = {p: p.read_bytes() for p in [*precious.rglob("*"), *(out / "runs").rglob("*")] if p.is_file()}
    kept = {p: b for p, b in kept.items() if point not in p.parents}
    # WHEN the sweep is replaced with --overwrite
    assert main([*argv, "--batch", "2", "--out", str(out), "--overwrite"]) == 0
    # THEN only the old point's run went; the user's runs and the linked one are byte for byte as they were
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "b2_c8_dynamic",
        "baseline",
        "demo-dynamic",
        "mine",
    ]
    assert {p: p.read_bytes() for p in kept} == kept
    # AND a folder holding only a user's runs under runs/ (no sweep ever wrote there) is no sweep to refuse
    project = tmp_path / "project"
    shutil.copytree(point.parent.parent / "runs" / "mine", project / "runs" / "demo-dynamic")
    assert main([*argv, "--batch", "1", "--out", str(project)]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in (project / "runs").iterdir()) == ["b1_c8_dynamic", "demo-dynamic"]


def test_sweep_points_tell_their_prompts_unpadded_so_static_plans_price_no_padded_prefill(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sweep's points, each one generate() call on unpadded prompts (a mask of ones)
    for name in ("b1_c16_dynamic", "b2_c16_dynamic"):
        run = sweep_dir / "runs" / name
        # THEN the recorder read the call's mask, still held at the block's end: not padded
        # (and what the call asked for: its 16-token prompt and NEW_TOKENS more)
        asked = {"prompt_end": 16, "max_length": 16 + NEW_TOKENS, "max_new_tokens": NEW_TOKENS}
        assert read_run(run).manifest["generate_calls"] == [{"step": 1, "padded": False, **asked}]
        # AND a static plan from the point says nothing of unknown padding (it would price a padded prefill)
        capsys.readouterr()
        assert main(["plan", "--from-run", str(run), "--cache", "static", "--json"]) == 0
        notes = json.loads(capsys.readouterr().out)["notes"]
        assert not any("were padded" in note for note in notes), notes


def test_sweep_page_tells_the_kv_line_from_the_budget(sweep_dir: Path) -> None:
    # GIVEN a sweep recorded with a budget: the page draws the budget as a red dashed line
    traces, layout = page_figure((sweep_dir / "sweep.html").read_text(), "kvtrace-sweep")
    (budget,) = [shape for shape in layout["shapes"] if shape.get("line", {}).get("dash") == "dash"]
    assert _reddish(budget["line"]["color"])
    # THEN each cache's peak, KV and tokens/s share one color, and it is no red the budget could pass for
    by_cache: dict[str, set[str]] = {}
    for trace in traces:
        color = (trace.get("line") or trace.get("marker") or {}).get("color")
        assert color is not None, f"{trace['name']}: drawn in plotly's default colors, whose second is red"
        by_cache.setdefault(trace["name"].split(":")[0], set()).add(color)
    assert set(by_cache) == {"dynamic"}
    for colors in by_cache.values():
        (color,) = colors
        assert not _reddish(color), color


def test_sweep_says_its_tokens_per_second_count_every_batch_row(sweep_dir: Path) -> None:
    # GIVEN the sweep's batch-2 point: 2 rows, each generating NEW_TOKENS tokens, timed from the recorder's
    # "start" memory sample to the sample at the end of its last step (compare's wall time)
    data = json.loads((sweep_dir / "sweep.json").read_text())
    two = next(row for row in data["rows"] if row["batch"] == 2)
    lines = (Path(two["run"]) / "memory_samples.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    # THEN its tokens/s is both rows' tokens over that time: twice the rate of one row
    assert two["tokens_per_second"] == pytest.approx(2 * NEW_TOKENS / ((end - start) / 1e9), rel=1e-9)
    # AND the table says so, as compare's "tokens/s, all rows" row does: a bare "tokens/s" read as one row's
    # rate, which compare's "tokens/s per row" gives at half this point's figure
    table = sweep_to_text(data["rows"], data["budget_bytes"], "sweep").splitlines()
    assert "tokens/s (all rows)" in table[1]
    page = (sweep_dir / "sweep.html").read_text()
    assert "<th>tokens/s (all rows)</th>" in page
    # AND the page's bars name it too, and their hover gives the rate as the table does, not 17 digits
    traces, layout = page_figure(page, "kvtrace-sweep")
    (bars,) = [trace for trace in traces if trace["type"] == "bar"]
    assert bars["name"] == "dynamic: tokens/s (all rows)"
    assert bars["hovertemplate"] == "%{y:,.1f} tokens/s (all rows)"
    assert layout["yaxis3"]["title"]["text"] == "tokens/s (all rows)"


def test_compare_two_runs(sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = sorted(str(p) for p in (sweep_dir / "runs").iterdir())
    out = tmp_path / "compare.html"
    assert main(["compare", *runs, "-o", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    one, two = data["runs"]
    assert two["kv_final_bytes"] == 2 * one["kv_final_bytes"]
    # one KV point per step (prefill + NEW_TOKENS - 1 decodes); a dynamic cache reallocates as it grows
    assert len(one["kv_by_step"]) == NEW_TOKENS and one["churn"] > 1
    _chromium_check(out)


def test_compare_tells_apart_a_run_given_twice(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN one run named twice, the second time as ./RUN (a shell's completion, or a script's list)
    run = SAMPLES / "dynamic_b2"
    again = f"{run.parent}/./{run.name}"
    # WHEN they are compared
    assert main(["compare", str(run), again, "--json"]) == 0
    first, second = json.loads(capsys.readouterr().out)["runs"]
    # THEN each column has a label of its own (both were the same path, a table of two identical headings
    # and a JSON a script keyed by label lost one run of)
    assert (first["label"], second["label"]) == (str(run), f"{run}#2")
    assert first["kv_final_bytes"] == second["kv_final_bytes"] == 70 * 1024  # 4 x 2 x 2 x 16 x 35 x 2 x 4 B
    assert main(["compare", str(run), again]) == 0
    heading = capsys.readouterr().out.splitlines()[0]
    assert heading.split() == [str(run), f"{run}#2"]


def test_compare_says_unknown_where_an_input_cannot_tell(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a kvtrace run, a snapshot with nothing marking KV, and a trace taken without profile_memory
    run = Path(__file__).resolve().parents[2] / "sample_traces" / "dynamic_b2"
    snapshot = REAL / "oom_snapshot.pickle"
    trace = REAL.parent / "chrome" / "rank0.json.gz"
    if not snapshot.exists() or not trace.exists():
        pytest.skip("the real traces are not here")
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    # WHEN they are compared
    assert main(["compare", str(run), str(snapshot), str(trace), "--json"]) == 0
    mine, snap, bare = json.loads(capsys.readouterr().out)["runs"]
    # THEN the run's figures are its report's, and what the others cannot tell is null, not 0 B
    kv = report["kv"]
    assert (mine["kv_peak_bytes"], mine["kv_final_bytes"]) == (kv["peak_bytes"], kv["final_bytes"])
    assert mine["evicted_tokens"] == 0 and mine["peak_bytes"] == report["devices"][0]["peak_allocated_bytes"]
    assert snap["peak_bytes"] > 0
    for row in (snap, bare):
        assert [row[key] for key in ("kv_peak_bytes", "kv_final_bytes", "evicted_tokens")] == [None] * 3
    assert bare["peak_bytes"] is None
    assert main(["compare", str(run), str(trace)]) == 0
    table = capsys.readouterr().out.splitlines()
    kv_peak = next(line for line in table if line.startswith("KV peak"))
    assert kv_peak.split()[-1] == "-" and "0 B" not in kv_peak
    # AND a snapshot, which has no steps, says "-" for them, not "0 x -"; the run its steps and rows
    assert main(["compare", str(run), str(snapshot)]) == 0
    steps = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("steps x batch"))
    assert steps.split()[-4:] == [str(report["steps"]), "x", str(kv["batch"]), "-"], steps


def test_compare_says_reserved_but_unallocated_as_report_does(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a snapshot, whose segments give what was reserved at the peak
    snapshot = REAL / "oom_snapshot.pickle"
    if not snapshot.exists():
        pytest.skip("the real traces are not here")
    assert main(["report", str(snapshot), "--json", "--no-export"]) == 0
    (device,) = json.loads(capsys.readouterr().out)["devices"]
    unallocated = human_bytes(device["reserved_at_peak_bytes"] - device["peak_allocated_bytes"])
    assert main(["report", str(snapshot), "--no-export", "-q"]) == 0
    report_text = capsys.readouterr().out
    # WHEN it is compared with itself
    assert main(["compare", str(snapshot), str(snapshot)]) == 0
    table = capsys.readouterr().out
    # THEN the table names reserved - allocated as the report does, with the same figure
    assert f"{unallocated} reserved but unallocated at the peak" in report_text
    row = next(line for line in table.splitlines() if line.startswith("reserved but unallocated at the peak"))
    assert row.split("  ")[-1].strip() == unallocated
    assert "fragmentation" not in table


def _remedies(run: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, list[dict[str, object]]]:
    assert main(["diagnose", str(run), "--json"]) == 0
    out: dict[str, list[dict[str, object]]] = {}
    for remedy in json.loads(capsys.readouterr().out)["remedies"]:
        out.setdefault(remedy["kind"], []).append(remedy)
    return out


@needs_fp8_cache
def test_diagnose_does_not_propose_what_the_run_already_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fast = ["--size", "tiny", "--batch", "2", "--no-profiler", "--no-report"]
    # GIVEN an fp8 cache run: its tokens and batch come from the fp8 data (`q.0`), its KV is 8-bit
    fp8 = tmp_path / "fp8"
    assert main(["demo", *fast, "--cache", "fp8", "--new-tokens", "6", "--out", str(fp8)]) == 0
    capsys.readouterr()
    assert main(["report", str(fp8), "--json", "--no-export"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    layers, kv_heads, head_dim = 4, 2, 16  # the demo's tiny shape
    assert (kv["batch"], kv["bytes_per_token_expected"]) == (2, layers * 2 * kv_heads * head_dim * 1)
    assert kv["tokens_held"] == max(layer["tokens"] for layer in kv["per_layer"]) > 0
    remedies = _remedies(fp8, capsys)
    assert [r["setting"] for r in remedies["quantized_kv"]] == [4]  # no fp8 for an fp8 cache
    assert all(r["saved_bytes"] is not None for kind in ("batch", "context") for r in remedies[kind])
    # AND a sliding cache that already evicts: no "shorter context", and a smaller window priced per token
    # (a window longer than the 20-token prompt: the peak is the window's, not the prompt's at prefill)
    slide = tmp_path / "slide"
    argv = ["demo", *fast, "--cache", "sliding", "--window", "32", "--new-tokens", "20", "--out", str(slide)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["report", str(slide), "--json", "--no-export"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    # a token of window costs the arithmetic (the storages keep a spare slot the measured figure counts)
    per_token = kv["bytes_per_token_expected"] * kv["batch"]
    assert kv["bytes_per_token_measured"] > kv["bytes_per_token_expected"]
    remedies = _remedies(slide, capsys)
    (context,) = remedies["context"]
    assert context["saved_bytes"] == 0 and "already keeps a sliding window" in str(context["sentence"])
    (window,) = remedies["sliding_window"]
    held = kv["tokens_held"]
    assert window["saved_bytes"] == round(per_token * (held - int(window["setting"])))  # type: ignore[call-overload]
    # AND a static cache is not told to become static
    assert main(["diagnose", str(SAMPLES / "static_b2")]) == 0
    assert "the cache already writes in place" in capsys.readouterr().out


@needs_fp8_cache
def test_diagnose_prices_a_static_cache_and_a_window_at_the_model_dtype_after_an_fp8_cache(
    tiny_model: LlamaForCausalLM, prompt_batch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a float32 model's run with transformers' fp8 QuantizedCache, recorded without the profiler (the
    # moment diagnosed is then the KV peak)
    new = 5
    with torch.no_grad(), kvtrace.record(tmp_path / "run", model=tiny_model, profiler=False):
        tiny_model.generate(
            input_ids=prompt_batch.input_ids,
            attention_mask=prompt_batch.attention_mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache_implementation="quantized",
            cache_config={"backend": "fp8"},
        )
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    layers, kv_heads, rows, prompt = 2, 2, prompt_batch.rows, prompt_batch.prompt_len
    held = prompt + new - 1
    fp8_token = kv_heads * HEAD_DIM * rows  # one layer's K (or V), one position, every row: 1 byte each
    final = layers * 2 * (fp8_token * held + 4)  # and a float32 scale per K and per V
    moment = final + 2 * fp8_token * (held - 1)  # the last layer's old K and V, held until its update returns
    assert (d["tokens_held"], d["kv_final_bytes"], d["kv_bytes"]) == (held, final, moment)
    remedies = {r["kind"]: r for r in d["remedies"]}
    # THEN a StaticCache of these tokens is priced at float32 (4 bytes an element, K and V, every layer):
    # it adds memory, and is not counted as a saving (the transient it removes was all it was priced at)
    static = layers * 2 * fp8_token * 4 * held
    assert remedies["static_cache"]["saved_bytes"] == 0
    sentence = remedies["static_cache"]["sentence"]
    assert f"float32, not quantized: {human_bytes(static)} for these {held} tokens" in sentence
    assert f"adds {human_bytes(static - moment)}" in sentence
    # AND the sliding window (QuantizedCache takes no sliding layers) is a float32 cache: the window a
    # shorter context proposes (a quarter fewer tokens), each layer holding it, the prompt held whole by
    # every layer until its first decode step, while one makes its new window
    window = held - held // 4
    layer_token = 2 * fp8_token * 4
    window_held = layers * window * layer_token
    window_peak = (layers * max(prompt, window) + window) * layer_token
    assert remedies["sliding_window"]["setting"] == window
    assert remedies["sliding_window"]["saved_bytes"] == max(moment - window_peak, 0)
    sentence = remedies["sliding_window"]["sentence"]
    assert f"holds {human_bytes(window_held)} of KV" in sentence
    assert f"{human_bytes(window_peak)} at its peak" in sentence
    assert "keeps KV at the model's float32" in sentence


def test_diagnose_a_cpu_run(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = sweep_dir / "runs" / "b2_c16_dynamic"
    assert main(["diagnose", str(run), "--json", "--budget", "1GiB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["event"] == "peak" and data["batch"] == 2 and data["tokens_held"] == 16 + NEW_TOKENS - 1
    kinds = {r["kind"]: r for r in data["remedies"]}
    # the peak is a decode step's end, holding the final KV, which a static cache holds from its first
    # update: it lowers nothing (the torch.cat copy at the KV peak is not at the run's peak); recorded with
    # a static cache the tiny sweep point peaked 36 B higher
    assert data["step_phase"] == "decode" and data["kv_bytes"] == data["kv_final_bytes"]
    assert kinds["static_cache"]["saved_bytes"] == 0
    assert "would not lower the peak" in kinds["static_cache"]["sentence"]


def test_diagnose_prices_a_smaller_batch_by_its_whole_peak(
    sweep_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the sweep's batch 2 and batch 1 runs (tiny, 16-token prompt), their peaks as recorded, and the
    # weights they hold (every parameter and buffer storage of the tiny model)
    def peak(name: str) -> int:
        assert main(["report", str(sweep_dir / "runs" / name), "--json", "--no-export", "-q"]) == 0
        return int(json.loads(capsys.readouterr().out)["peak_allocated_bytes"])

    two, one = peak("b2_c16_dynamic"), peak("b1_c16_dynamic")
    model = build_model("tiny")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.parameters()}
    storages.update({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.buffers()})
    weights = sum(storages.values())
    per_row = (two - weights) / 2  # KV, activations and logits beyond the weights, a row's share

    def batch_remedy(budget: int) -> dict:
        run = str(sweep_dir / "runs" / "b2_c16_dynamic")
        assert main(["diagnose", run, "--json", "--budget", f"{budget}B"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert (data["allocated_bytes"], data["shortfall_bytes"]) == (two, two - budget)
        (remedy,) = [r for r in data["remedies"] if r["kind"] == "batch"]
        return {**remedy, "kv_row": data["kv_bytes"] / 2}

    # WHEN batch 2 is diagnosed under a budget batch 1 fits exactly as recorded
    fitting = batch_remedy(one)
    # THEN batch 1 is proposed: a row's KV is far less than the shortfall (the KV alone said "Even batch 1
    # does not fit"), but with the activations that follow the rows (the logits, as long at batch 2 as a
    # vector over the vocabulary) it frees exactly what the recording shows
    assert fitting["kv_row"] < two - one <= per_row
    assert (fitting["setting"], fitting["fits"]) == (1, True)
    assert fitting["saved_bytes"] == two - one
    assert fitting["sentence"].startswith("Batch 1 instead of 2 frees ")
    # AND under a budget even that share cannot cover, batch 1 is said not to fit, and it does not
    tight = (two + weights) // 2 - 1
    assert one > tight
    short = batch_remedy(tight)
    assert (short["setting"], short["fits"]) == (None, False)
    assert two - one <= short["saved_bytes"] < round(per_row)  # at most: the vocabulary's vectors stay
    assert short["sentence"].startswith("Even batch 1 does not fit: were all of the ")


@pytest.mark.parametrize(
    "argv",
    [
        ["diagnose", "/nonexistent/run"],
        ["diagnose", str(REAL / "oom_snapshot.pickle"), "--budget=-5GiB"],
        ["compare", "/nonexistent/a", "/nonexistent/b"],
        ["sweep", "--preset", "llama-9-unknown", "--out", "/tmp/kvtrace-never"],
        ["sweep", "--batch", "-1", "--out", "/tmp/kvtrace-never"],
        ["sweep", "--cache", "bogus", "--out", "/tmp/kvtrace-never"],
        ["sweep", "--budget=-1GiB", "--out", "/tmp/kvtrace-never"],
    ],
)
def test_bad_input_is_one_line_and_status_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(r"kvtrace \w+: error: ", err), err


def test_bad_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--no-such-flag"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("kvtrace sweep: error:")


def _sweep(out: Path, *argv: str) -> dict:
    assert main(["sweep", "--size", "tiny", "--new-tokens", str(NEW_TOKENS), "--out", str(out), *argv]) == 0
    return json.loads((out / "sweep.json").read_text())


def test_every_sweep_point_equals_a_standalone_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a grid whose later points follow a point with a longer static cache (b1 c32 before b2 c16)
    grid = _sweep(tmp_path / "grid", "--batch", "1,2", "--context", "16,32", "--cache", "static")
    table = capsys.readouterr().out
    # WHEN the same point runs alone
    alone = _sweep(tmp_path / "alone", "--batch", "2", "--context", "16", "--cache", "static")["rows"][0]
    point = next(r for r in grid["rows"] if (r["batch"], r["context"]) == (2, 16))
    # THEN its KV figures are the standalone run's, and both are the arithmetic: a static cache holds
    # context + new tokens - 1 positions of 1024 B (tiny: 4 layers x K,V x 2 KV heads x 16 x fp32) per row
    for row in grid["rows"]:
        assert row["kv_final_bytes"] == 1024 * row["batch"] * (row["context"] + NEW_TOKENS - 1)
    kv_figures = ("kv_final_bytes", "kv_peak_bytes")
    assert [point[key] for key in kv_figures] == [alone[key] for key in kv_figures]
    # AND the table is printed in the terminal with headings for people, and no budget column without one
    assert "KV at the end" in table and "prompt tokens" in table and "fits" not in table
    assert f"{human_bytes(point['kv_final_bytes'])}" in table
    page = (tmp_path / "grid" / "sweep.html").read_text()
    assert "fits" not in page and "kv_final_bytes" not in page
    # KV has an axis of its own (plotly's secondary y), both titled in binary units
    assert '"yaxis2"' in page and "KV cache (KiB)" in page and "peak allocated (MiB)" in page
    # with round ticks of its own (not the left axis' grid lines re-labelled: 68, 137, 205...)
    right = page[page.index('"yaxis2"') :][:600]
    assert '"tickmode":"auto"' in right and '"showgrid":false' in right


def test_sweep_budget_column_says_where_a_point_runs_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a budget between the weights (tiny: a 128256 x 128 fp32 tied embedding and 4 small layers,
    # 65.5 MiB) and the run's peak
    data = _sweep(tmp_path, "--batch", "1", "--context", "16", "--cache", "dynamic", "--gpu-memory", "66MiB")
    row = data["rows"][0]
    assert data["budget_bytes"] == 66 * 2**20 and row["fits_budget"] is False
    assert row["runs_out_at"]["step"] >= 1 and row["runs_out_at"]["request_bytes"] > 0
    assert "runs out at step" in capsys.readouterr().out


def test_diagnose_says_which_moment_its_per_layer_kv_is(capsys: pytest.CaptureFixture[str]) -> None:
    # the per-layer row is what each layer held at the moment diagnosed: it adds up to the KV then
    assert main(["diagnose", str(SAMPLES / "dynamic_b2"), "--budget", "40MiB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sum(row["kv_bytes"] for row in data["top_layers"]) == data["kv_bytes"] > 0
    assert main(["diagnose", str(SAMPLES / "dynamic_b2"), "--budget", "40MiB"]) == 0
    out = capsys.readouterr().out
    assert "at the peak: KV by layer " in out and "end of step" not in out.split("KV by layer")[1]


def _rounding_down_clock(start_ns: int) -> Callable[[], int]:
    """Unix-epoch ns about 1 ms apart, each one a time whose float µs (t_ns / 1000.0, 0.25 µs apart at
    this magnitude) times 1000 falls below it: diagnose once turned its moment back into ns that way, and
    put it before the event that opens the step it peaks in. Thread-safe (the memory sampler reads it)."""
    calls = itertools.count(1)

    def clock() -> int:
        t_ns = start_ns + next(calls) * 1_000_000
        while not t_ns > (t_ns / 1000.0) * 1000.0:
            t_ns += 1
        return t_ns

    return clock


def test_diagnose_names_the_step_its_peak_is_in_and_that_moments_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a sliding-window cache recorded without the profiler, on a clock whose every reading rounds
    # down through float µs: its KV peaks at the first update of step 2, where layer 0 makes its window-sized
    # K and V (one clock reading, the step's first) while every layer still holds the prompt
    layers, kv_heads, prompt, window, new_tokens = 4, 2, 32, 8, 3
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama3_config(tiny_size(layers, kv_heads), sliding_window=window)).eval()
    ids = torch.randint(3, 1000, (2, prompt), generator=torch.Generator().manual_seed(4))
    run = tmp_path / "run"
    clock = _rounding_down_clock(1_796_155_851_931_111_279)
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, clock=clock):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )

    # the peak from the raw log: storages live from their first event to their `freed`
    events = read_run(run).kv_events
    live: dict[int, tuple[int, int]] = {}
    peak = (0, -1, -1)  # (bytes, step, t_ns)
    at_peak: dict[int, int] = {}
    for event in events:
        if event.event == "freed":
            live.pop(event.addr, None)
        elif event.addr and event.addr not in live and event.event != "written":
            live[event.addr] = (event.storage_bytes, event.layer)
        total = sum(nbytes for nbytes, _ in live.values())
        if total > peak[0]:
            peak = (total, event.step, event.t_ns)
            at_peak = {}
            for nbytes, layer in live.values():
                at_peak[layer] = at_peak.get(layer, 0) + nbytes
    kv_bytes, step, t_ns = peak
    row_token = kv_heads * HEAD_DIM * 4  # one K (or V) position of one row, fp32
    # every layer's K and V of the 2 x 32-token prompt, and layer 0's new K and V of the window
    assert kv_bytes == layers * 2 * 2 * prompt * row_token + 2 * 2 * window * row_token
    assert step == 2 and t_ns == min(e.t_ns for e in events if e.step == step)
    assert t_ns > (t_ns / 1000.0) * 1000.0  # the rounding this test is about

    # WHEN it is diagnosed
    assert main(["diagnose", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    # THEN the step named is the one the peak is in, and its layers are those of that moment
    assert (data["event"], data["kv_bytes"], data["step"], data["step_phase"]) == (
        "peak",
        kv_bytes,
        2,
        "decode",
    )
    assert {row["layer"]: row["kv_bytes"] for row in data["top_layers"]} == at_peak
    assert sum(at_peak.values()) == kv_bytes
    assert at_peak[0] == 2 * 2 * (prompt + window) * row_token


def test_diagnose_prices_remedies_with_the_tokens_held_at_its_moment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose peak is its prefill (a long prompt's activations, few new tokens): the cache then
    # holds the prompt, and the run ends holding prompt + new tokens - 1
    layers, kv_heads, prompt, new_tokens = 4, 2, 32, 4
    model = build_model(tiny_size(layers, kv_heads))
    ids = torch.randint(3, 1000, (1, prompt), generator=torch.Generator().manual_seed(3))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    per_token = layers * 2 * kv_heads * HEAD_DIM * 4  # bytes per position and row, fp32

    # WHEN it is diagnosed
    assert main(["diagnose", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    # THEN the moment is the prefill, and its tokens are the prompt's, not the final count
    assert (data["step"], data["step_phase"]) == (1, "prefill")
    assert (data["batch"], data["tokens_held"]) == (1, prompt)
    # AND fewer new tokens free nothing there: the prefill comes before the first (before, "A context of 25
    # tokens instead of 33", the prompt's tokens less a quarter, below the 32-token prompt); the run's context
    # is plan's, prompt + new tokens
    (context,) = [r for r in data["remedies"] if r["kind"] == "context"]
    assert (context["setting"], context["saved_bytes"]) == (None, 0)
    said = f"any context from {prompt + 1} (the prompt and one new token) to the run's {prompt + new_tokens} "
    assert said in context["sentence"]
    # AND a shorter prompt is priced at the prefill's KV of a prompt token, and said to be the user's input
    (shorter,) = [r for r in data["remedies"] if r["kind"] == "prompt"]
    assert f"{human_bytes(per_token)} of KV across the batch" in shorter["sentence"]
    assert "The prompt is your input, not a generate() setting" in shorter["sentence"]
    # AND the text says which step that count is of
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"batch x tokens held \(end of step 1\)\s+1 x {prompt}\n", out), out


# A dynamic fp32 cache of 4 rows, a 16-token prompt and 40 new tokens (55 held), over a budget of the
# weights and 150,000 B; and what transformers' QuantizedCache at its defaults would hold of the same tokens:
# the prompt quantized (half a byte an element, an fp32 scale and zero-point per 64 elements), the 39 tokens
# after it in fp32 until residual_length=128 are due.
Q_LAYERS, Q_KV_HEADS, Q_BATCH, Q_PROMPT, Q_NEW = 4, 2, 4, 16, 40
Q_HELD = Q_PROMPT + Q_NEW - 1
Q_ELEMENTS = Q_LAYERS * 2 * Q_KV_HEADS * HEAD_DIM * Q_BATCH  # per position, every row
Q_QUANTIZED = Q_PROMPT * Q_ELEMENTS // 2 + Q_PROMPT * Q_ELEMENTS // 64 * 2 * 4
Q_RESIDUAL = (Q_HELD - Q_PROMPT) * Q_ELEMENTS * 4


def _record_over_budget(run: Path, cache: object = None) -> None:
    model = build_model(tiny_size(Q_LAYERS, Q_KV_HEADS))
    ids = torch.randint(3, 1000, (Q_BATCH, Q_PROMPT), generator=torch.Generator().manual_seed(5))
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    extra = {} if cache is None else cache_arg(cache(model))  # type: ignore[operator]
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, gpu_memory=weights + 150_000):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=Q_NEW,
            min_new_tokens=Q_NEW,
            do_sample=False,
            **extra,
        )


def test_diagnose_int4_remedy_counts_the_full_precision_residual(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the dynamic cache run over its budget
    _record_over_budget(tmp_path / "run")

    # WHEN it is diagnosed
    assert main(["diagnose", str(tmp_path / "run"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    # THEN the int4 remedy is what a QuantizedCache holds of the same 55 tokens, against what the dynamic
    # cache holds of them (its transient copy stays: a quantized cache's updates make larger ones)
    cache = Q_ELEMENTS * 4 * Q_HELD
    peak = cache + Q_ELEMENTS // (2 * Q_LAYERS) * 4 * (Q_HELD - 1)  # a layer's K copied one token longer
    assert (data["kv_bytes"], data["tokens_held"], data["shortfall_bytes"]) == (peak, Q_HELD, peak - 150_000)
    (int4,) = [r for r in data["remedies"] if r["kind"] == "quantized_kv" and r["setting"] == 4]
    assert int4["saved_bytes"] == cache - Q_QUANTIZED - Q_RESIDUAL == 55_296
    assert int4["fits"] is False
    held = f"{Q_PROMPT} in int4, the {Q_HELD - Q_PROMPT} after the prompt at full precision"
    assert held in int4["sentence"] and "residual_length=128" in int4["sentence"]


def test_a_quanto_cache_holds_what_the_int4_remedy_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the same run with a real QuantizedCache (quanto backend, transformers' defaults)
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache

    _record_over_budget(tmp_path / "run", lambda model: QuantizedCache("quanto", model.config))
    # WHEN it is reported
    assert main(["report", str(tmp_path / "run"), "--json", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)
    # THEN it holds what diagnose's int4 remedy counts, and still crosses the budget
    assert report["kv"]["final_bytes"] == Q_QUANTIZED + Q_RESIDUAL and report["budget"]["crossed"] is True


def test_diagnose_of_a_quanto_run_offers_no_int4_and_prices_fp8_from_what_it_stores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the run with a real int4 QuantizedCache (quanto), whose last KV data is its float32 residual
    pytest.importorskip("optimum.quanto")
    from transformers import QuantizedCache

    _record_over_budget(tmp_path / "quanto", lambda model: QuantizedCache("quanto", model.config))
    # WHEN it is diagnosed
    assert main(["diagnose", str(tmp_path / "quanto"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # THEN int4, the kind it already uses, is not offered
    quantized = {r["setting"]: r for r in data["remedies"] if r["kind"] == "quantized_kv"}
    assert set(quantized) == {8}
    # AND fp8 (a byte a value, every token) is priced against what the int4 cache stores: its prompt packed
    # in int4 with its scales, the tokens after it in float32; not as if all of it were 32-bit
    stored, fp8 = Q_QUANTIZED + Q_RESIDUAL, Q_HELD * Q_ELEMENTS
    assert quantized[8]["saved_bytes"] == stored - fp8
    assert f"instead of the {human_bytes(stored)} this int4 cache stores" in quantized[8]["sentence"]
    # AND a StaticCache keeps the model's float32: it adds memory
    (static,) = [r for r in data["remedies"] if r["kind"] == "static_cache"]
    assert static["saved_bytes"] == 0 and "float32, not quantized" in static["sentence"]

    # AND re-recorded with the fp8 backend, the cache ends holding that byte a value (and a float32 scale
    # per layer's K and V)
    _record_over_budget(tmp_path / "fp8", lambda model: QuantizedCache("fp8", model.config))
    assert main(["report", str(tmp_path / "fp8"), "--json", "--no-export"]) == 0
    assert json.loads(capsys.readouterr().out)["kv"]["final_bytes"] == fp8 + Q_LAYERS * 2 * 4


def _kv_peak_of(run: Path) -> int:
    """The KV log's peak, replayed from the raw file: a storage is live from its first event to `freed`."""
    live: dict[int, int] = {}
    peak = 0
    for event in read_run(run).kv_events:
        if event.event == "freed":
            live.pop(event.addr, None)
        elif event.addr and event.addr not in live and event.event != "written":
            live[event.addr] = event.storage_bytes
        peak = max(peak, sum(live.values()))
    return peak


def test_diagnose_prices_a_beam_search_batch_in_prompts_and_offers_fewer_beams(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN beam search over 2 prompts with num_beams=3 (6 cache rows), over a budget: weights + 100,000 B
    prompts, beams = 2, 3
    model = build_model(tiny_size(4, 2))
    ids = torch.randint(3, 1000, (prompts, 10), generator=torch.Generator().manual_seed(6))
    weights = sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False, gpu_memory=weights + 100_000):
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            num_beams=beams,
            do_sample=False,
        )
    kv = _kv_peak_of(run)
    need = kv - 100_000  # a run without the profiler allocates the weights and the KV

    # WHEN it is diagnosed
    assert main(["diagnose", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)

    # THEN the batch is counted in prompts, each keeping its 3 beams, and fewer beams is a remedy of its own
    assert (data["kv_bytes"], data["shortfall_bytes"], data["batch"], data["beams"]) == (kv, need, 6, 3)
    remedies = {r["kind"]: r for r in data["remedies"]}
    batch_target = math.floor(prompts * (kv - need) / kv)
    beams_target = math.floor(beams * (kv - need) / kv)
    assert (batch_target, beams_target) == (1, 2)
    batch, fewer = remedies["batch"], remedies["beams"]
    assert (batch["setting"], batch["saved_bytes"], batch["fits"]) == (1, round(kv / prompts), True)
    assert batch["sentence"].startswith("Batch 1 instead of 2 (3 beams each) frees ")
    assert (fewer["setting"], fewer["saved_bytes"], fewer["fits"]) == (2, round(kv / beams), True)
    assert fewer["sentence"].startswith("num_beams=2 instead of 3 (batch 2) frees ")
    assert main(["diagnose", str(run)]) == 0
    assert "6 x 21 (2 prompts x 3 beams)" in capsys.readouterr().out

    # AND a log that does not say how many beams (as kvtrace wrote it before) is priced in rows, named beams
    log = run / "kv_events.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert (
        sum('"reason":"beams:3"' in line for line in lines) == 4 * 2
    )  # the first reorder: every layer's K, V
    log.write_text("".join(line.replace('"reason":"beams:3"', '"reason":""') for line in lines))
    assert main(["diagnose", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["beams"] is None and "beams" not in {r["kind"] for r in data["remedies"]}
    (rows,) = [r for r in data["remedies"] if r["kind"] == "batch"]
    assert "These 6 cache rows are beam search's (prompts x num_beams)" in rows["sentence"]


def test_diagnose_of_a_recorded_moment_without_kv_says_none_is_held_not_to_record_with_kvtrace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a kvtrace run whose peak is a 1 MiB scratch buffer freed before generate() makes any KV
    model = build_model(tiny_size(2))
    ids = torch.randint(3, 1000, (1, 6), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model):
        scratch = torch.ones(1 << 20, dtype=torch.uint8)
        del scratch
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0
        )
    # WHEN it is diagnosed
    assert main(["diagnose", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    # THEN the moment holds no KV, and the remedies priced on the KV say that, not that the input lacks a
    # KV geometry that only a kvtrace recording would have: it is one
    assert data["event"] == "peak" and data["kv_bytes"] == 0
    unpriced = {r["kind"]: r["sentence"] for r in data["remedies"] if r["saved_bytes"] is None}
    assert {"batch", "context", "sliding_window", "quantized_kv"} <= set(unpriced)
    for kind in ("batch", "context", "sliding_window", "quantized_kv"):
        assert "no KV cache is held at this moment" in unpriced[kind], unpriced[kind]
    assert not any("record" in sentence and "kvtrace" in sentence for sentence in unpriced.values())


def test_compare_and_report_say_one_runs_kv_churn_alike(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN a run whose KV churn (allocated over the run / final) is no round figure
    run = SAMPLES / "dynamic_b2"
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    churn = kv["allocated_bytes_total"] / kv["final_bytes"]
    # WHEN the text report and compare are read
    assert main(["report", str(run), "--no-export"]) == 0
    report = capsys.readouterr().out
    assert main(["compare", str(run), str(run)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KV churn"))
    # THEN both give the same figure, to two decimals (the report said one: 3.5x beside compare's 3.45x)
    assert f"= {churn:.2f}x its final size" in report
    assert row.split()[-2:] == [f"{churn:.2f}x"] * 2
