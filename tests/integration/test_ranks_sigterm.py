"""SIGTERM in a torchrun job of 2 gloo ranks, each recording the README's tensor-parallel Llama: torchrun
SIGTERMs the surviving rank when one fails, and a scheduler's time limit SIGTERMs them all. Each rank writes
its end (kvtrace's SIGTERM handling); the group's report and diagnosis say which rank failed by itself and
which were stopped, and look at the one that failed, not one that a SIGTERM stopped after it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not built into this torch", allow_module_level=True)
pytest.importorskip("transformers.distributed")

from kvtrace.cli import main  # noqa: E402
from kvtrace.format import MANIFEST  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WORLD, BATCH, PROMPT, STOP_AT = 2, 2, 8, 4  # STOP_AT: the forward after which a rank raises or waits
# Each rank holds 1 of the tiny Llama's 2 KV heads, for the prompt and the 3 tokens fed back by forward 4:
# layers x K,V x 1 head x head_dim x tokens x batch x fp32 = 4 x 2 x 1 x 16 x 11 x 2 x 4
RANK_KV = 4 * 2 * 1 * 16 * (PROMPT + STOP_AT - 1) * BATCH * 4

# The README's example (examples/record_tensor_parallel.py) with a forward hook: after forward STOP_AT the
# rank named by argv[2] raises (-1: none does), the others say "waiting" and sleep until they are stopped.
CHILD = textwrap.dedent(
    f"""
    import dataclasses, sys, time
    import torch
    import torch.distributed as dist
    from transformers import LlamaForCausalLM
    from transformers.distributed import DistributedConfig
    import kvtrace
    from kvtrace.llama import SIZES, build_model

    out_dir, failing = sys.argv[1], int(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    size = dataclasses.replace(SIZES["tiny"], vocab_size=1024, tie_embeddings=False)
    distributed, _, mesh = LlamaForCausalLM.prepare_distribute_model(DistributedConfig(tp_plan="auto"))
    model = LlamaForCausalLM.maybe_distribute_model(build_model(size, seed=0), distributed, mesh)
    ids = torch.randint(3, 1024, ({BATCH}, {PROMPT}), generator=torch.Generator().manual_seed(1))
    forwards = []

    def hook(module, args, output):
        forwards.append(1)
        if len(forwards) == {STOP_AT} and rank == failing:
            raise RuntimeError(f"rank {{rank}} failed after forward {STOP_AT}")
        if len(forwards) == {STOP_AT}:
            print(f"rank {{rank}} waiting", flush=True)
            time.sleep(90)  # in Python, where a SIGTERM's handler runs at once

    model.register_forward_hook(hook)
    with kvtrace.record(out_dir, model=model):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                       do_sample=False)
    """
)


def _torchrun(tmp_path: Path, name: str, failing: int) -> tuple[Path, subprocess.Popen[str]]:
    """Start the child as `torchrun --nproc-per-node 2` (this interpreter's torch.distributed.run) in its
    own process group, as a scheduler starts a job."""
    script, out = tmp_path / f"{name}.py", tmp_path / name
    script.write_text(CHILD, encoding="utf-8")
    with (
        socket.socket() as probe
    ):  # a free rendezvous port: torchrun reads --master-port from PET_MASTER_PORT
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PET_MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={WORLD}", str(script)]
    job = subprocess.Popen(
        [*command, str(out), str(failing)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    return out, job


def _finish(job: subprocess.Popen[str], said: list[str]) -> None:
    try:
        rest, _ = job.communicate(timeout=50)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        rest, _ = job.communicate()
        pytest.fail("torchrun did not end within 50 s:\n" + "".join(said)[-3000:] + rest[-3000:])
    said.append(rest)


@pytest.fixture(scope="module")
def failed_then_stopped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Rank 1 raises after forward 4 while rank 0 waits: torchrun sees rank 1 exit 1 and SIGTERMs rank 0."""
    out, job = _torchrun(tmp_path_factory.mktemp("ranks"), "failed", failing=1)
    said: list[str] = []
    _finish(job, said)
    assert job.returncode != 0, "".join(said)[-3000:]
    yield out


@pytest.fixture(scope="module")
def time_limit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Both ranks wait after forward 4; a scheduler's time limit SIGTERMs torchrun's whole process group."""
    out, job = _torchrun(tmp_path_factory.mktemp("ranks"), "limit", failing=-1)
    assert job.stdout is not None
    said: list[str] = []
    deadline = time.monotonic() + 50
    # each rank's line is one write, but two may share a line of torchrun's output
    while "".join(said).count(" waiting") < WORLD and time.monotonic() < deadline:
        line = job.stdout.readline()
        if not line:
            break
        said.append(line)
    os.killpg(job.pid, signal.SIGTERM)
    _finish(job, said)
    assert "".join(said).count(" waiting") == WORLD, "".join(said)[-3000:]
    yield out


def _ended(group: Path, rank: int) -> dict[str, Any]:
    return json.loads((group / f"rank-{rank}" / MANIFEST).read_text())["ended"]


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_a_rank_sigtermed_after_another_raised_is_said_stopped_by_sigterm(
    failed_then_stopped: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN rank 1 raised and torchrun then SIGTERMed rank 0: each rank's manifest says how it ended
    group = failed_then_stopped
    stopped, raised = _ended(group, 0), _ended(group, 1)
    assert (stopped["status"], stopped["type"], stopped["signal"]) == ("interrupted", "Terminated", "SIGTERM")
    assert (raised["status"], raised["type"]) == ("exception", "RuntimeError") and "signal" not in raised
    assert raised["t_ns"] < stopped["signal_t_ns"] <= stopped["t_ns"]

    # WHEN the group is reported
    data = json.loads(_cli(capsys, "report", str(group), "--json", "--no-export", "-q"))
    text = _cli(capsys, "report", str(group), "--no-export", "-q")

    # THEN each rank holds its own KV head's cache up to forward 4, the group both
    assert [(r["rank"], r["kv"]["final_bytes"]) for r in data["ranks"]] == [(0, RANK_KV), (1, RANK_KV)]
    assert data["kv"]["final_bytes"] == WORLD * RANK_KV == 22_528
    # ... rank 1, which raised, is the one to look at
    assert data["focus"] == {"rank": 1, "reason": "raised RuntimeError"}
    # ... and the ranks table says rank 0 was stopped by SIGTERM, not that it raised `Terminated`
    rows = {line.split()[0]: line for line in text.splitlines()[2:4]}
    assert rows["0"].endswith("<- stopped by SIGTERM") and rows["1"].endswith("<- RuntimeError")
    assert "Terminated" not in text

    # AND the diagnosis of the group says so of the other rank
    text = _cli(capsys, "diagnose", str(group))
    assert text.splitlines()[0].endswith(
        "diagnosing rank 1, which raised RuntimeError: rank 1 failed after forward 4"
    )
    assert text.splitlines()[1] == "  other ranks: rank 0 stopped by SIGTERM peak " + _peak(data, 0)


def _peak(data: dict[str, Any], rank: int) -> str:
    """A rank's peak as the text renders it (the figure itself is the report's, checked elsewhere)."""
    from analyzers.units import human_bytes

    return human_bytes(data["ranks"][rank]["peak_allocated_bytes"])


def test_a_time_limit_that_sigterms_every_rank_focuses_the_peak_not_the_first_to_stop(
    time_limit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a scheduler's time limit: torchrun's process group SIGTERMed while both ranks wait after forward 4
    group = time_limit
    for rank in range(WORLD):
        ended = _ended(group, rank)
        assert (ended["status"], ended["signal"]) == ("interrupted", "SIGTERM")

    # WHEN the group is reported and diagnosed
    data = json.loads(_cli(capsys, "report", str(group), "--json", "--no-export", "-q"))
    diagnosed = json.loads(_cli(capsys, "diagnose", str(group), "--json"))["run_group"]

    # THEN no rank failed by itself, so none is "the first to fail" (which rank's handler ran first is a
    # race): the rank to look at is the one that peaked, as in a group that finished
    assert [(r["rank"], r["kv"]["final_bytes"]) for r in data["ranks"]] == [(0, RANK_KV), (1, RANK_KV)]
    assert data["failed_ranks"] == [0, 1]
    reason = "peaked (every rank was stopped by SIGTERM)"
    assert data["focus"] == {"rank": data["peak_rank"], "reason": reason}
    assert (diagnosed["rank"], diagnosed["reason"]) == (data["peak_rank"], reason)
    assert (
        data["peak_rank"] == max(data["ranks"], key=lambda r: (r["peak_allocated_bytes"], -r["rank"]))["rank"]
    )


def test_the_group_notes_say_who_was_stopped_after_whose_failure(
    failed_then_stopped: Path, time_limit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN torchrun's SIGTERM to rank 0 after rank 1 raised: how long after, from the manifests
    stopped, raised = _ended(failed_then_stopped, 0), _ended(failed_then_stopped, 1)
    after = (stopped["signal_t_ns"] - raised["t_ns"]) / 1e9
    assert 0 < after < 30  # rank 1's exit, then torchrun's next look (every 0.1 s)

    # WHEN the group is reported, THEN one note says rank 0 was stopped because rank 1 failed, not by one of
    # SIGTERM's usual senders (which rank 0's own note lists)
    data = json.loads(_cli(capsys, "report", str(failed_then_stopped), "--json", "--no-export", "-q"))
    said = (
        f"rank 0 was stopped by SIGTERM {after:.1f} s after rank 1 raised RuntimeError: torchrun stops the "
        "other ranks when one fails, so rank 1 is where the job failed"
    )
    assert said in data["notes"]
    # ... which `diagnose` and `compare` say too
    assert f"  note: {said}" in _cli(capsys, "diagnose", str(failed_then_stopped)).splitlines()
    compared = _cli(capsys, "compare", str(failed_then_stopped), str(time_limit)).splitlines()
    assert f"note: failed: {said}" in compared

    # AND a time limit's note says every rank was stopped at once, within the spread of their SIGTERMs
    told = [_ended(time_limit, rank)["signal_t_ns"] for rank in range(WORLD)]
    spread = (max(told) - min(told)) / 1e6
    data = json.loads(_cli(capsys, "report", str(time_limit), "--json", "--no-export", "-q"))
    assert (
        f"ranks 0 and 1 were stopped by SIGTERM within {spread:.1f} ms of each other, no rank having failed "
        "before: the job was stopped from outside (a scheduler's time limit, `docker stop`, `timeout` or "
        "`kill`, or torchrun itself stopped)"
    ) in data["notes"]


def test_a_survivor_whose_collective_raised_after_sigterm_is_said_stopped(
    failed_then_stopped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the group whose rank 1 failed, with rank 0's end as a survivor leaves it when its collective is in
    # flight as torchrun's SIGTERM comes (rank 1 killed -9 under gloo: kvtrace records the SIGTERM, then the
    # all-reduce raises "Connection closed by peer" before the block can stop between steps)
    group = tmp_path / "group"
    shutil.copytree(failed_then_stopped, group)
    manifest_path = group / "rank-0" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    stopped = manifest["ended"]
    manifest["ended"] = {
        "status": "exception",
        "type": "RuntimeError",
        "message": "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:10151.",
        "signal": "SIGTERM",
        "signal_t_ns": stopped["signal_t_ns"],
        "t_ns": stopped["t_ns"],
    }
    manifest_path.write_text(json.dumps(manifest))
    raised = _ended(group, 1)
    after = (stopped["signal_t_ns"] - raised["t_ns"]) / 1e9

    # WHEN the group is reported and diagnosed
    data = json.loads(_cli(capsys, "report", str(group), "--json", "--no-export", "-q"))
    text = _cli(capsys, "report", str(group), "--no-export", "-q")

    # THEN rank 1 is where the job failed, and rank 0 was stopped by torchrun's SIGTERM after it, its
    # RuntimeError the stop's (it read "exception <- RuntimeError" with no word of the SIGTERM)
    assert data["focus"] == {"rank": 1, "reason": "raised RuntimeError"}
    said = (
        f"rank 0 was stopped by SIGTERM {after:.1f} s after rank 1 raised RuntimeError: torchrun stops the "
        "other ranks when one fails, so rank 1 is where the job failed"
    )
    assert said in data["notes"]
    rows = {line.split()[0]: line for line in text.splitlines()[2:4]}
    assert rows["0"].endswith("<- RuntimeError after SIGTERM") and rows["1"].endswith("<- RuntimeError")
    other = _cli(capsys, "diagnose", str(group)).splitlines()[1]
    assert other == "  other ranks: rank 0 RuntimeError after SIGTERM peak " + _peak(data, 0)
