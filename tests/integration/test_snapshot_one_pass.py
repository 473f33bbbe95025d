"""A small snapshot's trace is checked and replayed in one pass (`analyzers.readers.snapshot_one_pass`,
issue 11: each walk over a real dump's scattered entry dicts cost about what the replay did). It must report
exactly what the two-step path (`plain_trace_ok`, then the replay loop) reports, source and report alike, on
every real and sample snapshot, and give up on any trace that is not plain, which the two-step path then
reads as it always has."""

from __future__ import annotations

import copy
import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import pytest

from analyzers.readers.snapshot import PLAIN_MAX_ENTRIES, load_snapshot, snapshot_source
from analyzers.readers.snapshot_one_pass import NotPlain
from analyzers.render.json import report_to_json
from analyzers.render.text import report_to_text
from analyzers.snapshot_summary import plain_snapshot_report
from kvtrace.errors import KvtraceError

ROOT = Path(__file__).resolve().parents[2]
REAL = sorted((ROOT.parent / "shared" / "real_traces" / "snapshots").glob("*.pickle"))
pytestmark = pytest.mark.skipif(not REAL, reason="shared/real_traces not present")

KV_FRAME = {"filename": "transformers/cache_utils.py", "line": 120, "name": "update"}
WEIGHTS_FRAME = {"filename": "transformers/modeling_utils.py", "line": 300, "name": "from_pretrained"}


class _Plain(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}")


def _load(path: Path) -> dict[str, Any]:
    return _Plain(io.BytesIO(path.read_bytes())).load()


def _small_samples() -> list[Path]:
    """The sample runs' snapshots the lists path reads (the others take the columns path, one pass or not)."""
    found = sorted((ROOT / "sample_traces").glob("**/snapshots/*.pickle"))
    return [p for p in found if sum(map(len, _load(p).get("device_traces") or [])) <= PLAIN_MAX_ENTRIES]


def _outcome(path: Path, one_pass: bool) -> tuple[Any, ...]:
    """Everything the report and its source say, or the one-line error."""
    try:
        source, report = plain_snapshot_report(str(path), one_pass=one_pass)
    except KvtraceError as exc:
        return ("error", str(exc))
    devices = [  # the columns path's (a trace that is not plain): arrays, compared as lists
        {f.name: _plain(getattr(device, f.name)) for f in dataclasses.fields(device)}
        for device in source.devices
    ]
    seen = (repr(source.meta), source.frames, source.segments, source.markers, source.ooms, devices)
    return ("report", report_to_json(report), report_to_text(report), seen)


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _takes_one_pass(path: Path) -> bool:
    try:
        snapshot_source(str(path), load_snapshot(str(path)), plain=lambda device: None, one_pass=True)
    except NotPlain:
        return False
    return True


@pytest.mark.parametrize("path", [*REAL, *_small_samples()], ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_real_and_sample_snapshots_read_in_one_pass_report_as_in_two(path: Path) -> None:
    # GIVEN a snapshot torch wrote WHEN it is reported by the one pass and by the two-step path
    # THEN the one pass takes it (every entry plain) and both say the same, byte for byte
    assert _takes_one_pass(path)
    one, two = _outcome(path, one_pass=True), _outcome(path, one_pass=False)
    assert one[0] == "report"
    assert one == two


def _crafted(tmp_path: Path) -> dict[str, tuple[Path, bool]]:
    """Real snapshots changed where the real ones show nothing: name -> (file, whether it is plain)."""
    base = _load(REAL[0].parent / "memory_snapshot.pickle")
    trace = base["device_traces"][0]
    allocs = [i for i, e in enumerate(trace) if e["action"] == "alloc"]
    frees = [i for i, e in enumerate(trace) if e["action"] == "free_completed"]
    requested = next(i for i, e in enumerate(trace) if e["action"] == "free_requested")
    end = trace[-1]["time_us"]

    def made(change: Any) -> dict[str, Any]:
        data = copy.deepcopy(base)
        change(data, data["device_traces"][0])
        return data

    def stacked(data: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        for n, i in enumerate(allocs):
            extra = [dict(KV_FRAME)] if n % 3 == 0 else [dict(WEIGHTS_FRAME)] if n % 3 == 1 else []
            entries[i]["frames"] = [*extra, *entries[i].get("frames", [])]

    def second_device(data: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        stacked(data, entries)
        data["device_traces"].append(copy.deepcopy(entries))
        more = copy.deepcopy(data["segments"])
        for segment in more:
            segment["device"] = 1
        data["segments"] += more

    def events(data: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        entries.insert(5, {"action": "segment_alloc", "addr": 7 << 40, "size": 2 << 20, "time_us": end})
        entries.append({"action": "segment_free", "addr": 7 << 40, "size": 2 << 20, "time_us": end + 1})
        entries.append({"action": "oom", "size": 1 << 30, "device_free": 1 << 20, "time_us": end + 2})
        entries.append({"action": "snapshot", "size": 0, "addr": 0, "time_us": end + 3})

    def untimed(data: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        for entry in entries:
            del entry["time_us"]

    def orphans(data: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        del entries[: allocs[40]]  # frees of blocks allocated before the ring buffer began

    plain = {
        "stacks": stacked,
        "second_device": second_device,
        "segment_oom_snapshot_entries": events,
        "untimed": untimed,
        "orphan_frees": orphans,
    }
    odd = {
        "free_without_size": lambda d, e: e[frees[3]].pop("size"),
        "alloc_without_addr": lambda d, e: e[allocs[3]].pop("addr"),
        "size_as_bool": lambda d, e: e[allocs[2]].update(size=True),
        "time_with_a_fraction": lambda d, e: e[7].update(time_us=1.5),
        "one_entry_untimed": lambda d, e: e[7].pop("time_us"),
        "action_none": lambda d, e: e[allocs[1]].update(action=None),
        "action_a_number": lambda d, e: e[allocs[1]].update(action=1),
        "address_past_int64": lambda d, e: e[allocs[1]].update(addr=2**64),
        "requested_free_past_int64": lambda d, e: e[requested].update(addr=2**64),
        "size_past_any_device": lambda d, e: e[allocs[1]].update(size=2**62),
    }
    written = {}
    for name, change in [*plain.items(), *odd.items()]:
        path = tmp_path / f"{name}.pickle"
        path.write_bytes(pickle.dumps(made(change), protocol=4))
        written[name] = (path, name in plain)
    return written


def test_crafted_snapshots_read_in_one_pass_only_where_plain_and_report_as_in_two(tmp_path: Path) -> None:
    # GIVEN real snapshots with KV and weights stacks, a second device, segment, OOM and snapshot entries, no
    # times, orphan frees (plain), or one entry damaged or odd (not plain)
    for name, (path, plain) in _crafted(tmp_path).items():
        # WHEN each is reported by the one pass and by the two-step path
        # THEN only the plain ones are read in one pass, and both paths say the same (figures or error)
        assert _takes_one_pass(path) == plain, name
        assert _outcome(path, one_pass=True) == _outcome(path, one_pass=False), name
