"""`diagnose`, `compare` and `sweep` end to end on small CPU runs, plus their one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import kvtrace
from analyzers.units import human_bytes
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.tiny import HEAD_DIM, tiny_size

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


def test_diagnose_a_cpu_run(sweep_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = sweep_dir / "runs" / "b2_c16_dynamic"
    assert main(["diagnose", str(run), "--json", "--budget", "1GiB"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["event"] == "peak" and data["batch"] == 2 and data["tokens_held"] == 16 + NEW_TOKENS - 1
    kinds = {r["kind"]: r for r in data["remedies"]}
    assert kinds["static_cache"]["saved_bytes"] == data["kv_peak_bytes"] - data["kv_final_bytes"]


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
    # the per-layer row is the step's end state, which need not add up to the KV at the crossing moment
    assert main(["diagnose", str(SAMPLES / "dynamic_b2"), "--budget", "40MiB"]) == 0
    out = capsys.readouterr().out
    (step,) = [line.split()[-2] for line in out.splitlines() if line.strip().startswith("at the peak: step ")]
    assert f"KV by layer (end of step {step})" in out


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
    (context,) = [r for r in data["remedies"] if r["kind"] == "context"]
    cut = prompt // 4
    assert (context["setting"], context["saved_bytes"]) == (prompt - cut, per_token * cut)
    assert f"A context of {prompt - cut} tokens instead of {prompt} " in context["sentence"]
    # AND the text says which step that count is of
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"batch x tokens held \(end of step 1\)\s+1 x {prompt}\n", out), out
