"""Which size a run group's figures count ("sizes counted"), said per rank as each rank's own report says
it: the group's HTML page gave no word of it (the text and JSON did), and the group's text said a CUDA
rank's figures were "sizes as the allocator reported them", the words of a CPU trace, where the rank's own
report says "the allocator's block sizes, as memory_allocated() counts them". Groups are made of copies of
kvtrace's sample runs (a real CPU run and a real H200 run), as test_ranks_single_process makes them; the
words expected are written out here, as docs/format.md gives them."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from kvtrace.cli import main
from kvtrace.format import MANIFEST

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
CUDA_BLOCKS = "the allocator's block sizes, as memory_allocated() counts them"
CPU_TRACE = "sizes as the allocator reported them"
TENSORS = "the KV log's and the weights' tensor sizes"


def _group(sample: Path, folder: Path, without_trace: tuple[int, ...] = ()) -> Path:
    """Two ranks, each a copy of `sample` (its manifest saying rank r of 2); `without_trace`: ranks whose
    profiler/ folder is gone (the manifest still lists the trace)."""
    for rank in (0, 1):
        reports_files = shutil.ignore_patterns("kv_counters*", "tb_*")
        shutil.copytree(sample, folder / f"rank-{rank}", ignore=reports_files)
        manifest = json.loads((folder / f"rank-{rank}" / MANIFEST).read_text())
        manifest.update(rank=rank, world_size=2)
        (folder / f"rank-{rank}" / MANIFEST).write_text(json.dumps(manifest))
        if rank in without_trace:
            shutil.rmtree(folder / f"rank-{rank}" / "profiler")
    return folder


def _text(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    capsys.readouterr()
    assert main(["report", str(path), "--no-export", "-q"]) == 0
    return capsys.readouterr().out


def _device_said(text: str) -> dict[str, str]:
    """device -> the words in parentheses that end its line of the text report."""
    lines = (re.match(r"^  (\S+): peak .* frees \((.*)\)$", line) for line in text.splitlines())
    return {m.group(1): m.group(2) for m in lines if m is not None}


def _page_rows(capsys: pytest.CaptureFixture[str], group: Path, page: Path) -> list[list[str]]:
    """The ranks table of the group's page, each row's cells (header first)."""
    assert main(["report", str(group), "--no-export", "-q", "-o", str(page)]) == 0
    capsys.readouterr()
    table = page.read_text(encoding="utf-8").split("<table>", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    return [[html.unescape(c) for c in re.findall(r"<t[hd]>(.*?)</t[hd]>", row)] for row in rows]


@pytest.mark.parametrize(
    ("sample", "without_trace", "said"),
    [
        ("h200/dynamic_b24", (), {0: CUDA_BLOCKS, 1: CUDA_BLOCKS}),
        ("dynamic_b2", (1,), {0: CPU_TRACE, 1: TENSORS}),
    ],
    ids=["cuda", "cpu-rank-1-lost-its-trace"],
)
def test_a_groups_text_and_page_say_each_ranks_sizes_as_its_own_report(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    sample: str,
    without_trace: tuple[int, ...],
    said: dict[int, str],
) -> None:
    # GIVEN a group of two ranks, each rank's own report naming its devices' sizes
    group = _group(SAMPLES / sample, tmp_path / "group", without_trace)
    own = {rank: _device_said(_text(capsys, group / f"rank-{rank}")) for rank in (0, 1)}
    peak_device = {0: "cuda:0", 1: "cuda:0"} if sample.startswith("h200") else {0: "cpu", 1: "cpu"}
    assert {rank: own[rank][peak_device[rank]] for rank in (0, 1)} == said

    # WHEN the group is reported as text
    grouped = _device_said(_text(capsys, group))

    # THEN each rank's device line says what that rank's own report says (a CUDA rank's said a CPU's words)
    assert grouped == {
        f"rank{rank}/{device}": words for rank in (0, 1) for device, words in own[rank].items()
    }

    # WHEN it is reported as a page
    rows = _page_rows(capsys, group, tmp_path / "group.html")

    # THEN its ranks table says the sizes each rank's peak counts, beside that peak, in the text's words
    header = rows[0]
    assert header[3:5] == ["peak allocated", "sizes counted"]
    assert {int(row[0]): (row[2], row[4]) for row in rows[1:]} == {
        rank: (peak_device[rank], said[rank]) for rank in (0, 1)
    }
