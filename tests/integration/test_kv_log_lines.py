"""KV log lines the reader cannot take as written, in a real run's log: a line whose `event` is no kind the
format knows is skipped and a storage smaller than its own tensor is read at the least it can hold, each
with a note naming the file and the count (in `--json` too), exit 0; a log of unknown events only is
refused in one line. And the rule behind the second holds on every line kvtrace writes.

Each case records a real tiny Llama 3 (dynamic cache, no profiler) and changes a copy of its KV log. Every
figure is arithmetic: layers x (K, V) x kv_heads x head_dim x tokens x rows x 4 bytes (float32).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from kvtrace.llama import build_model
from kvtrace.run_reader import read_run
from tests.cli_json import report_json
from tests.tiny import HEAD_DIM, record_generate, tiny_size

LAYERS, KV_HEADS, ROWS, PROMPT, NEW_TOKENS = 2, 2, 2, 5, 4
HELD = PROMPT + NEW_TOKENS - 1  # tokens per row at the end: the last token generated is not written back
ONE_TENSOR = KV_HEADS * HEAD_DIM * HELD * ROWS * 4  # one layer's K (or V) at the end
SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "uint8": 1, "int8": 1}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("kv_lines") / "run"
    record_generate(build_model(tiny_size(LAYERS, KV_HEADS)), run, ROWS, PROMPT, NEW_TOKENS, profiler=False)
    return run


def _lines(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]


def _copy_with(recorded: Path, tmp_path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    lines = _lines(run)
    edit(lines)
    (run / "kv_events.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def _last_growth(lines: list[dict[str, Any]], layer: int, kv: str) -> dict[str, Any]:
    """The line of the storage that holds `layer`'s K or V at the end: its last step's torch.cat growth."""
    return [e for e in lines if e["event"] == "grown" and e["layer"] == layer and e["kv"] == kv][-1]


def test_a_line_of_an_unknown_event_is_skipped_and_named_in_a_note(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the log's last growths of layer 1 renamed to events no kvtrace writes (a typo, a newer kind)
    def rename(lines: list[dict[str, Any]]) -> None:
        _last_growth(lines, 1, "k")["event"] = "growed"
        _last_growth(lines, 1, "v")["event"] = "spilled"

    run = _copy_with(recorded, tmp_path, rename)
    total = len(_lines(run))

    # WHEN it is reported, as JSON and as text
    report = report_json(run, capsys)
    assert main(["report", str(run), "--no-export"]) == 0
    text = capsys.readouterr().out

    # THEN both lines are skipped (layer 1's storages at the end are in no line left), and a note says so
    assert report["kv"]["final_bytes"] == (LAYERS - 1) * 2 * ONE_TENSOR
    note = (
        f"{run / 'kv_events.jsonl'}: skipped 2 of {total} lines whose event is not one this kvtrace knows "
        "('growed' on 1 line, 'spilled' on 1 line)"
    )
    assert [n for n in report["notes"] if n.startswith(note)], report["notes"]
    assert note in text


def test_a_log_of_unknown_events_only_is_refused_in_one_line(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def rename_all(lines: list[dict[str, Any]]) -> None:
        for line in lines:
            line["event"] = "teleported"

    run = _copy_with(recorded, tmp_path, rename_all)
    assert main(["report", str(run), "--no-export"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{run / 'kv_events.jsonl'}: none of its {len(_lines(run))} lines is a KV event" in err
    assert "'teleported'" in err


def test_a_storage_smaller_than_its_tensor_is_read_at_the_tensor_size_with_a_note(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the storage layer 0's K ends in, logged as half its size (plausible, and wrong: its tensor is
    # [rows, kv_heads, tokens, head_dim] float32, fresh from torch.cat)
    def halve(lines: list[dict[str, Any]]) -> None:
        line = _last_growth(lines, 0, "k")
        assert line["shape"] == [ROWS, KV_HEADS, HELD, HEAD_DIM] and line["view_offset"] == 0
        line["storage_bytes"] = ONE_TENSOR // 2

    run = _copy_with(recorded, tmp_path, halve)

    # WHEN it is reported
    report = report_json(run, capsys)

    # THEN the storage counts at its tensor's size, and a note names the file and the line count
    assert report["kv"]["final_bytes"] == LAYERS * 2 * ONE_TENSOR
    assert report["kv"]["per_layer"][0]["k_bytes"] == ONE_TENSOR
    note = f"{run / 'kv_events.jsonl'}: 1 line gives a storage_bytes smaller than the tensor it describes"
    assert [n for n in report["notes"] if n.startswith(note)], report["notes"]


def _runs() -> list[Path]:
    return sorted(p.parent for p in SAMPLES.glob("*/kv_events.jsonl"))


@pytest.mark.parametrize("sample", [None, *_runs()], ids=lambda p: "recorded" if p is None else p.name)
def test_no_storage_kvtrace_logs_is_smaller_than_its_tensor(recorded: Path, sample: Path | None) -> None:
    # Views (sliding windows), static caches, vLLM's pool views: their storage may be larger, never smaller
    run = recorded if sample is None else sample
    lines = _lines(run)  # a vLLM run refused before its pool was made has none
    checked = 0
    for line in lines:
        if line["event"] == "freed" or not line["addr"] or not line.get("shape"):
            continue
        elements = 1
        for size in line["shape"]:
            elements *= size
        assert line["storage_bytes"] >= line["view_offset"] + elements * ITEMSIZE[line["dtype"]], line
        checked += 1
    assert checked or not lines
    read = read_run(run)
    assert read.short_kv_storages == 0 and read.unknown_kv_events == {}
