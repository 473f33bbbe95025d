"""Every page kvtrace writes with plotly works offline and keeps its data on the machine: no plot offers
plotly.js's "Share chart..." button (which posts the figure to cloud.plotly.com) or the logo linking there."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from kvtrace.cli import main
from tests.plotly_figures import page_configs

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"


def _group_of_two(folder: Path) -> Path:
    """Two copies of a sample run, marked ranks 0 and 1 of a world of 2: a run group."""
    for rank in (0, 1):
        run = folder / f"rank-{rank}"
        shutil.copytree(SAMPLES / "dynamic_b2", run)
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "rank": rank, "world_size": 2}))
    return folder


def _written(kind: str, tmp_path: Path) -> Path:
    page = tmp_path / f"{kind}.html"
    argv = {
        "report": ["report", str(SAMPLES / "dynamic_b2"), "--no-export"],
        "engine": ["report", str(SAMPLES / "vllm_preempt"), "--no-export"],
        "ranks": ["report", str(_group_of_two(tmp_path / "group")), "--no-export"],
        "compare": ["compare", str(SAMPLES / "dynamic_b2"), str(SAMPLES / "static_b2")],
    }[kind]
    quiet = ["-q"] if kind != "compare" else []  # compare prints its table, and has no -q
    assert main([*argv, "-o", str(page), *quiet]) == 0
    return page


@pytest.mark.parametrize(
    ("kind", "plot"),
    [
        ("report", "kvtrace-timeline"),
        ("engine", "kvtrace-engine-pool"),
        ("ranks", "kvtrace-ranks"),
        ("compare", "kvtrace-compare"),
    ],
)
def test_no_plot_on_a_written_page_can_send_its_data_away(kind: str, plot: str, tmp_path: Path) -> None:
    # GIVEN a page kvtrace writes, drawing its plot (the sweep's page: test_diagnose_compare_sweep)
    page = _written(kind, tmp_path).read_text()
    assert f'id="{plot}"' in page
    # THEN every plot it draws turns plotly.js's cloud button and logo off (both on by default), and the
    # page names no plotly server to post to
    configs = page_configs(page)
    assert configs and len(configs) == page.count("Plotly.newPlot(")
    for config in configs:
        assert config["showSendToCloud"] is False and config["displaylogo"] is False
        assert "plotlyServerURL" not in config


def test_the_report_in_a_browser_has_no_share_button(tmp_path: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed: the HTML was not opened in a browser")
    # GIVEN the HTML report of a run WHEN a browser draws it
    page = _written("report", tmp_path)
    done = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # THEN its plots have their modebar, without the share button or the plotly logo
    assert 'data-title="Download plot as a PNG"' in done.stdout
    assert 'data-title="Share chart' not in done.stdout and 'data-title="Produced with' not in done.stdout
