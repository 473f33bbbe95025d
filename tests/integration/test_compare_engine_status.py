"""`kvtrace compare` of serving configurations says how each engine's run went, not only its memory: whether
the engine failed the run (engine.json's `failure`), how many requests it failed, and its preemptions, a row
per fact in the text, the JSON and the HTML page; "-" with the reason where a run has no engine.

Real runs: transformers' continuous batching (`generate_batch`) on the tiny random Llama 3 (2 layers, 2 KV
heads, head_dim 16, float32, 4-token blocks), one whose pool of 3 usable blocks cannot hold its request's
13th token (transformers stops the run at engine step 4 and fails it), one where transformers fails one
request of three on its own (a logits-processor argument it cannot apply) and runs the others to their end;
the vLLM sample run that preempted, and a generate() sample run. Expected figures come from the block
arithmetic and each run's raw files, never from the code under test."""

from __future__ import annotations

import html
import io
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import kvtrace
from kvtrace.cli import main
from kvtrace.llama import build_model
from tests.cb_versions import SECTOR_POOL
from tests.tiny import tiny_size

pytestmark = SECTOR_POOL

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
PAGE, USABLE, MAX_NEW = 4, 3, 6
PROMPT = list(range(1, 11))  # 10 tokens: 3 usable blocks hold 12, its 13th token needs a 4th block
FAILED_STEP = 1 + (USABLE * PAGE - len(PROMPT)) + 1  # prefill, 2 decodes, then the step it cannot schedule
NEEDED = math.ceil((USABLE * PAGE + 1) / PAGE)  # 4
ALONE = {"good_0": [1, 2, 3, 4, 5], "bad_1": [6, 7, 8], "good_2": [9, 10, 11, 12]}
RUNS = ("no_blocks", "one_failed", "vllm_preempt", "static_b2")
DIED_STEP = 8
DIED_PROMPTS = {f"r{i}": list(range(10 * i + 1, 10 * i + 6)) for i in range(4)}


def _generation() -> GenerationConfig:
    return GenerationConfig(max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=-1, pad_token_id=0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, watched_models: list[torch.nn.Module]) -> Path:
    """GIVEN the four runs side by side in one folder (the samples copied: compare reads, never writes)."""
    root = tmp_path_factory.mktemp("engine_status")
    model = build_model(tiny_size(2, 2), dtype=torch.float32)
    watched_models.append(model)
    with kvtrace.record(root / "no_blocks", model=model, profiler=False):
        model.generate_batch(
            [PROMPT],
            generation_config=_generation(),
            continuous_batching_config=ContinuousBatchingConfig(num_blocks=USABLE, page_size=PAGE),
            progress_bar=False,
        )
    with kvtrace.record(root / "one_failed", model=model, profiler=False):
        batching = ContinuousBatchingConfig(num_blocks=32, page_size=PAGE, max_batch_tokens=64)
        manager = model.init_continuous_batching(
            generation_config=_generation(), continuous_batching_config=batching
        )
        manager.start()
        for request_id, prompt in ALONE.items():
            manager.add_request(
                prompt, request_id=request_id, **({"bogus_kwarg": 1} if "bad" in request_id else {})
            )
        finished: set[str] = set()
        while len(finished) < len(ALONE):
            result = manager.get_result(timeout=10)
            assert result is not None
            if result.is_finished():
                finished.add(result.request_id)
        manager.stop(block=True)
    for name in ("vllm_preempt", "static_b2"):
        shutil.copytree(SAMPLES / name, root / name)
    return root


def _cli(argv: list[str]) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(argv) == 0
    return out.getvalue()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _expected(run: Path) -> dict[str, Any] | None:
    """The engine facts of a run from its raw files: engine.json's status and failure, the requests of its
    log, those that finished with reason "error", the preemptions (one "preempted" line each)."""
    if not (run / "engine.json").exists():
        return None
    engine = json.loads((run / "engine.json").read_text())
    requests = _lines(run / "engine_requests.jsonl")
    return {
        "status": engine["status"],
        "failure": engine.get("failure"),
        "requests": len({r["request_id"] for r in requests}),
        "failed_requests": sum(
            r["event"] == "finished" and r.get("finish_reason") == "error" for r in requests
        ),
        "preemptions": sum(r["event"] == "preempted" for r in requests),
    }


def test_compare_json_says_each_engines_status_failure_and_failed_requests(runs: Path) -> None:
    # WHEN the four runs are compared as JSON
    compared = json.loads(_cli(["compare", *(str(runs / name) for name in RUNS), "--json"]))

    # THEN each engine run's object carries its status, its failure, its requests and those that failed, as
    # its raw files say; the generate() run has no engine
    got = {
        run["label"]: None
        if run["engine"] is None
        else {key: run["engine"][key] for key in _expected(runs / run["label"]) or {}}
        for run in compared["runs"]
    }
    assert got == {name: _expected(runs / name) for name in RUNS}
    # the exact figures of the arithmetic: the pool could not take the 13th token at step 4
    failure = got["no_blocks"]["failure"]
    assert (got["no_blocks"]["status"], failure["step"], failure["reason"]) == (
        "failed",
        FAILED_STEP,
        "no_blocks",
    )
    assert (failure["blocks_needed"], failure["usable_blocks"], failure["requests"]) == (
        NEEDED,
        USABLE,
        ["req_0"],
    )
    assert (got["no_blocks"]["requests"], got["no_blocks"]["failed_requests"]) == (1, 1)
    # the run went on, ok, but failed one request of three
    assert (got["one_failed"]["status"], got["one_failed"]["failure"]) == ("ok", None)
    assert (got["one_failed"]["requests"], got["one_failed"]["failed_requests"]) == (3, 1)
    # vLLM's sample: 8 requests, none failed, preempted twice
    assert got["vllm_preempt"] == {
        "status": "ok", "failure": None, "requests": 8, "failed_requests": 0, "preemptions": 2,
    }  # fmt: skip


def _table(text: str) -> dict[str, list[str]]:
    """The text table's rows as {row name: cells}, cells right-aligned in columns of two spaces or more."""
    rows = {}
    for line in text.splitlines()[1:]:
        if line.startswith("note: "):
            break
        name, *cells = re.split(r"\s{2,}", line.strip())
        rows[name] = cells
    return rows


def test_compare_text_and_page_have_a_row_per_engine_fact(runs: Path, tmp_path: Path) -> None:
    # WHEN the four runs are compared as text, and as a page
    page = tmp_path / "compare.html"
    text = _cli(["compare", *(str(runs / name) for name in RUNS), "-o", str(page)])

    # THEN a row says each engine's status (the step it failed at and why), its requests, those failed, and
    # its preemptions; the generate() run's engine cell says why its engine rows are "-"
    rows = _table(text)
    assert rows["engine"] == ["transformers-cb", "transformers-cb", "vllm", "- (no engine)"]
    assert rows["engine status"] == [f"failed at engine step {FAILED_STEP} (no blocks)", "ok", "ok", "-"]
    assert rows["engine requests"] == ["1", "3", "8", "-"]
    assert rows["engine failed requests"] == ["1", "1", "0", "-"]
    # none of them cancelled a request (kvtrace logs transformers' cancelled ones as aborted: none is 0)
    assert rows["engine aborted requests"] == ["0", "0", "0", "-"]
    assert rows["engine preemptions"] == ["0", "0", "2", "-"]
    # AND the notes carry the failure's whole error, and which request failed on its own and why
    assert (
        f"note: no_blocks: continuous batching: the run failed at engine step {FAILED_STEP}: its scheduler "
        f"could place no request in the pool of {USABLE} usable blocks; request req_0 needed {NEEDED} blocks "
        "(RuntimeError: No requests can be scheduled and no requests can be offloaded.)"
    ) in text
    assert "note: one_failed: continuous batching: 1 request(s) failed on their own" in text
    assert "aborted requests unknown" not in text
    # AND the page's table has the same rows and cells
    cells = re.findall(r"<tr><th>(.*?)</th>((?:<td>.*?</td>)*)</tr>", page.read_text())
    on_page = {
        html.unescape(name): [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
        for name, row in cells
    }
    for name in (
        "engine",
        "engine status",
        "engine requests",
        "engine failed requests",
        "engine aborted requests",
        "engine preemptions",
    ):
        assert on_page[name] == rows[name]


def test_a_continuous_batching_run_recorded_before_failed_requests_were_counted_says_unknown(
    runs: Path, tmp_path: Path
) -> None:
    # GIVEN the run that failed a request on its own, its files as kvtrace wrote them before it counted them:
    # no failed_requests in the manifest, no failed_requests_logged in engine.json, and no line for the
    # request failed on its own
    old = shutil.copytree(runs / "one_failed", tmp_path / "old_one_failed")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["engine"]["failed_requests"], manifest["engine"]["engine_requests"]  # no line count either
    (old / "manifest.json").write_text(json.dumps(manifest))
    engine = json.loads((old / "engine.json").read_text())
    del engine["failed_requests_logged"]
    (old / "engine.json").write_text(json.dumps(engine))
    log = old / "engine_requests.jsonl"
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["request_id"] != "bad_1"]
    log.write_text("\n".join(kept) + "\n")

    # WHEN compared
    compared = json.loads(_cli(["compare", str(old), str(runs / "one_failed"), "--json"]))

    # THEN its failed requests are unknown (null, "-"), not 0, and a note says why
    assert [run["engine"]["failed_requests"] for run in compared["runs"]] == [None, 1]
    assert (
        "engine failed requests unknown: the run was recorded before kvtrace logged every request "
        "transformers failed (no failed_requests in its manifest's engine, no error on a failed request in "
        "engine_requests.jsonl)"
    ) in compared["runs"][0]["notes"]
    assert not any("failed requests unknown" in note for note in compared["runs"][1]["notes"])
    assert _table(_cli(["compare", str(old), str(runs / "one_failed")]))["engine failed requests"] == [
        "-",
        "1",
    ]


_DIED = textwrap.dedent(
    f"""
    import os, sys, time
    import torch
    import transformers.generation.continuous_batching.continuous_api as ca
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    torch.manual_seed(0)
    model = build_model(tiny_size(2, 2), dtype=torch.float32)
    generation_step = ca.ContinuousBatchProcessor._generation_step
    steps = []

    def step(self, model):
        steps.append(1)
        if len(steps) == {DIED_STEP}:
            time.sleep(0.15)  # a hanging step: the writer thread writes the lines of those before it
            os._exit(1)  # the process dies mid-run (a kill -9, a crash): no block end, no engine summary
        return generation_step(self, model)

    ca.ContinuousBatchProcessor._generation_step = step
    generation = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=64, page_size={PAGE}, max_batch_tokens=64)
    with kvtrace.record(sys.argv[1], model=model, profiler=False):
        manager = model.init_continuous_batching(
            generation_config=generation, continuous_batching_config=batching
        )
        manager.start()
        for request_id, prompt in {DIED_PROMPTS}.items():
            # sys.argv[2] names the request given a kwarg it cannot apply ("" for none)
            refused = {{"bogus_kwarg": 1}} if request_id == sys.argv[2] else {{}}
            manager.add_request(prompt, request_id=request_id, **refused)
        while True:
            manager.get_result(timeout=60)
    """
)


def _died_run(run: Path, refused: str) -> Path:
    """`_DIED` recorded into `run` in a child process that dies at engine step 8, `refused` (a request id, or
    "") failed by transformers on its own first; its manifest never got its `engine` count."""
    done = subprocess.run(
        [sys.executable, "-c", _DIED, str(run), refused],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=SAMPLES.parent,
    )
    assert done.returncode == 1, done.stderr
    manifest = json.loads((run / "manifest.json").read_text())
    assert (manifest["ended"], "engine" in manifest) == ({"status": "running"}, False)
    return run


def test_a_run_whose_process_died_counts_its_failed_requests_from_its_log(tmp_path: Path) -> None:
    # GIVEN a real continuous-batching run whose process died at engine step 8, after transformers failed r1
    # on its own (a logits-processor argument it cannot apply): the manifest never got its `engine` count
    run = _died_run(tmp_path / "died", "r1")
    failed = [
        r["request_id"]
        for r in _lines(run / "engine_requests.jsonl")
        if r["event"] == "finished" and r.get("finish_reason") == "error"
    ]
    assert failed == ["r1"]

    # WHEN it is compared, reported and diagnosed
    compared = json.loads(_cli(["compare", str(run), str(run), "--json"]))
    report = _cli(["report", str(run), "--no-export"])
    diagnosis = json.loads(_cli(["diagnose", str(run), "--json"]))

    # THEN compare counts r1 failed, as its log, the report and diagnose do, with no note calling it unknown
    assert compared["runs"][0]["engine"]["failed_requests"] == len(failed) == 1
    assert compared["runs"][0]["engine"]["requests"] == len(DIED_PROMPTS)
    assert not any("failed requests unknown" in note for note in compared["runs"][0]["notes"])
    assert diagnosis["failed_requests"] == failed
    assert _table(_cli(["compare", str(run), str(run)]))["engine failed requests"] == ["1", "1"]
    assert f"{len(DIED_PROMPTS)} requests (0 completed, 1 failed)" in report


def test_a_run_whose_process_died_failing_no_request_counts_none_failed(tmp_path: Path) -> None:
    # GIVEN the same run, every request valid: its process died at engine step 8 with none failed, and its
    # manifest never got its `engine` count; its engine.json, written with the pool, says the request log
    # names every request transformers fails
    run = _died_run(tmp_path / "died_none_failed", "")
    requests = _lines(run / "engine_requests.jsonl")
    assert {r["request_id"] for r in requests} == set(DIED_PROMPTS)
    assert not [r for r in requests if r["event"] == "finished"]  # 40 new tokens each: none got there
    assert json.loads((run / "engine.json").read_text())["failed_requests_logged"] is True

    # WHEN it is compared
    compared = json.loads(_cli(["compare", str(run), str(run), "--json"]))

    # THEN it failed none, known (0, not null), with no note calling it unknown, in the text's row too
    assert compared["runs"][0]["engine"]["failed_requests"] == 0
    assert compared["runs"][0]["engine"]["requests"] == len(DIED_PROMPTS)
    assert not any("failed requests unknown" in note for note in compared["runs"][0]["notes"])
    rows = _table(_cli(["compare", str(run), str(run)]))
    assert rows["engine requests"] == [str(len(DIED_PROMPTS))] * 2
    assert rows["engine failed requests"] == ["0", "0"]

    # AND the same run as kvtrace recorded it before engine.json said so is unknown, and its note says why
    old = shutil.copytree(run, tmp_path / "old_died")
    engine = json.loads((old / "engine.json").read_text())
    del engine["failed_requests_logged"]
    (old / "engine.json").write_text(json.dumps(engine))
    compared = json.loads(_cli(["compare", str(old), str(run), "--json"]))
    assert [r["engine"]["failed_requests"] for r in compared["runs"]] == [None, 0]
    assert (
        "engine failed requests unknown: the run never finished, so its manifest does not count them, and "
        "its engine.json does not say that engine_requests.jsonl names every request transformers failed "
        "(no failed_requests_logged: recorded before kvtrace wrote it): that the log names none failed does "
        "not say none failed"
    ) in compared["runs"][0]["notes"]
