"""What the commands say of the real files in shared/real_traces that hold no kvtrace run (a walkthrough's
findings): a folder of a trace beside snapshot pickles, a snapshot's unpriceable KV remedies, which size a
report counts, and a snapshot handed to `plan --from-run`.

Expected texts are built here from the files' names and the commands' own `--json` figures (the text must
say what the JSON says), never from figures typed in.
"""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from analyzers.units import human_bytes
from kvtrace.cli import main

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces"
SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"real traces folder {REAL} is absent")

TRACE = REAL / "chrome" / "worker0.1623143089861.pt.trace.json.gz"  # V100 ResNet-50, [memory] events
SMALL_TRACE = REAL / "chrome" / "rank-34.Jul_15_10_52_41.1074.pt.trace.json.gz"  # sorts before TRACE
SNAPSHOTS = [REAL / "snapshots" / name for name in ("oom_snapshot.pickle", "mem_snapshot.pickle")]


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _json(*argv: str) -> Any:
    code, out, err = _cli(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def _folder(tmp_path: Path, *files: Path) -> Path:
    folder = tmp_path / "d"
    folder.mkdir()
    for file in files:
        shutil.copy(file, folder / file.name)
    return folder


def _how_to_read(folder: Path) -> str:
    return (
        "A report reads one input: name a snapshot to read it, or "
        f"`kvtrace export {folder} -o DIR` to read every input in the folder"
    )


@pytest.mark.parametrize("command", ["report", "diagnose", "compare"])
def test_a_trace_beside_snapshots_names_the_snapshots_not_read(tmp_path: Path, command: str) -> None:
    # GIVEN a folder of one real profiler trace and two real snapshot pickles
    folder = _folder(tmp_path, TRACE, *SNAPSHOTS)
    names = ", ".join(sorted(snapshot.name for snapshot in SNAPSHOTS))
    note = (
        f"{folder} holds one profiler trace and {len(SNAPSHOTS)} snapshot pickles: read the trace, "
        f"{TRACE.name}; not read: {names}. {_how_to_read(folder)}"
    )
    # WHEN it is read as one input (compare: beside a snapshot)
    other = [str(SNAPSHOTS[1])] if command == "compare" else []
    data = _json(command, str(folder), *other)
    # THEN the notes name the snapshots it did not read and how to read them (it read the trace, no word)
    notes = data["runs"][0]["notes"] if command == "compare" else data["notes"]
    assert note in notes
    code, out, err = _cli(command, str(folder), *other)
    assert code == 0, err
    assert note in out
    if command == "report":
        # AND `kvtrace export`, which the note names, does read every input in the folder
        summary = _json("export", str(folder), "-o", str(tmp_path / "out"), "-q")
        assert (summary["inputs"], summary["exported"]) == (1 + len(SNAPSHOTS), 1 + len(SNAPSHOTS))


def test_two_traces_beside_a_snapshot_name_the_snapshot_too(tmp_path: Path) -> None:
    # GIVEN two real traces (the last by name is read, as before) and a snapshot beside them
    folder = _folder(tmp_path, SMALL_TRACE, TRACE, SNAPSHOTS[0])
    data = _json("report", str(folder), "-q", "--no-export")
    # THEN the traces' note stands and the snapshot is named as not read
    assert any(note.startswith(f"{folder} holds the profiler traces of ") for note in data["notes"])
    also = f"{folder} also holds 1 snapshot pickle, not read: {SNAPSHOTS[0].name}. {_how_to_read(folder)}"
    assert also in data["notes"]


KV_REMEDY_NAMES = {
    "batch": "smaller batch",
    "context": "shorter context",
    "sliding_window": "sliding window",
    "static_cache": "static cache",
    "quantized_kv": "quantized KV",
    "offloading": "offloading",
}


def test_a_snapshot_without_kv_figures_folds_its_kv_remedies_into_one_line() -> None:
    # GIVEN a real snapshot that marks no KV (the report's KV measured from "none")
    snapshot = REAL / "snapshots" / "memory_snapshot.pickle"
    assert _json("report", str(snapshot), "-q", "--no-export")["kv"]["measured_from"] == "none"
    # WHEN it is diagnosed
    data = _json("diagnose", str(snapshot))
    code, text, err = _cli("diagnose", str(snapshot))
    assert code == 0, err
    # THEN the JSON keeps every remedy for scripts, the KV ones unpriced, and says the input has no KV figures
    assert data["kv_figures"] is False
    unpriced = [r for r in data["remedies"] if r["kind"] in KV_REMEDY_NAMES]
    assert [r["kind"] for r in unpriced] == list(KV_REMEDY_NAMES)
    assert all(r["saved_bytes"] is None and r["fits"] is None for r in unpriced)
    priced = [r for r in data["remedies"] if r["kind"] not in KV_REMEDY_NAMES]
    assert [r["kind"] for r in priced] == ["expandable_segments"] and priced[0]["saved_bytes"] > 0
    # AND the text ranks the priced remedies as before, then one line for the six it cannot price
    lines = text.splitlines()
    start = lines.index("remedies, ranked by what they buy on this run:")
    listed = [f"  {rank}. [{r['kind']}] {r['sentence']}" for rank, r in enumerate(priced, 1)]
    folded = (
        f"  KV remedies ({', '.join(KV_REMEDY_NAMES[r['kind']] for r in unpriced)}): cannot be priced: "
        "this input has no KV figures; record the run with kvtrace.record() for its KV cache, batch and "
        "tokens held"
    )
    assert lines[start + 1 : start + 2 + len(priced)] == [*listed, folded]
    assert not any(f"[{kind}]" in text for kind in KV_REMEDY_NAMES)


def test_a_recorded_run_keeps_its_kv_remedies_listed() -> None:
    # GIVEN a real recorded run (a KV log): its KV remedies are its own lines, as before
    run = SAMPLES / "dynamic_b2"
    data = _json("diagnose", str(run))
    code, text, err = _cli("diagnose", str(run))
    assert code == 0, err
    assert data["kv_figures"] is True
    assert "KV remedies (" not in text
    for rank, remedy in enumerate(data["remedies"], 1):
        assert f"  {rank}. [{remedy['kind']}" in text


BASIS = {
    "requested": "requested sizes, as memory_viz's timeline counts them",
    "cuda": "the allocator's block sizes, as memory_allocated() counts them",
    "cpu": "sizes as the allocator reported them",
}


def _said(device: dict[str, Any]) -> str:
    if device["size_basis"] == "requested":
        return BASIS["requested"]
    return BASIS["cuda" if device["device"].startswith("cuda") else "cpu"]


@pytest.mark.parametrize(
    "path",
    [REAL / "snapshots" / "memory_forward_bf16_128.pickle", TRACE],
    ids=["snapshot", "chrome-trace"],
)
def test_the_report_says_which_sizes_it_counts(tmp_path: Path, path: Path) -> None:
    # GIVEN a real snapshot (requested sizes) or a real GPU trace (the allocator's sizes)
    data = _json("report", str(path), "-q", "--no-export")
    code, text, err = _cli("report", str(path), "-q", "--no-export")
    assert code == 0, err
    # THEN each device line says the basis its JSON's `size_basis` names, once, after its figures
    for device in data["devices"]:
        cap = f" of {human_bytes(device['capacity_bytes'])}" if device["capacity_bytes"] else ""
        line = (
            f"  {device['device']}: peak {human_bytes(device['peak_allocated_bytes'])}{cap}, final "
            f"{human_bytes(device['final_allocated_bytes'])}, {device['alloc_events']:,} allocs / "
            f"{device['free_events']:,} frees ({_said(device)})"
        )
        assert line in text.splitlines()
    # AND the HTML summary gives it beside each device's peak
    page = tmp_path / "page.html"
    code, _, err = _cli("report", str(path), "-q", "--no-export", "-o", str(page))
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    for device in data["devices"]:
        assert f"<tr><th>&nbsp;&nbsp;sizes counted</th><td>{_html(_said(device))}</td></tr>" in html


def _html(text: str) -> str:
    import html

    return html.escape(text)


def test_plan_from_run_of_a_snapshot_says_what_it_takes() -> None:
    # GIVEN a real snapshot handed to --from-run
    snapshot = REAL / "snapshots" / "oom_snapshot.pickle"
    code, out, err = _cli("plan", "--from-run", str(snapshot))
    # THEN one line says --from-run takes a recorded run and what plans without one (was "not a directory")
    assert (code, out) == (2, "")
    assert err == (
        f"kvtrace plan: error: {snapshot}: a CUDA snapshot, not a run: --from-run takes a run directory "
        "recorded with kvtrace (kvtrace.record or `kvtrace run`); a snapshot or trace holds no model "
        "geometry: plan with --preset NAME or --config PATH instead "
        f"(`kvtrace report {snapshot}` reads the file)\n"
    )


def test_plan_from_run_of_a_runs_own_file_names_the_run() -> None:
    # GIVEN a real run's manifest.json handed to --from-run instead of its folder
    run = SAMPLES / "dynamic_b2"
    code, out, err = _cli("plan", "--from-run", str(run / "manifest.json"))
    assert (code, out) == (2, "")
    assert err == (
        f"kvtrace plan: error: {run / 'manifest.json'}: a file of the kvtrace run {run}: --from-run takes "
        f"the run's folder, {run}\n"
    )
