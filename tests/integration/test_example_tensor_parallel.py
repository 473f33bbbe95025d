"""The README's tensor-parallel example runs as written: `torchrun --nproc-per-node 2
examples/record_tensor_parallel.py runs/tp` (as `python -m torch.distributed.run`) records a tiny Llama 3
sharded by transformers' own plan on 2 gloo ranks, and `kvtrace report` adds the ranks' KV up."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not built into this torch", allow_module_level=True)
pytest.importorskip("transformers.distributed")

from kvtrace.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "record_tensor_parallel.py"
WORLD = 2


def _example() -> Any:
    """The example's module, for its model size and token counts (the inputs, not its figures)."""
    spec = importlib.util.spec_from_file_location("record_tensor_parallel", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rank_kv_bytes() -> int:
    """One rank's final KV, from the example's inputs: its half of the KV heads, in float32, for every token
    fed (the prompt and the new tokens but the last, which generate() never feeds back)."""
    example = _example()
    size = example.SIZE
    head_dim = size.hidden_size // size.num_heads
    tokens = example.PROMPT_TOKENS + example.NEW_TOKENS - 1
    return size.num_layers * 2 * (size.num_kv_heads // WORLD) * head_dim * tokens * example.BATCH * 4


def test_readme_tensor_parallel_example(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the README's torchrun line, run as this interpreter's torch.distributed.run into a new folder
    line = re.search(r"^torchrun (--nproc-per-node 2 \S+) runs/tp ", (ROOT / "README.md").read_text(), re.M)
    assert line is not None and line.group(1) == "--nproc-per-node 2 examples/record_tensor_parallel.py"
    out = tmp_path / "tp"
    # a free rendezvous port: torchrun reads --master-port from PET_MASTER_PORT
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PET_MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", *line.group(1).split(), str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # THEN rank 0 says once where the runs went and what to run next (the job printed nothing)
    said = [line for line in done.stdout.splitlines() if line.startswith("recorded ")]
    assert said == [
        f"recorded one run per rank: {out / 'rank-0'} to rank-1; next: kvtrace report {out} (the ranks side "
        f"by side), kvtrace report {out / 'rank-0'} (one rank)"
    ]

    # AND each rank's cache holds its half of the KV heads, in float32, for every token fed: the prompt
    # and the new tokens but the last, which generate() never feeds back
    example = _example()
    size = example.SIZE
    assert (size.num_kv_heads, size.tie_embeddings) == (2, False)
    tokens = example.PROMPT_TOKENS + example.NEW_TOKENS - 1
    rank_kv_bytes = _rank_kv_bytes()
    assert rank_kv_bytes == 11_264  # the figure the README quotes

    assert main(["report", str(out), "--json"]) == 0
    group = json.loads(capsys.readouterr().out)
    assert [entry["rank"] for entry in group["ranks"]] == list(range(WORLD))
    for entry in group["ranks"]:
        assert entry["status"] == "ok" and entry["world_size"] == WORLD
        assert entry["kv"]["final_bytes"] == rank_kv_bytes
        assert (entry["kv"]["tokens_held"], entry["kv"]["batch"]) == (tokens, example.BATCH)
    assert group["kv"]["final_bytes"] == WORLD * rank_kv_bytes

    # AND one rank's report is that rank's share: 1 of the model's 2 KV heads
    assert main(["report", str(out / "rank-0"), "--json"]) == 0
    rank_kv = json.loads(capsys.readouterr().out)["kv"]
    assert rank_kv["final_bytes"] == rank_kv_bytes
    assert rank_kv["rank_heads"] == {
        "rank": 0,
        "world_size": WORLD,
        "kv_heads_held": size.num_kv_heads // WORLD,
        "model_kv_heads": size.num_kv_heads,
    }


# The example's model and generate(), with no kvtrace in it: `kvtrace run` records it
_PLAIN_SCRIPT = """
import sys
import torch, torch.distributed as dist
from transformers import LlamaForCausalLM
from transformers.distributed import DistributedConfig
sys.path.insert(0, {examples!r})
from record_tensor_parallel import BATCH, NEW_TOKENS, PROMPT_TOKENS, SIZE
from kvtrace.llama import build_model

dist.init_process_group("gloo")
distributed, _, mesh = LlamaForCausalLM.prepare_distribute_model(DistributedConfig(tp_plan="auto"))
model = LlamaForCausalLM.maybe_distribute_model(build_model(SIZE, device="cpu", seed=0), distributed, mesh)
torch.manual_seed(1)
ids = torch.randint(3, SIZE.vocab_size, (BATCH, PROMPT_TOKENS))
model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
               do_sample=False)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def torchrun_group(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The example's job as a script of its own, with no kvtrace in it, run by `kvtrace run` under
    torchrun: recording starts before the script joins its process group, and the script leaves it
    (destroy_process_group) before the recording ends. The group's folder, and what the ranks printed to
    stderr."""
    tmp_path = tmp_path_factory.mktemp("torchrun")
    script, out = tmp_path / "job.py", tmp_path / "tp"
    script.write_text(_PLAIN_SCRIPT.format(examples=str(ROOT / "examples")), encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PET_MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    run = [sys.executable, "-m", "kvtrace.cli", "run", "-o", str(out), str(script)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(WORLD),
        "--no-python",
        *run,
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stderr


def test_kvtrace_run_under_torchrun_writes_one_run_per_rank(
    torchrun_group: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the job run by `kvtrace run` under torchrun (every rank recorded into one folder, each refusing
    # the other's lock, and the job failed)
    out, _ = torchrun_group

    # THEN each rank wrote its own run (the launcher's RANK and WORLD_SIZE), and the group reads as the
    # example's: each rank's half of the KV heads, 11,264 B
    rank_kv_bytes = _rank_kv_bytes()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["rank-0", "rank-1"]
    assert main(["report", str(out), "--json", "--no-export"]) == 0
    group = json.loads(capsys.readouterr().out)
    assert [(r["rank"], r["status"], r["world_size"]) for r in group["ranks"]] == [(0, "ok", 2), (1, "ok", 2)]
    assert [r["kv"]["final_bytes"] for r in group["ranks"]] == [rank_kv_bytes] * WORLD


def test_kvtrace_run_under_torchrun_records_the_backend_its_script_joined(
    torchrun_group: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the job run by `kvtrace run` under torchrun: each rank's recording started before the script's
    # init_process_group("gloo"), and ended after its destroy_process_group()
    out, _ = torchrun_group
    # THEN each rank's manifest says the backend the script joined (it said none: unknown at the start)
    manifests = [json.loads((out / f"rank-{r}" / "manifest.json").read_text()) for r in range(WORLD)]
    assert [(m["rank"], m["world_size"], m["backend"]) for m in manifests] == [(0, 2, "gloo"), (1, 2, "gloo")]
    # AND the export's runs table has it, as for a rank recorded inside its group
    assert main(["export", str(out), "-o", str(tmp_path / "tables"), "-q"]) == 0
    capsys.readouterr()
    sql = "SELECT rank, backend FROM runs ORDER BY rank"
    assert main(["query", str(tmp_path / "tables"), "--json", sql]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"rank": 0, "backend": "gloo"},
        {"rank": 1, "backend": "gloo"},
    ]


def test_kvtrace_run_under_torchrun_names_each_ranks_own_run(torchrun_group: tuple[Path, str]) -> None:
    # GIVEN the job run by `kvtrace run` under torchrun, each rank recording into the group's rank-<r>
    out, stderr = torchrun_group
    # THEN each rank's last line names its own run, and the group's commands next (each said "recorded
    # OUT", the group's folder, as if it were its run)
    said = sorted(line for line in stderr.splitlines() if line.startswith("kvtrace run: recorded "))
    assert said == [
        f"kvtrace run: recorded {out / f'rank-{rank}'}, this rank's run of the group {out} (model "
        f"LlamaForCausalLM); next: kvtrace report {out}, kvtrace diagnose {out}"
        for rank in range(WORLD)
    ]


def test_compare_says_the_groups_kv_is_every_ranks_and_its_peak_one_ranks(
    torchrun_group: tuple[Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the job's group beside its rank 0 alone: each rank holds half the KV heads of every token fed
    out, _ = torchrun_group
    rank_kv_bytes = _rank_kv_bytes()
    assert main(["report", str(out), "--json"]) == 0
    group = json.loads(capsys.readouterr().out)
    peak_rank = group["peak_rank"]
    rank_peaks = [entry["peak_allocated_bytes"] for entry in group["ranks"]]
    rank_kv_peaks = [entry["kv"]["peak_bytes"] for entry in group["ranks"]]

    # WHEN compared, as JSON
    assert main(["compare", str(out), str(out / "rank-0"), "--json", "-q"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]

    # THEN the group's KV is both ranks' (as report sums it), its peak the highest rank's, and each row says
    # how many ranks its KV counts and whose device its peak is; the single run is one rank's
    assert [r["label"] for r in runs] == ["tp", "rank-0"]
    grouped, alone = runs
    assert (grouped["kv_final_bytes"], grouped["kv_ranks"]) == (WORLD * rank_kv_bytes, WORLD)
    assert grouped["kv_peak_bytes"] == sum(rank_kv_peaks) == group["kv"]["peak_bytes"]
    assert (grouped["peak_bytes"], grouped["peak_rank"]) == (max(rank_peaks), peak_rank)
    assert (alone["kv_final_bytes"], alone["kv_ranks"], alone["peak_rank"]) == (rank_kv_bytes, 1, None)

    # AND the text says the same in its row names and cells
    assert main(["compare", str(out), str(out / "rank-0"), "-q"]) == 0
    lines = [re.split(r"\s{2,}", line.strip()) for line in capsys.readouterr().out.splitlines()[1:]]
    rows = {name: cells for name, *cells in lines}
    kib = rank_kv_bytes / 1024
    assert rows["KV final (all ranks)"] == [f"{WORLD * kib:.2f} KiB ({WORLD} ranks)", f"{kib:.2f} KiB"]
    assert rows["peak allocated (one rank)"][0].endswith(f" (rank {peak_rank}: highest)")
    assert "peak allocated" not in rows and "KV final" not in rows
