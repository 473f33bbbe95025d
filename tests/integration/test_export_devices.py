"""The device an export row names is the one its input names: a real CPU recording (its profiler's `[memory]`
events carry Device Type 0, the CPU) and a real CPU memory timeline (torch's `export_memory_timeline`, which
names no device), each recorded here on a tiny random Llama 3."""

from __future__ import annotations

import gzip
import json
import pickle
import warnings
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from kvtrace.cli import main
from tests.tiny import record_generate, tiny_size

BATCH, PROMPT, NEW_TOKENS = 2, 8, 4


def _greedy(model: Any) -> None:
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip


def test_a_cpu_recording_exports_the_device_its_trace_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real recording on the CPU with the profiler on
    from kvtrace.llama import build_model

    run = tmp_path / "run"
    record_generate(build_model(tiny_size(2)), run, batch=BATCH, prompt=PROMPT, new_tokens=NEW_TOKENS)
    (trace,) = (run / "profiler").glob("*.pt.trace.json*")
    raw = trace.read_bytes()
    events = json.loads(gzip.decompress(raw) if trace.suffix == ".gz" else raw)["traceEvents"]
    memory = [e["args"] for e in events if e.get("name") == "[memory]"]
    assert memory and {(a["Device Type"], a["Device Id"]) for a in memory} == {(0, -1)}  # c10's CPU

    # WHEN it is exported
    out = tmp_path / "out"
    assert main(["export", str(run), "-o", str(out), "-q"]) == 0

    # THEN every memory event, the device row and the run row name the CPU, as the trace does
    rows = pq.read_table(out / "memory_events", columns=["device"]).column("device").to_pylist()
    assert rows == ["cpu"] * len(memory)
    assert pq.read_table(out / "devices").column("device").to_pylist() == ["cpu"]
    (run_row,) = pq.read_table(out / "runs").to_pylist()
    assert (run_row["device_type"], run_row["device_index"]) == ("cpu", None)


def test_a_cpu_memory_timeline_exports_no_guessed_gpu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a real CPU memory timeline: torch.profiler around a tiny Llama's generate(), exported raw
    from kvtrace.llama import build_model

    model = build_model(tiny_size(2))
    with (
        torch.no_grad(),
        profile(
            activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
        ) as prof,
    ):
        _greedy(model)
    timeline = tmp_path / "memory_timeline.raw.json.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of snapshots, still written
        prof.export_memory_timeline(str(timeline), device="cpu")
    rows = json.loads(gzip.decompress(timeline.read_bytes()))
    held_at_end = sum(row[2] for row in rows)  # pre-existing + created - destroyed; version bumps net zero
    assert held_at_end > 0

    # WHEN it is exported and reported
    out = tmp_path / "out"
    assert main(["export", str(timeline), "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["report", str(timeline), "--json", "-q", "--no-export"]) == 0
    report = json.loads(capsys.readouterr().out)

    # THEN no row claims a GPU the file never named (it was "cuda:0"): the device is unknown, in the tables
    # as in the report, which says why
    (device,) = pq.read_table(out / "devices").to_pylist()
    assert device["device"] == "unknown" == report["devices"][0]["device"]
    events = pq.read_table(out / "memory_events", columns=["device", "delta_bytes"]).to_pydict()
    assert set(events["device"]) == {"unknown"}
    assert device["baseline_bytes"] + sum(events["delta_bytes"]) == held_at_end
    (run_row,) = pq.read_table(out / "runs").to_pylist()
    assert run_row["source_kind"] == "memory_timeline"
    assert (run_row["device_type"], run_row["device_index"]) == (None, None)
    assert any("does not say which device" in note for note in report["notes"])


class _DataOnly(pickle.Unpickler):
    """Plain containers only: a snapshot holds dicts, lists, strings and numbers."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} refused")


OOM_SNAPSHOT = (
    Path(__file__).resolve().parents[3] / "shared" / "real_traces" / "snapshots" / "oom_snapshot.pickle"
)


@pytest.mark.skipif(not OOM_SNAPSHOT.exists(), reason="../shared/real_traces")
def test_a_snapshot_without_trace_events_exports_its_gpu(tmp_path: Path) -> None:
    # GIVEN a real snapshot taken without memory history: segments on one GPU, no alloc or free event
    with OOM_SNAPSHOT.open("rb") as fh:
        snapshot = _DataOnly(fh).load()
    (gpu,) = {segment["device"] for segment in snapshot["segments"]}
    assert not any(
        event["action"] in ("alloc", "free_completed") for t in snapshot["device_traces"] for event in t
    )
    # WHEN it is exported
    assert main(["export", str(OOM_SNAPSHOT), "-o", str(tmp_path / "out")]) == 0
    # THEN its runs row names that GPU, as its devices row does (a device with no events is still its device)
    (row,) = pq.read_table(tmp_path / "out" / "runs").to_pylist()
    (device,) = pq.read_table(tmp_path / "out" / "devices").to_pylist()
    assert (row["device_type"], row["device_index"]) == ("cuda", gpu)
    assert device["device"] == f"cuda:{gpu}"
