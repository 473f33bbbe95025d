"""`kvtrace query`'s table on real recordings: a long value is cut with a visible "…", the last line says how
many were and how to see them whole, and `--max-width` widens the cells (0: no limit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvtrace.cli import main
from tests.tiny import record_generate, tiny_size

DEFAULT_WIDTH = 60  # the table's documented default (kvtrace query --help)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """One real recording (profiler on) copied under two names alike in their first 60 characters."""
    from kvtrace.llama import build_model

    folder = tmp_path_factory.mktemp("runs")
    recorded = folder / "recorded"
    record_generate(build_model(tiny_size(2)), recorded, batch=2, prompt=8, new_tokens=4)
    stem = "llama3-tiny-batch2-prompt8-new4-dynamic-cache-profiler-on-random-weights-seed-"
    names = []
    for seed in (0, 1):
        run = folder / "fleet" / f"{stem}{seed}"
        shutil.copytree(recorded, run)
        names.append(run.as_posix())
    assert len(stem) > DEFAULT_WIDTH and names[0][:DEFAULT_WIDTH] == names[1][:DEFAULT_WIDTH]
    return folder / "fleet", names


def _table(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    capsys.readouterr()
    assert main(["query", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def test_cut_values_are_marked_counted_and_shown_whole_on_request(
    two_runs: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    fleet, names = two_runs
    sql = "SELECT run_id, count(*) AS kv_events FROM kv_events GROUP BY 1 ORDER BY 1"

    # WHEN the two runs are listed in the default table
    lines = _table(capsys, str(fleet), sql)
    # THEN both run_ids are cut to 60 characters ending in "…", and the last line says so and how to see them
    rows = lines[2:-1]
    assert [row[:DEFAULT_WIDTH] for row in rows] == [names[0][: DEFAULT_WIDTH - 1] + "…"] * 2
    assert (
        lines[-1] == "(2 rows; 2 values cut at 60 characters: --max-width 0, --json or --csv show them whole)"
    )

    # WHEN asked for whole values THEN each run_id is there whole, and nothing is said to be cut
    for width in ("0", str(max(len(n) for n in names))):
        lines = _table(capsys, str(fleet), sql, "--max-width", width)
        assert [row.split()[0] for row in lines[2:-1]] == names
        assert lines[-1] == "(2 rows)"


def test_a_manifest_is_shown_whole_with_no_limit(
    two_runs: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    fleet, names = two_runs
    manifest = json.loads((Path(names[0]) / "manifest.json").read_text())
    whole = json.dumps(manifest, sort_keys=True)  # as the runs table stores it
    assert len(whole) > 1000
    sql = f"SELECT manifest_json FROM runs WHERE run_id = '{names[0]}'"

    lines = _table(capsys, str(fleet), sql, "--max-width", "0")
    assert lines[2:] == [whole, "(1 row)"]

    lines = _table(capsys, str(fleet), sql, "--max-width", "20")
    assert lines[2:] == [
        whole[:19] + "…",
        "(1 row; 1 value cut at 20 characters: --max-width 0, --json or --csv show them whole)",
    ]


@pytest.mark.parametrize("width", ["-1", "1", "wide"])
def test_a_width_that_shows_nothing_is_refused_in_one_line(
    width: str, two_runs: tuple[Path, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    fleet, _ = two_runs
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["query", str(fleet), "SELECT 1", "--max-width", width])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--max-width" in err and "Traceback" not in err
