"""docs/format.md's reference of `--json` outputs names every field the commands really print: each key of
the real outputs (sample runs, a snapshot, plans, an export) appears, in backticks, in its command's
section."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main
from kvtrace.run_reader import read_run

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "sample_traces"
FORMAT = (ROOT / "docs" / "format.md").read_text(encoding="utf-8")
VLLM_ANALYSIS = (ROOT / "docs" / "vllm-analysis.md").read_text(encoding="utf-8")


def _section(title: str, doc: str = FORMAT, level: str = "###") -> str:
    """The text of one `### title` section of the JSON reference (or of another doc, at another level)."""
    start = doc.index(f"{level} `{title}")
    end = doc.find("\n## ", start + 1)
    following = doc.find("\n### ", start + 1)
    return doc[start : min((p for p in (end, following) if p > 0), default=len(doc))]


def _json(argv: list[str], status: int = 0) -> Any:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == status
    return json.loads(out.getvalue())


def _undocumented(keys: Any, section: str) -> list[str]:
    named = set(re.findall(r"`([a-z0-9_]+)`", section))
    return sorted(set(keys) - named)


def test_report_fields_are_documented() -> None:
    section = _section("kvtrace report")
    for run in ("dynamic_b2", "sliding_b2"):
        report = _json(["report", str(SAMPLES / run), "--json", "-q", "--no-export"])
        assert _undocumented(report, section) == []
        assert _undocumented(report["devices"][0], section) == []
        assert _undocumented(report["kv"], section) == []
        assert _undocumented(report["kv"]["per_layer"][0], section) == []
        assert _undocumented(report["geometry"], section) == []
        assert report["peak_time"] / 1e6 > 1.6e9  # Unix-epoch µs: after 2020


@pytest.mark.parametrize("run", ["vllm_preempt", "vllm_override", "vllm_refused"])
def test_report_engine_fields_are_documented(run: str) -> None:
    # format.md's `engine` row sends the reader to docs/vllm-analysis.md's table of the engine object
    report = _json(["report", str(SAMPLES / run), "--json", "-q", "--no-export"])
    assert _undocumented(report, _section("kvtrace report")) == []
    assert _undocumented(report["engine"], _section("kvtrace report RUN", VLLM_ANALYSIS, "##")) == []


def test_diagnose_fields_are_documented() -> None:
    section = _section("kvtrace diagnose")
    for argv in (
        [str(SAMPLES / "dynamic_b2")],
        [str(SAMPLES / "dynamic_b2"), "--budget", "70MiB"],
        [str(SAMPLES / "vllm_preempt")],
        [str(SAMPLES / "vllm_preempt"), "--budget", "17MiB"],
        [str(SAMPLES / "vllm_refused")],
        [str(SAMPLES / "vllm_override")],  # preempted nothing: kind no_preemption
        [str(SAMPLES / "vllm_override"), "--budget", "1MiB"],
    ):
        diagnosis = _json(["diagnose", *argv, "--json"])
        if str(SAMPLES / "vllm") in argv[0]:  # scripts tell the engine apart by one key, whatever the kind
            assert diagnosis["engine"] == "vllm", diagnosis.get("kind")
        assert _undocumented(diagnosis, section) == []
        for item in diagnosis.get("remedies", []) + diagnosis.get("top_stacks", []):
            assert _undocumented(item, section) == []
        engine_budget = diagnosis.get("budget") or {}  # an engine run's budget, priced in its knobs
        assert _undocumented(engine_budget, section) == []
        for item in engine_budget.get("remedies", []):
            assert _undocumented(item, section) == []


def test_compare_fields_are_documented() -> None:
    section = _section("kvtrace compare")
    comparison = _json(["compare", str(SAMPLES / "dynamic_b2"), str(SAMPLES / "vllm_preempt"), "--json"])
    assert _undocumented(comparison, section) == []
    for run in comparison["runs"]:
        assert _undocumented(run, section) == []
    assert _undocumented(comparison["runs"][1]["engine"], section) == []


def test_sweep_json_fields_are_documented(tmp_path: Path) -> None:
    # GIVEN a one-point sweep whose budget the weights alone pass: its row says where it runs out
    out = tmp_path / "sweep"
    argv = ["sweep", "--size", "tiny", "--batch", "1", "--context", "8", "--new-tokens", "2", "--cache"]
    with redirect_stdout(io.StringIO()):
        assert main([*argv, "dynamic", "--budget", "1MiB", "--out", str(out), "-q"]) == 0
    summary = json.loads((out / "sweep.json").read_text(encoding="utf-8"))
    (row,) = summary["rows"]
    assert row["fits_budget"] is False and row["runs_out_at"]["before_first_step"] is True
    # THEN sweep.json's section of the JSON reference names every key, of the file, its row and where it runs
    # out (a script reads that file: sweep has no --json)
    section = _section("kvtrace sweep")
    assert _undocumented(summary, section) == []
    assert _undocumented(row, section) == []
    assert _undocumented(row["runs_out_at"], section) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--preset", "llama-3-8b", "--batch", "64", "--context", "8192", "--gpu-memory", "80GiB"],
        ["--engine", "vllm", "--preset", "llama-3-8b", "--gpu-memory", "80GiB", "--max-model-len", "8192"],
    ],
    ids=["hf", "vllm"],
)
def test_plan_fields_are_documented(argv: list[str]) -> None:
    section = _section("kvtrace plan")
    out = io.StringIO()
    with redirect_stdout(out):
        main(["plan", *argv, "--json"])  # 1 when it does not fit: the JSON is printed either way
    plan = json.loads(out.getvalue())
    assert _undocumented(plan, section) == []
    assert _undocumented(plan["request"], section) == []
    for remedy in plan.get("remedies", []):
        assert _undocumented(remedy, section) == []


def test_export_fields_are_documented(tmp_path: Path) -> None:
    summary = _json(["export", str(SAMPLES / "static_b2"), "-o", str(tmp_path / "t"), "--json", "-q"])
    assert _undocumented(summary, _section("kvtrace export")) == []


def _chapter(title: str) -> str:
    """The text of one `## title` chapter of docs/format.md, its `###` sections included."""
    start = FORMAT.index(f"\n## {title}\n")
    end = FORMAT.find("\n## ", start + 1)
    return FORMAT[start : end if end > 0 else len(FORMAT)]


def _unnamed(keys: Any, text: str) -> list[str]:
    """Keys that `text` names neither in backticks (tables) nor quoted (its JSON examples)."""
    named = set(re.findall(r"`([a-z0-9_]+)`", text)) | set(re.findall(r'"([a-z0-9_]+)"', text))
    return sorted(set(keys) - named)


def test_report_cache_fields_are_documented() -> None:
    # GIVEN a real run's report; THEN "KV figures of the report" names every key of each of its `caches`
    report = _json(["report", str(SAMPLES / "dynamic_b2"), "--json", "-q", "--no-export"])
    chapter = _chapter("KV figures of the report (`kvtrace report --json`, `kv`)")
    assert report["kv"]["caches"]
    for cache in report["kv"]["caches"]:
        assert _undocumented(cache, chapter) == []


@pytest.mark.parametrize("run", ["dynamic_b2", "sliding_b2", "static_b2"])
def test_manifest_fields_are_documented(run: str) -> None:
    # GIVEN a real run's manifest.json; THEN its chapter names every key, its model's geometry too
    manifest = json.loads((SAMPLES / run / "manifest.json").read_text(encoding="utf-8"))
    chapter = _chapter("manifest.json")
    assert _unnamed(manifest, chapter) == []
    assert _unnamed(manifest["model"], chapter) == []


@pytest.mark.parametrize("run", ["vllm_preempt", "vllm_override", "vllm_refused"])
def test_engine_json_fields_are_documented(run: str) -> None:
    # GIVEN a real vLLM run's engine.json and manifest; THEN the vLLM chapter's example and tables name
    # every key of each object
    engine = json.loads((SAMPLES / run / "engine.json").read_text(encoding="utf-8"))
    manifest = json.loads((SAMPLES / run / "manifest.json").read_text(encoding="utf-8"))
    chapter = _chapter("vLLM runs")
    objects = [engine, engine["model"], engine["config"], engine["memory_profile"], manifest["engine"]]
    objects += engine["layers"][:1] + engine["storage"][:1]
    objects += [engine["refused"]] if engine["refused"] else []
    for obj in objects:
        assert _unnamed(obj, chapter) == []


def test_kv_event_sources_are_documented() -> None:
    # GIVEN the `source` of every event the sample runs logged (transformers' own cache, vLLM's pool), and
    # the one continuous batching's pool logs (its engine's name)
    from kvtrace.integrations.hf_paged_pool import ENGINE_NAME

    runs = [read_run(SAMPLES / run) for run in ("dynamic_b2", "vllm_preempt")]
    sources = {event.source for run in runs for event in run.kv_events}
    sources |= {ENGINE_NAME}
    # THEN the KV log's `source` row names each one
    row = next(line for line in _chapter("kv_events.jsonl").splitlines() if line.startswith("| `source` |"))
    assert sorted(sources - set(re.findall(r"`([a-z0-9_-]+)`", row))) == []
