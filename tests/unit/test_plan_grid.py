"""`kvtrace plan` with comma lists of --batch and --context: every point planned as `kvtrace plan` plans it
alone, shown as one table, and an exit status of 0 only when every point fits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main

MODEL = ["--preset", "llama-3.1-8b", "--gpu-memory", "H100"]  # 131,072 positions: every context below
BATCHES, CONTEXTS = (1, 4, 16), (8192, 32768)


def _plan(capsys: Any, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["plan", *argv])
    except SystemExit as exit_:  # a flag argparse refuses, as a shell sees it
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_each_point_of_the_grid_is_the_plan_of_that_point_alone(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN three batches and two contexts of Llama 3.1 8B on an H100
    lists = ["--batch", ",".join(map(str, BATCHES)), "--context", ",".join(map(str, CONTEXTS))]
    code, out, _ = _plan(capsys, *MODEL, *lists, "--json")
    grid = json.loads(out)["grid"]

    # THEN each point, in batch-major order, is the JSON `kvtrace plan` gives for it alone
    alone = []
    for batch in BATCHES:
        for context in CONTEXTS:
            _, one, _ = _plan(capsys, *MODEL, "--batch", str(batch), "--context", str(context), "--json")
            alone.append(json.loads(one))
    assert grid == alone
    # AND the exit status is 1: batch 16 at 32,768 tokens does not fit an H100, while some points do
    fits = [point["fits"] for point in alone]
    assert code == 1 and any(fits) and not all(fits)

    # AND the table has a row per batch, a column per context, each cell the point's peak, NO where over
    code_text, text, _ = _plan(capsys, *MODEL, *lists)
    assert code_text == 1
    lines = text.splitlines()
    assert lines[2].split() == ["batch", "\\", "context", *(f"{c:,}" for c in CONTEXTS)]
    for row, batch in enumerate(BATCHES):
        points = alone[row * len(CONTEXTS) : (row + 1) * len(CONTEXTS)]
        cells = "  ".join(human_bytes(p["peak_bytes"]) + ("" if p["fits"] else " NO") for p in points)
        assert lines[3 + row].split() == [str(batch), *cells.split()]
    assert lines[-1].startswith(f"{sum(fits)} of {len(fits)} points fit")


def test_a_grid_that_fits_everywhere_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _plan(capsys, *MODEL, "--batch", "1,2", "--context", "4096")
    assert code == 0 and not any(line.endswith(" NO") for line in out.splitlines())
    assert "2 of 2 points fit" in out


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--batch", "1,x"], "argument --batch: a whole number or a comma list of them (1,4,8), not '1,x'"),
        (["--context", "8192,8192"], "argument --context: a value listed twice: '8192,8192'"),
        (["--batch", "1,2", "--engine", "vllm"], "with --engine vllm give one of each"),
        (["--batch", "1,"], None),  # "1," is 1, as sweep reads it: planned, not refused
        (["--batch", ","], "argument --batch: a whole number or a comma list of them (1,4,8), not ','"),
        (["--batch", ",".join(map(str, range(1, 22))), "--context", ",".join(map(str, range(2, 22)))],
         "--batch x --context make 420 points: at most 400 in one table"),
    ],
)  # fmt: skip
def test_a_list_it_cannot_plan_is_refused_in_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], said: str | None
) -> None:
    code, out, err = _plan(capsys, *MODEL, *argv)
    if said is None:
        assert code == 0 and err == ""
        return
    assert code == 2 and out == "" and said in err and len(err.splitlines()) == 1


def test_a_grid_refuses_a_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    code, out, err = _plan(capsys, "--from-run", str(run), "--batch", "1,2")
    assert code == 2 and out == ""
    assert "a comma list of --batch or --context plans a model, not --from-run" in err


def test_the_grid_marks_contexts_beyond_the_models_positions_and_says_its_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN Llama 3 8B, which takes 8,192 positions, at 8,192 and 32,768 tokens, no --gpu-memory
    code, out, _ = _plan(capsys, "--preset", "llama-3-8b", "--batch", "1,2", "--context", "8192,32768")
    lines = out.splitlines()
    assert code == 0  # as each point's own plan: a note, not a refusal
    # THEN the header says the GPU is the default, the column past the positions is starred and said below
    assert lines[0].endswith(", on 80.00 GiB (the default --gpu-memory)")
    assert lines[2].split()[-2:] == ["8,192", "32,768*"]
    assert lines[5].startswith("* beyond the 8,192 positions llama-3-8b takes (max_position_embeddings)")
    # AND with the batch alone listed, the default context is said on the table's title line
    _, out, _ = _plan(capsys, "--preset", "llama-3-8b", "--batch", "1,2")
    assert "context (columns, prompt + new tokens; the default, --context to change)" in out.splitlines()[1]
