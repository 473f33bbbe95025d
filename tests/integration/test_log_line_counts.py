"""A finished run's manifest counts the lines of weights.jsonl and memory_samples.jsonl, as it counts the KV
log's: a copy of the run cut at a line boundary (a partial copy, a file emptied) is read as one without that
log, a note naming the file and the counts, where it used to read with a lower peak (the weights) or a
tokens/s 2x off (the samples), and no note. Runs recorded before the counts read as before; compare says
what span its tokens/s used when the samples cannot time the steps; `plan --from-run` gives the reader's
cause for a run without allocator events. All on real recordings of the tiny Llama 3."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtrace.cli import main
from kvtrace.llama import ModelSize
from tests.integration.kvlog_math import dynamic_kv_peak
from tests.integration.test_json_docs import _chapter, _unnamed
from tests.tiny import killed_mid_step_script, record_generate, weights_bytes

PROMPT, NEW_TOKENS, BATCH = 8, 8, 2
ROOT = Path(__file__).resolve().parents[2]


def _kv_peak(size: ModelSize) -> int:
    """A dynamic cache's live KV bytes at their highest (`dynamic_kv_peak`), for this file's generate()."""
    head_dim = size.hidden_size // size.num_heads
    return dynamic_kv_peak(size.num_kv_heads, head_dim, size.num_layers, BATCH, PROMPT, NEW_TOKENS)


def _storages(model: torch.nn.Module) -> int:
    """Distinct parameter and buffer storages: the lines weights.jsonl lists at the start."""
    return len({t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]})


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], status: int = 0) -> tuple[str, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == status, capsys.readouterr().err
    return out.getvalue(), capsys.readouterr().err


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _forget_counts(run: Path) -> None:
    """The run as kvtrace wrote it before it counted these logs' lines."""
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["weights_lines"], manifest["memory_samples_lines"]
    (run / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def recorded(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("counts") / "run"
    record_generate(tiny_model, run, BATCH, PROMPT, NEW_TOKENS, profiler=False)
    return run


def test_a_finished_run_counts_its_weights_and_samples_lines_and_reads_unchanged(
    recorded: Path, tiny_model: torch.nn.Module, tiny_size: ModelSize, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real finished run; THEN its manifest counts the lines its logs hold
    manifest = json.loads((recorded / "manifest.json").read_text())
    weights, samples = _lines(recorded / "weights.jsonl"), _lines(recorded / "memory_samples.jsonl")
    assert manifest["weights_lines"] == len(weights) == _storages(tiny_model)
    assert manifest["memory_samples_lines"] == len(samples)
    assert _unnamed(manifest, _chapter("manifest.json")) == []  # docs/format.md names them
    steps = [json.loads(line) for line in samples if json.loads(line)["phase"] in ("prefill", "decode")]
    assert len(steps) == NEW_TOKENS  # one sample per step, besides the start's, the end's and the host's
    # AND it reads as before: the peak is the weights and the KV at its peak (profiler=False)
    report = json.loads(_cli(["report", str(recorded), "--json", "--no-export", "-q"], capsys)[0])
    assert report["peak_allocated_bytes"] == weights_bytes(tiny_model) + _kv_peak(tiny_size)
    assert report["categories_at_peak"]["weights"] == weights_bytes(tiny_model)
    assert not [n for n in report["notes"] if "damaged" in n or "tokens/s" in n]


@pytest.mark.parametrize("name", ["weights.jsonl", "memory_samples.jsonl"])
@pytest.mark.parametrize("kept_share", [0.5, 0.0], ids=["half", "emptied"])
def test_a_log_cut_at_a_line_boundary_after_the_run_is_read_as_missing_with_a_note(
    recorded: Path,
    tmp_path: Path,
    name: str,
    kept_share: float,
    tiny_model: torch.nn.Module,
    tiny_size: ModelSize,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a copy of the finished run whose log is cut at a line boundary (a partial copy), or emptied
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    path = run / name
    lines = _lines(path)
    kept = int(len(lines) * kept_share)
    path.write_text("".join(line + "\n" for line in lines[:kept]), encoding="utf-8")
    # WHEN any command reads it; THEN it reads as a run without that log (none of its lines: it read as a
    # run with fewer weights, or a tokens/s off 2x, and no note; then the whole run was refused, its KV log
    # whole), a note naming the file, the counts and what the figures lack
    counts = f"{kept} complete lines of the {len(lines)} the manifest counts"
    said = f"{path}: damaged after the run ended: {counts}, so it is read as missing: "
    report = json.loads(_cli(["report", str(run), "--json", "--no-export", "-q"], capsys)[0])
    assert [n for n in report["notes"] if n.startswith(said)], report["notes"]
    weights = 0 if name == "weights.jsonl" else weights_bytes(tiny_model)
    assert report["categories_at_peak"]["weights"] == weights
    assert report["peak_allocated_bytes"] == weights + _kv_peak(tiny_size)
    assert report["kv"]["final_bytes"] > 0
    for argv in (
        ["diagnose", str(run)],
        ["compare", str(recorded), str(run)],
        ["plan", "--from-run", str(run)],
    ):
        _out, err = _cli(argv, capsys)
        assert "Traceback" not in err and "damaged after the run ended" not in err, (argv, err)
    # AND cut mid-line after those lines, the note says the last one is cut too
    with path.open("a", encoding="utf-8") as fh:
        fh.write(lines[kept][: len(lines[kept]) // 2])
    notes = json.loads(_cli(["report", str(run), "--json", "--no-export", "-q"], capsys)[0])["notes"]
    assert [
        n for n in notes if n.startswith(f"{path}: damaged after the run ended: {counts}, the last one cut, ")
    ]
    # AND a run recorded before the counts reads as it did (no count to check the cut by)
    path.write_text("".join(line + "\n" for line in lines[:kept]), encoding="utf-8")
    _forget_counts(run)
    _cli(["report", str(run), "--json", "--no-export", "-q"], capsys)


def test_compare_says_what_span_its_tokens_per_second_used_without_the_samples(
    recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run recorded before the counts whose memory_samples.jsonl was emptied, beside the whole run
    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    _forget_counts(run)
    samples = [json.loads(line) for line in _lines(run / "memory_samples.jsonl")]
    (run / "memory_samples.jsonl").write_text("")
    manifest = json.loads((run / "manifest.json").read_text())
    # WHEN they are compared
    rows = json.loads(_cli(["compare", str(recorded), str(run), "--json"], capsys)[0])["runs"]
    # THEN the whole run is timed from its start sample to its last step's end, with no note on the span
    start = next(s["t_ns"] for s in samples if s["phase"] == "start")
    end = [s["t_ns"] for s in samples if s["phase"] in ("prefill", "decode")][-1]
    assert rows[0]["tokens_per_second"] == pytest.approx(BATCH * NEW_TOKENS / ((end - start) / 1e9))
    assert not [n for n in rows[0]["notes"] if n.startswith("tokens/s")]
    # AND the emptied one by the manifest's span, which a note names, with its length (it had none)
    span = (manifest["ended"]["t_ns"] - manifest["started_ns"]) / 1e9
    assert rows[1]["tokens_per_second"] == pytest.approx(BATCH * NEW_TOKENS / span)
    note = (
        "tokens/s: memory_samples.jsonl has no start sample, so the time is the manifest's started_ns to "
        f"ended.t_ns ({span:.3f} s), which also counts the recorder's start-up and the profiler trace's "
        "writing"
    )
    assert [n for n in rows[1]["notes"] if n.startswith(note)], rows[1]["notes"]


def _plan_notes(run: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    return list(json.loads(_cli(["plan", "--from-run", str(run), "--json"], capsys)[0])["notes"])


def test_plan_from_run_gives_the_readers_cause_for_a_run_without_allocator_events(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real run recorded with the profiler on, its trace then lost (listed in the manifest, missing)
    lost = tmp_path / "lost"
    record_generate(tiny_model, lost, BATCH, PROMPT, NEW_TOKENS, profiler=True)
    assert json.loads((lost / "manifest.json").read_text())["options"]["profile_memory"] is True
    for trace in (lost / "profiler").iterdir():
        trace.unlink()
    # AND a real run with the profiler on whose process was SIGKILLed in its third forward (no trace written)
    killed = tmp_path / "killed"
    size = tiny_size
    model = (
        f"build_model(ModelSize({size.hidden_size}, {size.intermediate_size}, {size.num_layers}, "
        f"{size.num_heads}, {size.num_kv_heads}))"
    )
    script = killed_mid_step_script(model, 3, BATCH, PROMPT, f"max_new_tokens={NEW_TOKENS}")
    done = subprocess.run(
        [sys.executable, "-c", script, str(killed)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -9, done.stderr
    # WHEN each is planned from; THEN its note gives the cause the report's notes give, not "recorded with
    # profiler=False or profile_memory=False" (neither was)
    unseen = "its activations are unseen, so the reserve stands for them"
    for run, cause, report_says in (
        (
            lost,
            "its profiler trace, listed in the manifest, is missing",
            "is listed in the manifest but missing",
        ),
        (
            killed,
            "it has no profiler trace",
            "the run has no profiler trace, so no allocator events were read",
        ),
    ):
        planned = [n for n in _plan_notes(run, capsys) if n.startswith("the run has no allocator events")]
        assert planned == [f"the run has no allocator events ({cause}): {unseen}"], planned
        out = _cli(["report", str(run), "--json", "--no-export", "-q"], capsys)[0]
        report: dict[str, Any] = json.loads(out)
        assert [n for n in report["notes"] if report_says in n], report["notes"]
