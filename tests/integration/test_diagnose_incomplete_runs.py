"""`kvtrace diagnose` on runs whose record is incomplete gives the reader's notes that `report` gives, and no
verdict the files cannot back: a real run of the tiny model with its weights table removed (a partial copy),
and a real run whose process was SIGKILLed inside `record()`, as the kernel's OOM killer does. A run whose
manifest or profiler trace is damaged is read with a note that names the damage, not another cause."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtrace.cli import main
from kvtrace.llama import ModelSize
from tests.integration.kvlog_math import dynamic_kv_peak
from tests.tiny import killed_mid_step_script, record_generate, weights_bytes

PROMPT, NEW_TOKENS, BATCH = 8, 8, 2
WEIGHTS_GONE = "the weights, as weights.jsonl is missing"


def _kv_peak(size: ModelSize) -> int:
    """A dynamic cache's live KV bytes at their highest (`dynamic_kv_peak`), for this file's generate()."""
    head_dim = size.hidden_size // size.num_heads
    return dynamic_kv_peak(size.num_kv_heads, head_dim, size.num_layers, BATCH, PROMPT, NEW_TOKENS)


def _record(model: torch.nn.Module, out: Path, profiler: bool) -> None:
    record_generate(model, out, BATCH, PROMPT, NEW_TOKENS, profiler=profiler)


def _run(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _json(argv: list[str]) -> Any:
    return json.loads(_run([*argv, "--json"]))


@pytest.mark.parametrize("profiler", [False, True])
def test_a_run_without_its_weights_table_gets_no_fit_verdict_against_a_budget(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path, profiler: bool
) -> None:
    # GIVEN a real run and a copy of it whose weights.jsonl, which its manifest lists, is gone
    full, copy = tmp_path / "full", tmp_path / "copy"
    _record(tiny_model, full, profiler)
    shutil.copytree(full, copy)
    (copy / "weights.jsonl").unlink()
    weights = weights_bytes(tiny_model)
    full_peak = _json(["diagnose", str(full)])["allocated_bytes"]
    if not profiler:  # the KV log's events over the weights: the arithmetic gives the peak
        assert full_peak == weights + _kv_peak(tiny_size)
    # AND a budget between the copy's figures (the weights left out) and the whole run's peak, which the
    # whole run would not fit
    budget = full_peak - weights // 2
    assert _json(["diagnose", str(full), "--budget", f"{budget}B"])["event"] == "budget"

    # WHEN the copy is diagnosed against that budget
    diagnosis = _json(["diagnose", str(copy), "--budget", f"{budget}B"])

    # THEN its peak is the run's less the weights, with the reader's note on the missing file, as the
    # report gives it
    assert diagnosis["allocated_bytes"] == full_peak - weights
    missing = f"{copy / 'weights.jsonl'} is listed in the manifest but missing: the weights are not in"
    assert [n for n in diagnosis["notes"] if n.startswith(missing)], diagnosis["notes"]
    report_notes = _json(["report", str(copy), "--no-export", "-q"])["notes"]
    assert [n for n in diagnosis["notes"] if n.startswith(missing)] == [
        n for n in report_notes if n.startswith(missing)
    ]
    # AND no fit verdict: no shortfall, no remedy that fits, the peak said to be a lower bound
    assert diagnosis["budget_crossing"]["crossed"] is False
    assert diagnosis["budget_crossing"]["headroom_bytes"] == budget - (full_peak - weights)
    assert diagnosis["shortfall_bytes"] is None
    assert [r["fits"] for r in diagnosis["remedies"]] == [None] * len(diagnosis["remedies"])
    assert diagnosis["peak_leaves_out"] == WEIGHTS_GONE
    # AND the text's verdict line says the same, with no remedy marked as fitting
    text = _run(["diagnose", str(copy), "--budget", f"{budget}B"])
    verdict = text.splitlines()[1]
    assert verdict.startswith("no OOM recorded; diagnosing the peak on cpu (")
    assert f", a lower bound: it leaves out {WEIGHTS_GONE})" in verdict
    assert verdict.endswith("budget, but whether the run fits cannot be told")
    assert "to spare" not in verdict and "fits]" not in text and ", fits" not in text
    assert "headroom at the peak (at most)" in text
    assert f"note: {missing}" in text
    # AND a budget the copy's own figures cross is crossed at that step or earlier
    small = _json(["diagnose", str(copy), "--budget", f"{(full_peak - weights) // 2}B"])
    assert small["event"] == "budget" and small["shortfall_bytes"] is None
    small_text = _run(["diagnose", str(copy), "--budget", f"{(full_peak - weights) // 2}B"])
    assert f"(or earlier: the figures leave out {WEIGHTS_GONE})" in small_text.splitlines()[1]


_KILLED = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch, kvtrace
    from kvtrace.llama import ModelSize, build_model

    model = build_model(ModelSize(*map(int, sys.argv[2:7])))
    ids = torch.randint(3, 1000, ({batch}, {prompt}), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(sys.argv[1], model=model, profiler=False):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens={new},
                       min_new_tokens={new}, do_sample=False, pad_token_id=0)
        time.sleep(0.3)  # the writer flushes every 0.1 s: the last step is on disk
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer's way: no exception, no teardown
    """
).format(batch=BATCH, prompt=PROMPT, new=NEW_TOKENS)


def test_a_run_whose_process_was_killed_is_not_called_free_of_oom(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    # GIVEN a real run of the tiny model whose process was SIGKILLed inside record(), after generate()
    run = tmp_path / "run"
    size = tiny_size
    shape = (size.hidden_size, size.intermediate_size, size.num_layers, size.num_heads, size.num_kv_heads)
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, str(run), *map(str, shape)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -9, done.stderr
    assert json.loads((run / "manifest.json").read_text())["ended"] == {"status": "running"}

    # WHEN it is diagnosed
    diagnosis = _json(["diagnose", str(run)])
    text = _run(["diagnose", str(run)])

    # THEN the peak is read up to the last flushed step: the weights and the KV at its peak (profiler=False)
    assert diagnosis["event"] == "peak"
    assert diagnosis["allocated_bytes"] == weights_bytes(tiny_model) + _kv_peak(size)
    # AND the notes say the run never finished, as the report's do
    died = "the run never finished (the process died): read up to its last flushed step"
    assert died in _json(["report", str(run), "--no-export", "-q"])["notes"]
    assert died in diagnosis["notes"]
    assert diagnosis["unfinished"] == "died"
    # AND "no OOM recorded" comes with the caveat that the process may have been killed for host memory
    verdict = text.splitlines()[1]
    assert verdict.startswith(
        "no OOM recorded, but the run never finished: its process died, perhaps killed for lack of host "
        "memory by the kernel's OOM killer, which leaves no record; diagnosing the peak up to its last "
        "flushed step on cpu ("
    ), verdict
    assert f"note: {died}" in text


def _damage_memory_events(run: Path, damaged: int | None = None) -> int:
    """Quote the Bytes of the first `damaged` [memory] events of the run's profiler trace (all when None);
    returns how many [memory] events the trace holds."""
    import gzip

    (trace,) = (run / "profiler").glob("*.pt.trace.json*")
    opened = gzip.open if trace.suffix == ".gz" else open
    with opened(trace, "rt") as file:
        data = json.load(file)
    memory = [e for e in data["traceEvents"] if e.get("name") == "[memory]"]
    for event in memory[:damaged]:
        event["args"]["Bytes"] = str(event["args"]["Bytes"])
    with opened(trace, "wt") as file:
        json.dump(data, file)
    return len(memory)


def test_a_run_whose_trace_memory_events_are_all_damaged_says_so_and_reads_the_kv_log(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    # GIVEN a real run with its profiler trace, and a copy whose trace's [memory] events all quote their
    # Bytes (the note asked "was generate() run on another thread?"), and one with 3 of them quoted (no note)
    run, damaged, partly = tmp_path / "run", tmp_path / "damaged", tmp_path / "partly"
    _record(tiny_model, run, profiler=True)
    shutil.copytree(run, damaged)
    shutil.copytree(run, partly)
    count = _damage_memory_events(damaged)
    assert count > 0
    _damage_memory_events(partly, 3)

    # WHEN both are reported and diagnosed
    report = _json(["report", str(damaged), "--no-export", "-q"])
    diagnosis = _json(["diagnose", str(damaged)])

    # THEN the note says the trace's events are damaged, how many and why, and that the figures are the KV
    # log's: the weights and the KV at its peak, as for a run recorded without the profiler
    said = (
        f"the profiler trace's [memory] events are damaged: {count:,} of {count:,} skipped ({count:,} with a "
        "non-integer Bytes): memory figures are the KV log's over the weights, as for a run recorded with "
        "profiler=False (activations and other allocations unseen)"
    )
    assert said in report["notes"] and said in diagnosis["notes"]
    assert not [n for n in report["notes"] if "another thread" in n], report["notes"]
    assert report["partial"] is True
    assert diagnosis["allocated_bytes"] == weights_bytes(tiny_model) + _kv_peak(tiny_size)
    # AND a trace with some damaged events is read, its note saying what was skipped of it
    notes = _json(["report", str(partly), "--no-export", "-q"])["notes"]
    skipped = [n for n in notes if n.startswith("the profiler trace: skipped 3 of ")]
    assert skipped and skipped[0].endswith(" events: 3 [memory] with a non-integer Bytes"), notes
    assert _json(["report", str(run), "--no-export", "-q"])["notes"] == []


def test_a_run_whose_trace_cannot_be_read_is_reported_from_its_kv_log_naming_the_trace(
    tiny_model: torch.nn.Module, tiny_size: ModelSize, tmp_path: Path
) -> None:
    # GIVEN a real run, a copy whose profiler trace was cut in half (a job killed as it wrote, a full
    # disk, an interrupted copy) and one whose trace is not JSON at all
    run, cut, garbled = tmp_path / "run", tmp_path / "cut", tmp_path / "garbled"
    _record(tiny_model, run, profiler=True)
    for copy in (cut, garbled):
        shutil.copytree(run, copy)
    (trace,) = (cut / "profiler").glob("*.pt.trace.json*")
    whole = trace.read_bytes()
    trace.write_bytes(whole[: len(whole) // 2])
    (garbled_trace,) = (garbled / "profiler").glob("*.pt.trace.json*")
    garbled_trace.write_bytes(b"garbage")

    for copy, trace_file, why in (
        (cut, trace, "truncated: the JSON ends inside traceEvents"),
        (garbled, garbled_trace, "not a Chrome trace: starts with 'g'"),
    ):
        # WHEN it is reported and diagnosed
        report = _json(["report", str(copy), "--no-export", "-q"])
        diagnosis = _json(["diagnose", str(copy)])

        # THEN its KV log and weights are read, as for a run recorded without the profiler (not the whole
        # run refused for its trace), and the note names the trace and what is wrong with it
        said = [n for n in report["notes"] if n.startswith("the profiler trace cannot be read (")]
        assert len(said) == 1 and f"({trace_file}: {why}" in said[0], report["notes"]
        assert said[0].endswith("(activations, logits and other allocations unseen)")
        assert said[0] in diagnosis["notes"]
        assert report["partial"] is True
        assert diagnosis["allocated_bytes"] == weights_bytes(tiny_model) + _kv_peak(tiny_size)

    # AND export takes the cut run with a warning naming the damage, and its runs row says where its
    # memory events come from (the KV log's: a peak without activations), as the whole run's row does not
    import pyarrow.parquet as pq

    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        assert main(["export", str(cut), str(run), "-o", str(tmp_path / "tables"), "-q"]) == 0
    warned = [line for line in err.getvalue().splitlines() if f"warning: {cut}:" in line]
    assert len(warned) == 1 and f"cannot be read: {trace.resolve()}: truncated" in warned[0], err.getvalue()
    rows = pq.read_table(tmp_path / "tables" / "runs").to_pylist()
    from_ = {Path(row["path"]).name: row["memory_events_from"] for row in rows}
    assert from_["run"] is None
    assert from_["cut"].startswith(f"kv_log (its profiler trace cannot be read: {trace.resolve()}: truncated")


def test_a_manifest_listing_names_that_cannot_be_files_of_the_run_is_read_with_a_note(
    tiny_model: torch.nn.Module, tmp_path: Path
) -> None:
    # GIVEN a real run, and a copy whose manifest's `files` also lists a name of 306 characters (report and
    # diagnose stopped at "File name too long", naming no manifest; export skipped the run), names outside
    # the run, and values that are no names
    run, copy = tmp_path / "run", tmp_path / "copy"
    _record(tiny_model, run, profiler=True)
    shutil.copytree(run, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    long_name = "x" * 300 + ".jsonl"
    extra = [
        long_name,
        "../../../../etc/passwd",
        "/etc/shadow",
        None,
        7,
        ["kv_events.jsonl"],
        ".",
        "profiler",
    ]
    manifest["files"] += extra
    (copy / "manifest.json").write_text(json.dumps(manifest))

    # WHEN it is reported, diagnosed and exported
    report = _json(["report", str(copy), "--no-export", "-q"])
    diagnosis = _json(["diagnose", str(copy)])
    exported = _export(copy, tmp_path / "copy_tables")

    # THEN one note names manifest.json and the entries (the first three, then how many more), and one the
    # folder listed as a file
    listed = (
        f"{copy / 'manifest.json'}: `files` holds 7 entries that cannot be files of the run, ignored: "
        f'"{"x" * 60}…" (306 characters): a name too long for a file; "../../../../etc/passwd": outside the '
        'run; "/etc/shadow": an absolute path; and 4 more'
    )
    folder = f"{copy / 'profiler'} is listed in the manifest as a file but is a folder"
    assert report["notes"] == [folder, listed]
    assert [n for n in diagnosis["notes"] if n in (folder, listed)] == [folder, listed]
    # AND the figures are the run's own, as the untouched run gives them
    whole = _json(["report", str(run), "--no-export", "-q"])
    assert {**report, "notes": [], "source": {}} == {**whole, "notes": [], "source": {}}
    assert diagnosis["allocated_bytes"] == _json(["diagnose", str(run)])["allocated_bytes"]
    # AND export takes it as it takes the untouched run: the same rows of each table
    assert (exported["exported"], exported["skipped"]) == (1, [])
    assert exported["rows"] == _export(run, tmp_path / "run_tables")["rows"]
    assert exported["rows"]["memory_events"] > 0


def _export(run: Path, out: Path) -> Any:
    printed = io.StringIO()
    with redirect_stdout(printed):
        assert main(["export", str(run), "-o", str(out), "--json"]) == 0
    return json.loads(printed.getvalue())


# Llama 3 of 2 layers, 2 KV heads of head_dim 32, fp32: one token of one row is 2 layers x (K, V) x 2 heads x
# 32 x 4 B of KV; the child kills itself inside layer 1 of forward CUT_STEP, after layer 0's update of it
CUT_LAYERS, CUT_KV_HEADS, CUT_HEAD_DIM, CUT_PROMPT, CUT_STEP = 2, 2, 32, 16, 11
_KILLED_MID_STEP = killed_mid_step_script(
    f"build_model(ModelSize(hidden_size=128, intermediate_size=256, num_layers={CUT_LAYERS}, num_heads=4, "
    f"num_kv_heads={CUT_KV_HEADS}, vocab_size=1000))",
    CUT_STEP,
    2,
    CUT_PROMPT,
    "max_new_tokens=20, min_new_tokens=20",
)


def test_a_run_killed_between_two_layers_updates_is_read_to_its_last_whole_step(tmp_path: Path) -> None:
    # GIVEN a real run SIGKILLed inside layer 1 of step 11: layer 0 wrote step 11's token, layer 1 did not
    run = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_STEP, str(run)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert done.returncode == -9, done.stderr
    held: dict[int, int] = {}  # the tokens each layer's last update in the raw log holds
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("shape"):
            held[event["layer"]] = event["tokens"]
    whole = CUT_PROMPT + (CUT_STEP - 1) - 1  # step s holds the prompt and s - 1 tokens: 25 at step 10
    assert held == {0: whole + 1, 1: whole}
    rows = 2
    per_token = CUT_LAYERS * 2 * CUT_KV_HEADS * CUT_HEAD_DIM * 4  # 1,024 B a row
    storage_token = rows * CUT_KV_HEADS * CUT_HEAD_DIM * 4  # a token of one K or V storage, both rows: 512 B

    # WHEN it is reported
    report = _json(["report", str(run), "--no-export", "-q"])

    # THEN the figures of the end are step 10's, the last whole one: 25 tokens in every layer
    kv = report["kv"]
    assert (kv["tokens_held"], kv["batch"], report["steps"]) == (whole, rows, CUT_STEP - 1)
    assert kv["final_bytes"] == whole * rows * per_token == 51_200
    assert kv["bytes_per_token_measured"] == kv["bytes_per_token_expected"] == per_token
    assert [(layer["layer"], layer["tokens"]) for layer in kv["per_layer"]] == [(0, whole), (1, whole)]
    # AND the KV timeline still has step 11's logged update: layer 0's new 26-token V made next to its old
    # one, its new K (the old one freed) and layer 1's two 25-token storages
    assert kv["peak_bytes"] == (2 * (whole + 1) + 3 * whole) * storage_token
    # AND the note says the last step was cut, and where
    died = (
        "the run never finished (the process died): its last step, 11, was cut between its layers' KV "
        "updates (layer 0 reached the log, layer 1 did not): tokens held, bytes per token and generated "
        "tokens are those at the end of step 10, the last whole step; the memory timeline shows what of step "
        "11 was logged"
    )
    assert died in report["notes"]

    # AND compare counts the tokens of the 10 whole steps: 1 for the prefill, then 1 a decode step
    compared = _json(["compare", str(run), str(run)])
    assert [r["generated_tokens_per_row"] for r in compared["runs"]] == [CUT_STEP - 1] * 2

    # AND diagnose, at the peak inside step 11, prices the tokens held at the end of step 10: with no budget,
    # the shortest context (the 16-token prompt and one new token, instead of the 36 the call asked for)
    # frees its 9 new tokens, 9 x 2 rows x 1,024 B
    diagnosis = _json(["diagnose", str(run)])
    assert (diagnosis["step"], diagnosis["held_step"]) == (CUT_STEP, CUT_STEP - 1)
    assert (diagnosis["batch"], diagnosis["tokens_held"]) == (rows, whole)
    (context,) = [r for r in diagnosis["remedies"] if r["kind"] == "context"]
    new = whole - CUT_PROMPT
    assert (context["setting"], context["saved_bytes"]) == (CUT_PROMPT + 1, new * rows * per_token)
    text = _run(["diagnose", str(run)])
    assert "batch x tokens held (end of step 10, the last whole one)  2 x 25" in text
    assert f"A context of 17 tokens instead of {CUT_PROMPT + 20} " in text
    assert (
        "frees 18.00 KiB of KV at this moment, its 9 new tokens' (2.00 KiB per token across the batch)"
        in text
    )
