"""`diagnose`, `compare` and `sweep` end to end on small CPU runs, plus their one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kvtrace.cli import main

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"
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
