"""`kvtrace report` on a small snapshot works with Python lists and never imports numpy (issue 11: start-up
is most of a sub-MB snapshot's report), and gives byte for byte the report of the columns path (`-o`, which
draws the timelines, still takes it)."""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from analyzers.render.json import report_to_json
from analyzers.render.text import report_to_text
from analyzers.report import build_report
from kvtrace.errors import KvtraceError

SNAPSHOTS = Path(__file__).resolve().parents[2].parent / "shared" / "real_traces" / "snapshots"
REAL = sorted(SNAPSHOTS.glob("*.pickle"))
pytestmark = pytest.mark.skipif(not REAL, reason="shared/real_traces not present")

KV_FRAME = {"filename": "transformers/cache_utils.py", "line": 120, "name": "update"}
WEIGHTS_FRAME = {"filename": "transformers/modeling_utils.py", "line": 300, "name": "from_pretrained"}


class _Plain(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _load(path: Path) -> dict[str, Any]:
    return _Plain(io.BytesIO(path.read_bytes())).load()


def _write(tmp_path: Path, name: str, data: dict[str, Any]) -> Path:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(data, protocol=4))
    return path


def _crafted(tmp_path: Path) -> dict[str, Path]:
    """Real snapshots changed where the real ones have nothing to show: KV and weights stacks on trace
    allocations, a second device with a trace, a device with segments and no trace, a size written as text."""
    base = _load(SNAPSHOTS / "memory_snapshot.pickle")
    stacked = copy.deepcopy(base)
    for i, entry in enumerate(e for e in stacked["device_traces"][0] if e["action"] == "alloc"):
        if i % 3 == 0:
            entry["frames"] = [dict(KV_FRAME), *entry.get("frames", [])]
        elif i % 3 == 1:
            entry["frames"] = [dict(WEIGHTS_FRAME)]
    two = copy.deepcopy(stacked)
    second = copy.deepcopy(two["segments"])
    for segment in second:
        segment["device"] = 1
    two["segments"] += second
    two["device_traces"].append(copy.deepcopy(two["device_traces"][0]))
    untraced = copy.deepcopy(two)
    untraced["device_traces"] = untraced["device_traces"][:1]
    text_size = copy.deepcopy(base)
    next(e for e in text_size["device_traces"][0] if e["action"] == "alloc")["size"] = "4096"
    made = {"stacked": stacked, "two_devices": two, "untraced_device": untraced, "text_size": text_size}
    return {name: _write(tmp_path, f"{name}.pickle", data) for name, data in made.items()}


Output = tuple[str, str]  # the JSON report and the text one, or an error line and ""


def _both_paths(path: Path) -> tuple[Output, Output]:
    """(lists path, columns path) of one input."""
    outputs: list[Output] = []
    for timelines in (False, True):
        try:
            source, report = build_report(path, keep_events=False, timelines=timelines)
        except KvtraceError as exc:
            outputs.append((f"error: {exc}", ""))
            continue
        assert (source.devices == [] and report.timelines == []) is not timelines  # which path it took
        outputs.append((json.dumps(report_to_json(report), indent=2), report_to_text(report)))
    return outputs[0], outputs[1]


@pytest.mark.parametrize("path", REAL, ids=[p.name for p in REAL])
def test_real_snapshots_report_the_same_with_lists_as_with_columns(path: Path) -> None:
    # GIVEN a real snapshot WHEN it is reported with Python lists and with numpy's columns
    plain, columns = _both_paths(path)
    # THEN JSON and text are the same, byte for byte
    assert plain == columns
    assert json.loads(plain[0])["source"]["kind"] == "snapshot"


def test_crafted_snapshots_report_the_same_with_lists_as_with_columns(tmp_path: Path) -> None:
    # GIVEN real snapshots given KV and weights stacks, a second device, an untraced device, a size as text
    crafted = _crafted(tmp_path)
    results = {name: _both_paths(path) for name, path in crafted.items()}
    # THEN each reads the same by both paths, the bad size refused with the same line
    for name, (plain, columns) in results.items():
        assert plain == columns, name
    assert results["text_size"][0][0].startswith(f"error: {crafted['text_size']}: malformed snapshot")
    # and the stack rules' KV is every trace allocation given the cache update's frame, counted from the file
    raw = _load(crafted["stacked"])["device_traces"][0]
    kv_allocs = [e for e in raw if e["action"] == "alloc" and (e.get("frames") or [None])[0] == KV_FRAME]
    kv_allocated = sum(e["size"] for e in kv_allocs)
    report = json.loads(results["stacked"][0][0])
    assert kv_allocated > 0
    assert report["kv"]["allocated_bytes_total"] == kv_allocated
    assert report["kv"]["measured_from"] == "stack_rule"
    two = json.loads(results["two_devices"][0][0])
    assert [d["device"] for d in two["devices"]] == ["cuda:0", "cuda:1"]
    assert two["devices"][0] == {**two["devices"][1], "device": "cuda:0"}
    untraced = json.loads(results["untraced_device"][0][0])["devices"][1]
    assert untraced["alloc_events"] == 0 and untraced["reserved_at_peak_bytes"] == sum(
        s["total_size"] for s in _load(crafted["untraced_device"])["segments"] if s["device"] == 1
    )


def test_snapshot_report_imports_no_numpy_and_matches_the_html_path(tmp_path: Path) -> None:
    # GIVEN every real snapshot WHEN `kvtrace report --json` reads each in a fresh interpreter, and again
    # with -o (the HTML timeline needs the columns)
    code = (
        "import io, json, sys, contextlib\n"
        "from kvtrace.cli import main\n"
        "outs, loaded = [], []\n"
        f"for path in {[str(p) for p in REAL]!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        assert main(['report', '--json', path]) == 0\n"
        "    outs.append(out.getvalue())\n"
        "    loaded.append(sorted(m for m in sys.modules if m == 'numpy' or m.startswith('numpy.')))\n"
        "for path in " + repr([str(p) for p in REAL]) + ":\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        f"        assert main(['report', '--json', '-o', {str(tmp_path / 'page.html')!r}, path]) == 0\n"
        "    outs.append(out.getvalue())\n"
        "print(json.dumps({'outs': outs, 'loaded': loaded, 'numpy_after': 'numpy._core' in sys.modules}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    # THEN no part of numpy was imported for any of them, and each printed what the columns path prints
    assert result["loaded"] == [[] for _ in REAL]
    assert result["numpy_after"] is True  # the -o runs did use numpy
    plain, columns = result["outs"][: len(REAL)], result["outs"][len(REAL) :]
    assert plain == columns
    assert all(json.loads(out)["source"]["kind"] == "snapshot" for out in plain)


# What a snapshot's report has no use for: a run's KV-log analyzers, its budget, the timelines (numpy
# columns, for -o) and the format's event records. `--json` needs no text renderer, which loads `caches`.
RUN_ONLY = [
    "analyzers.budget",
    "analyzers.kv_capacity",
    "analyzers.kv_cut_step",
    "analyzers.kv_events",
    "analyzers.kv_log",
    "analyzers.kv_log_figures",
    "analyzers.kv_views",
    "analyzers.kv_widths",
    "analyzers.run_kv",
    "analyzers.timeline",
    "kvtrace.format",
    "kvtrace.run_checks",
    "kvtrace.run_reader",
]
TEXT_ONLY = ["analyzers.caches", "analyzers.render.text"]


def test_snapshot_report_imports_only_what_a_snapshot_needs() -> None:
    # GIVEN every real snapshot WHEN `kvtrace report --json`, then `kvtrace report`, reads each in a fresh
    # interpreter, and both again once every module a run's report needs is imported
    code = (
        "import importlib, io, json, sys, contextlib\n"
        "from kvtrace.cli import main\n"
        f"paths, watched = {[str(p) for p in REAL]!r}, {RUN_ONLY + TEXT_ONLY!r}\n"
        "def outputs(flags):\n"
        "    outs = []\n"
        "    for path in paths:\n"
        "        out = io.StringIO()\n"
        "        with contextlib.redirect_stdout(out):\n"
        "            assert main(['report', *flags, path]) == 0\n"
        "        outs.append(out.getvalue())\n"
        "    return outs, sorted(m for m in watched if m in sys.modules)\n"
        "json_outs, after_json = outputs(['--json'])\n"
        "text_outs, after_text = outputs([])\n"
        "for name in watched:\n"
        "    importlib.import_module(name)\n"
        "eager = [outputs(['--json'])[0], outputs([])[0]]\n"
        "print(json.dumps({'lazy': [json_outs, text_outs], 'eager': eager,"
        " 'after_json': after_json, 'after_text': after_text}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    # THEN the JSON reports loaded none of the run-only modules nor the text renderer, the text ones only that
    assert result["after_json"] == []
    assert result["after_text"] == TEXT_ONLY
    # and each output is byte for byte what it is with all of them imported
    assert result["lazy"] == result["eager"]
    # and its allocations are the snapshot's, counted from the file
    for path, out in zip(REAL, result["lazy"][0], strict=True):
        allocs = sum(e["action"] == "alloc" for trace in _load(path)["device_traces"] for e in trace)
        assert sum(d["alloc_events"] for d in json.loads(out)["devices"]) == allocs
