"""engine_requests.jsonl follows the rule of a run's other logs: a finished run's manifest counts its lines
(`engine.engine_requests`), and a copy cut after the run ended (mid-line, or at a line boundary) is refused
in one line naming the file and both counts. It used to read with 2 preemptions of 6 and remedies priced on
a third of the requests. Runs recorded before the count (the committed vLLM samples) are checked for a cut
last line and against the manifest's preemptions. A missing request log is read as a missing weights.jsonl
is, with a note, and no remedy is priced on the requests it lost (it read as "0 requests" and a pool of one
block "fitted"). Also `plan --engine vllm`: a truncated manifest is refused as report refuses it, and profile
flags typed where kv_cache_memory_bytes sizes the pool are said to be ignored.

Real files: transformers' continuous batching recorded on a tiny Llama 3 (the recorder's count), the
committed vLLM sample runs (read without vLLM). Every count is taken from the raw files."""

from __future__ import annotations

import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import kvtrace
from kvtrace.cli import main
from tests.cb_versions import SECTOR_POOL

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
LAYERS, KV_HEADS, PAGE = 2, 2, 4  # cb_model's geometry
PROMPTS = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11], [12, 13, 14]]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str], status: int = 0) -> tuple[str, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == status, capsys.readouterr().err
    return out.getvalue(), capsys.readouterr().err


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a refused command prints, after checking it is one line, exit 2, no traceback."""
    _, err = _cli(argv, capsys, status=2)
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sample(tmp_path: Path, name: str = "vllm_preempt") -> Path:
    return Path(shutil.copytree(SAMPLES / name, tmp_path / name))


@pytest.fixture(scope="module")
def cb_run(tmp_path_factory: pytest.TempPathFactory, cb_model: torch.nn.Module) -> Path:
    """A finished continuous-batching run whose 8 usable blocks make the scheduler take requests out."""
    run = tmp_path_factory.mktemp("cb") / "run"
    generation = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=8, page_size=PAGE, max_batch_tokens=64)
    with kvtrace.record(run, model=cb_model, profiler=False):
        cb_model.generate_batch(
            PROMPTS, generation_config=generation, continuous_batching_config=batching, progress_bar=False
        )
    return run


@SECTOR_POOL
def test_the_manifest_counts_the_request_log_lines(cb_run: Path) -> None:
    # GIVEN a finished run recorded with a pool small enough to preempt
    manifest = json.loads((cb_run / "manifest.json").read_text())
    logged = _lines(cb_run / "engine_requests.jsonl")
    assert [r for r in logged if r["event"] == "preempted"]
    # THEN its manifest counts every line the recorder wrote, as it counts the steps
    assert manifest["engine"]["engine_requests"] == len(logged)
    assert manifest["engine"]["engine_steps"] == len(_lines(cb_run / "engine_steps.jsonl"))


@SECTOR_POOL
@pytest.mark.parametrize("command", ["report", "diagnose"])
@pytest.mark.parametrize("cut_mid_line", [False, True], ids=["at_a_line_boundary", "mid_line"])
def test_a_counted_request_log_cut_after_the_run_is_refused_naming_both_counts(
    cb_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, cut_mid_line: bool
) -> None:
    # GIVEN a copy of the run whose request log keeps its first half of lines (a partial copy), the next one
    # cut after its first 17 bytes where asked
    run = Path(shutil.copytree(cb_run, tmp_path / "run"))
    log = run / "engine_requests.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    kept = len(lines) // 2
    log.write_text("".join(lines[:kept]) + (lines[kept][:17] if cut_mid_line else ""))
    # WHEN read, THEN refused in one line naming the file, the lines left and the lines written
    last = ", the last one cut" if cut_mid_line else ""
    said = (
        f"{log}: damaged after the run ended: {kept} complete lines of the {len(lines)} the manifest counts"
    )
    assert _refused([command, str(run)], capsys) == f"kvtrace {command}: error: {said}{last}"


@pytest.mark.parametrize("command", ["report", "diagnose"])
def test_an_older_runs_request_log_cut_mid_line_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # GIVEN the vLLM sample, recorded before the manifest counted the log's lines, its log cut at half + 17
    # bytes (the walkthrough's damage: it read as fewer preemptions and tokens, exit 0)
    run = _sample(tmp_path)
    log = run / "engine_requests.jsonl"
    data = log.read_bytes()
    log.write_bytes(data[: len(data) // 2 + 17])
    assert not log.read_bytes().endswith(b"\n")
    # THEN refused, the cut named
    said = f"{log}: damaged after the run ended: its last line is cut"
    assert _refused([command, str(run)], capsys) == f"kvtrace {command}: error: {said}"


@pytest.mark.parametrize("kept", [8, 0], ids=["one_preemption_left", "emptied"])
def test_an_older_runs_request_log_short_of_its_preemptions_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kept: int
) -> None:
    # GIVEN the vLLM sample (its manifest counts 2 preemptions, its log holds 2 `preempted` lines), its log
    # cut at a line boundary that leaves `kept` lines
    run = _sample(tmp_path)
    log = run / "engine_requests.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    counted = json.loads((run / "manifest.json").read_text())["engine"]["preemptions"]
    assert counted == sum(json.loads(line)["event"] == "preempted" for line in lines) == 2
    log.write_text("".join(lines[:kept]))
    left = sum(json.loads(line)["event"] == "preempted" for line in lines[:kept])
    # THEN refused by the preemptions it lost
    said = (
        f"{log}: damaged after the run ended: {left} preempted lines of the {counted} preemptions the "
        "manifest counts"
    )
    assert _refused(["diagnose", str(run)], capsys) == f"kvtrace diagnose: error: {said}"


def test_a_missing_request_log_is_noted_and_prices_no_remedy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the vLLM sample that preempted twice, its request log gone (as weights.jsonl may be)
    run = _sample(tmp_path)
    log = run / "engine_requests.jsonl"
    log.unlink()
    steps = _lines(run / "engine_steps.jsonl")
    first = min(s["step"] for s in steps if s["preempted"])
    # WHEN diagnosed
    out, _ = _cli(["diagnose", str(run), "--json"], capsys)
    diagnosis = json.loads(out)
    # THEN the preemptions are said from the steps, and no remedy is priced on requests it does not have
    assert (diagnosis["kind"], diagnosis["preemptions"]) == ("preemption", 2)
    assert diagnosis["first_preemption_step"] == first
    assert diagnosis["requests"] is None and diagnosis["remedies"] == []
    note = (
        f"{log} is missing while the manifest counts 2 preemptions: the requests, the KV tokens preemptions "
        "dropped and the demand remedies are priced on are unknown, and no preemption remedy is priced"
    )
    assert diagnosis["notes"] == [note]
    text, _ = _cli(["diagnose", str(run)], capsys)
    assert "[fits]" not in text and "[no]" not in text and f"  note: {note}" in text
    # AND the report says the requests and the tokens dropped are unknown, not 0
    out, _ = _cli(["report", str(run), "--json", "--no-export", "-q"], capsys)
    engine = json.loads(out)["engine"]
    assert (engine["preemptions"], engine["requests"], engine["preempted_tokens"]) == (2, None, None)
    # (nor how they finished: it said {} and 0 aborted)
    assert (engine["finish_reasons"], engine["requests_aborted"], engine["preemptions_by_request"]) == (
        None,
        None,
        None,
    )
    text, _ = _cli(["report", str(run), "--no-export", "-q"], capsys)
    assert "requests unknown (no request log)" in text and " 0 requests" not in text
    assert f"preemptions: 2 (first at step {first}), tokens dropped unknown" in text
    assert f"note: {log} is listed in the manifest but missing: the requests," in text
    # AND within a memory budget, the pool priced says it holds the run's peak (its whole pool: it took
    # requests out) and that what they needed is unknown, not "the 0 its requests needed"
    text, _ = _cli(["diagnose", str(run), "--budget", "1GiB"], capsys)
    assert "its requests needed at once" not in text, text
    assert (
        "the run used at its peak, its whole pool: it took requests out, and what they needed at once is not "
        in text
    )


def test_an_older_runs_emptied_request_log_without_preemptions_is_noted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the vLLM sample recorded before the counts, its manifest without preemptions, its log emptied:
    # only its steps say it ran requests
    run = _sample(tmp_path)
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["engine"]["preemptions"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    log = run / "engine_requests.jsonl"
    log.write_text("")
    steps = _lines(run / "engine_steps.jsonl")
    busy = sum(1 for s in steps if s["tokens_scheduled"] or s["running"] or s["waiting"])
    assert 0 < busy <= len(steps)
    # THEN diagnose prices no remedy and says why
    diagnosis = json.loads(_cli(["diagnose", str(run), "--json"], capsys)[0])
    assert diagnosis["remedies"] == [] and diagnosis["requests"] is None
    assert diagnosis["notes"] == [
        f"{log} is empty while {busy:,} engine steps ran requests: the requests, the KV tokens preemptions "
        "dropped and the demand remedies are priced on are unknown, and no preemption remedy is priced"
    ]


def test_plan_from_a_run_with_a_truncated_manifest_is_refused_as_report_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the vLLM sample whose manifest.json lost its second half
    run = _sample(tmp_path)
    manifest = run / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    # THEN plan refuses it with report's line
    report = _refused(["report", str(run), "--no-export", "-q"], capsys)
    plan = _refused(["plan", "--engine", "vllm", "--from-run", str(run)], capsys)
    assert report.startswith(f"kvtrace report: error: {manifest}: corrupt manifest (")
    assert plan == report.replace("kvtrace report:", "kvtrace plan:", 1)


def test_plan_says_profile_flags_are_ignored_where_kv_cache_memory_bytes_sizes_the_pool(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the vLLM sample, whose engine.json says kv_cache_memory_bytes sized its pool
    run = SAMPLES / "vllm_preempt"
    kv_memory = json.loads((run / "engine.json").read_text())["config"]["kv_cache_memory_bytes"]
    assert kv_memory == 2**20
    plan = ["plan", "--engine", "vllm", "--from-run", str(run), "--json"]
    plain = json.loads(_cli(plan, capsys)[0])
    # WHEN planned with the weights and activation peak typed
    typed = json.loads(_cli([*plan, "--weights-bytes", "500MiB", "--activation-peak", "1GiB"], capsys)[0])
    # THEN the pool is the same, and a note says the flags were ignored and why
    assert (typed["num_blocks"], typed["available_kv_bytes"]) == (plain["num_blocks"], kv_memory)
    assert typed["notes"] == [
        *plain["notes"],
        f"--weights-bytes, --activation-peak ignored: kv_cache_memory_bytes (1.00 MiB, the run's, {run}) "
        "sizes the pool, as it does in vLLM, which then takes no share of the memory by "
        "gpu_memory_utilization less the weights, activation peak and non-torch memory",
    ]
    # AND so with the size typed and a utilization beside it
    sized = [
        "plan",
        "--engine",
        "vllm",
        "--preset",
        "llama-3-8b",
        "--max-model-len",
        "4096",
        "--kv-cache-memory",
        "1GiB",
        "--json",
    ]
    alone = json.loads(_cli(sized, capsys)[0])
    both = json.loads(_cli([*sized, "--gpu-memory-utilization", "0.5"], capsys)[0])
    assert both["num_blocks"] == alone["num_blocks"]
    assert both["notes"] == [
        *alone["notes"],
        "--gpu-memory-utilization ignored: kv_cache_memory_bytes (1.00 GiB, --kv-cache-memory) sizes the "
        "pool, as it does in vLLM, which then takes no share of the memory by gpu_memory_utilization less "
        "the weights, activation peak and non-torch memory",
    ]


def test_compare_says_the_request_counts_of_a_run_without_its_request_log_are_unknown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the vLLM sample that preempted twice, and a copy of it whose request log is gone
    whole = _sample(tmp_path)
    lost = Path(shutil.copytree(whole, tmp_path / "lost"))
    log = lost / "engine_requests.jsonl"
    logged = _lines(log)
    log.unlink()
    requests = len({r["request_id"] for r in logged})
    dropped = sum(r["dropped_tokens"] for r in logged if r["event"] == "preempted")
    last: dict[str, int] = {}
    for r in logged:  # each request's output at its last event, as compare counts them
        last[r["request_id"]] = max(last.get(r["request_id"], 0), r["output_tokens"])
    output = sum(last.values())
    assert (requests, dropped, output) == (8, 2 * 64, 8 * 48)
    # WHEN compared
    runs = json.loads(_cli(["compare", str(whole), str(lost), "--json"], capsys)[0])["runs"]
    # THEN the whole run's counts are its log's, and the copy's are unknown (null), not 0; the pool's and the
    # steps' figures (preemptions from engine_steps.jsonl) stay
    counted = ("requests", "failed_requests", "aborted_requests", "preempted_tokens", "output_tokens")
    assert [runs[0]["engine"][key] for key in counted] == [requests, 0, 0, dropped, output]
    assert [runs[1]["engine"][key] for key in counted] == [None] * 5
    assert (runs[1]["engine"]["preemptions"], runs[1]["engine"]["num_blocks"]) == (2, 16)
    assert runs[1]["tokens_per_second"] is None
    assert any(note.startswith(f"{log} is listed in the manifest but missing") for note in runs[1]["notes"])
    # AND the table shows them as "-", as it shows every unknown
    table = _cli(["compare", str(whole), str(lost)], capsys)[0]
    cells = {
        line[:36].strip(): line[36:].split() for line in table.splitlines() if line.startswith("engine ")
    }
    assert cells["engine requests"] == [str(requests), "-"]
    assert cells["engine failed requests"] == cells["engine aborted requests"] == ["0", "-"]
    assert cells["engine preempted tokens"] == [str(dropped), "-"]
    assert cells["engine output tokens (all requests)"] == [str(output), "-"]
    assert cells["engine preemptions"] == ["2", "2"]


def test_plan_says_what_gpu_memory_does_where_kv_cache_memory_bytes_sizes_the_pool(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a vLLM plan whose pool kv_cache_memory_bytes sizes (1 GiB of Llama 3 8B's 131,072 B a token in
    # blocks of 16: 512 blocks), on a GPU by default
    sized = [
        "plan",
        "--engine",
        "vllm",
        "--preset",
        "llama-3-8b",
        "--max-model-len",
        "4096",
        "--kv-cache-memory",
        "1GiB",
        "--json",
    ]
    why = (
        "kv_cache_memory_bytes (1.00 GiB, --kv-cache-memory) sizes the pool, as it does in vLLM, which then "
        "takes no share of the memory by gpu_memory_utilization less the weights, activation peak and "
        "non-torch memory"
    )
    alone = json.loads(_cli(sized, capsys)[0])
    assert (alone["num_blocks"], alone["max_num_batched_tokens"]) == (2**30 // (131_072 * 16), 16_384)
    # WHEN a 40 GiB GPU is typed: the pool is the same, but vLLM's default max_num_batched_tokens on a GPU
    # under 70 GiB is 8,192 (min(256 x 4,096, 8,192)) where an 80 GiB one's is 16,384
    gpu = json.loads(_cli([*sized, "--gpu-memory", "40GiB"], capsys)[0])
    assert (gpu["num_blocks"], gpu["max_num_batched_tokens"]) == (alone["num_blocks"], 8_192)
    # THEN the note says the flag does not size the pool, and what it still does
    picks = (
        "picks only vLLM 0.32's default max_num_batched_tokens, 8,192 on a GPU of 40.00 GiB "
        "(--max-num-batched-tokens sets it)"
    )
    assert gpu["notes"] == [*alone["notes"], f"--gpu-memory does not size the pool: {why}; it {picks}"]
    both = json.loads(_cli([*sized, "--gpu-memory", "40GiB", "--gpu-memory-utilization", "0.5"], capsys)[0])
    assert both["notes"] == [
        *alone["notes"],
        f"--gpu-memory-utilization ignored: {why}; --gpu-memory {picks}",
    ]
    # AND where max_num_batched_tokens is typed, the GPU's memory changes nothing: ignored, as the others
    batched = [*sized, "--max-num-batched-tokens", "2048"]
    typed = json.loads(
        _cli([*batched, "--gpu-memory", "40GiB", "--gpu-memory-utilization", "0.5"], capsys)[0]
    )
    assert typed["max_num_batched_tokens"] == 2_048
    assert typed["notes"] == [
        *json.loads(_cli(batched, capsys)[0])["notes"],
        f"--gpu-memory, --gpu-memory-utilization ignored: {why}",
    ]
    # AND so of a run on a CPU, whose defaults no GPU's memory picks
    run = SAMPLES / "vllm_preempt"
    plan = ["plan", "--engine", "vllm", "--from-run", str(run), "--json"]
    plain = json.loads(_cli(plan, capsys)[0])
    on_cpu = json.loads(_cli([*plan, "--kv-cache-memory", "1MiB", "--gpu-memory", "40GiB"], capsys)[0])
    assert (on_cpu["num_blocks"], on_cpu["max_num_batched_tokens"]) == (
        plain["num_blocks"],
        plain["max_num_batched_tokens"],
    )
    assert on_cpu["notes"][-1] == (
        "--gpu-memory ignored: kv_cache_memory_bytes (1.00 MiB, --kv-cache-memory) sizes the pool, as it "
        "does in vLLM, which then takes no share of the memory by gpu_memory_utilization less the weights, "
        "activation peak and non-torch memory"
    )
