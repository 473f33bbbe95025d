"""The KV Cache TensorBoard plugin in a real `tensorboard` server, read by curl-like requests and by headless
Chromium, next to the PyTorch Profiler plugin on the same log directory.

The log directory holds real recorded runs (copies of `sample_traces/`, a vLLM one among them, and a
two-step run recorded here), one of them turned into an OOM run by its manifest, and two broken ones: a
manifest of garbage and a KV log with a corrupt line mid-file.
Every figure the plugin serves is compared with what `kvtrace report/diagnose --json` print for that run,
or rebuilt from the raw files here.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from html import escape, unescape
from pathlib import Path
from typing import Any

import pytest

from kvtrace.cli import main as kvtrace_main
from tests.cb_versions import SECTOR_POOL
from tests.plotly_figures import decoded, page_figure

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"
PLUGIN = "kvcache"
STARTUP_LIMIT_S = 90.0
CHROMIUM = shutil.which("chromium")
GOOD_RUNS = ("dynamic_b2", "oom_b2", "short_b1", "sliding_b2")
ENGINE_RUNS = ("vllm_preempt",)
BROKEN_RUNS = ("broken_manifest", "corrupt_log")
# Chromium itself (not the page) calls home for updates and accounts; those requests carry no page
# origin as initiator. Every request the page makes names the page's origin.
BROWSER_ONLY_INITIATOR = "not an origin"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _get_json(url: str) -> tuple[int, Any]:
    status, body = _get(url)
    return status, json.loads(body)


def _cli_json(*argv: str) -> Any:
    out = io.StringIO()
    with redirect_stdout(out):
        assert kvtrace_main(list(argv)) == 0
    return json.loads(out.getvalue())


def _record_two_steps(run: Path) -> None:
    """A real run of the tiny Llama generating 2 tokens: its KV log has steps 1 (prefill) and 2."""
    import torch

    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    model = build_model(tiny_size(2))
    ids = torch.randint(3, 1000, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                       do_sample=False, pad_token_id=0)  # fmt: skip


@pytest.fixture(scope="module")
def logdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GIVEN a log directory with real runs, an OOM run and two broken runs."""
    root = tmp_path_factory.mktemp("tb_logdir")
    for name in ("dynamic_b2", "sliding_b2", *ENGINE_RUNS):
        shutil.copytree(SAMPLES / name, root / name)
    _record_two_steps(root / "short_b1")
    # A run that died of an OOM, as the recorder writes it when the block raises OutOfMemoryError.
    oom = shutil.copytree(SAMPLES / "dynamic_b2", root / "oom_b2")
    manifest = json.loads((oom / "manifest.json").read_text())
    manifest["ended"] = {
        "status": "exception",
        "type": "torch.OutOfMemoryError",
        "message": "CUDA out of memory. Tried to allocate 20.00 MiB",
        "t_ns": manifest["ended"]["t_ns"],
    }
    (oom / "manifest.json").write_text(json.dumps(manifest))
    (root / "broken_manifest").mkdir()
    (root / "broken_manifest" / "manifest.json").write_text("{garbage, not json")
    corrupt = root / "corrupt_log"
    corrupt.mkdir()
    shutil.copy(SAMPLES / "sliding_b2" / "manifest.json", corrupt / "manifest.json")
    lines = (SAMPLES / "sliding_b2" / "kv_events.jsonl").read_text().splitlines()
    lines.insert(len(lines) // 2, '{"seq": oops')
    (corrupt / "kv_events.jsonl").write_text("\n".join(lines) + "\n")
    return root


@contextmanager
def _tensorboard(logdir_args: list[str], log_path: Path) -> Iterator[str]:
    """A real TensorBoard on 127.0.0.1 and a free port, serving `logdir_args`; always terminated."""
    port = _free_port()
    # This interpreter's tensorboard, not whichever `tensorboard` is first on PATH (another environment's
    # may not see this checkout's plugin).
    command = [sys.executable, "-m", "tensorboard.main"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [*command, *logdir_args, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            assert proc.poll() is None, f"tensorboard exited: {log_path.read_text()[-2000:]}"
            try:
                status, _ = _get(f"{base}/data/plugins_listing", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"tensorboard not up in {STARTUP_LIMIT_S}s"
            time.sleep(0.5)
        yield base
        assert proc.poll() is None, f"tensorboard crashed: {log_path.read_text()[-2000:]}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(logdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real TensorBoard on the log directory."""
    log_path = tmp_path_factory.mktemp("tb_server") / "tensorboard.log"
    with _tensorboard(["--logdir", str(logdir)], log_path) as base:
        yield base


def _plugin(server: str, route: str) -> str:
    return f"{server}/data/plugin/{PLUGIN}/{route}"


@pytest.mark.slow
def test_both_tabs_are_listed(server: str) -> None:
    _, listing = _get_json(f"{server}/data/plugins_listing")

    assert listing[PLUGIN]["enabled"] is True
    assert listing[PLUGIN]["tab_name"] == "KV Cache"
    assert listing[PLUGIN]["loading_mechanism"]["type"] == "IFRAME"
    assert "pytorch_profiler" in listing
    assert listing["pytorch_profiler"]["enabled"] is True


@pytest.mark.slow
def test_runs_lists_good_runs_and_broken_ones_with_their_error(server: str, logdir: Path) -> None:
    status, listing = _get_json(_plugin(server, "runs"))

    assert status == 200
    runs = {run["name"]: run for run in listing["runs"]}
    assert set(runs) == set(GOOD_RUNS) | set(ENGINE_RUNS) | set(BROKEN_RUNS)
    for name in GOOD_RUNS:
        assert runs[name]["error"] is None
        assert runs[name]["model"] == "LlamaForCausalLM"
    assert "manifest" in runs["broken_manifest"]["error"]
    # The corrupt log is only found by parsing; once tried, the listing carries the error too.
    _, corrupt = _get_json(_plugin(server, "summary?run=corrupt_log"))
    assert "kv_events.jsonl" in corrupt["error"]
    _, listing = _get_json(_plugin(server, "runs"))
    assert "kv_events.jsonl" in {r["name"]: r for r in listing["runs"]}["corrupt_log"]["error"]


@pytest.mark.slow
def test_broken_runs_answer_an_error_and_the_server_keeps_serving(server: str) -> None:
    for route in ("summary", "timeline", "layers", "diagnosis", "pool"):
        status, payload = _get_json(_plugin(server, f"{route}?run=broken_manifest"))
        assert status == 200
        assert "corrupt manifest" in payload["error"]
    status, payload = _get_json(_plugin(server, "summary?run=no_such_run"))
    assert status == 404 and "error" in payload
    status, payload = _get_json(_plugin(server, "summary"))
    assert status == 400
    status, payload = _get_json(_plugin(server, "summary?run=dynamic_b2"))
    assert status == 200 and "error" not in payload


@pytest.mark.slow
@pytest.mark.parametrize("name", GOOD_RUNS + ENGINE_RUNS)
def test_summary_equals_kvtrace_report_json(server: str, logdir: Path, name: str) -> None:
    _, summary = _get_json(_plugin(server, f"summary?run={name}"))

    expected = _cli_json("report", str(logdir / name), "--json", "--no-export", "-q")
    assert summary == expected


@pytest.mark.slow
def test_diagnosis_of_the_oom_run_equals_kvtrace_diagnose_json(server: str, logdir: Path) -> None:
    _, payload = _get_json(_plugin(server, "diagnosis?run=oom_b2"))

    assert payload["diagnosis"] == _cli_json("diagnose", str(logdir / "oom_b2"), "--json")
    assert payload["diagnosis"]["event"] == "oom"
    assert "Tried to allocate 20.00 MiB" in payload["oom"]["message"]
    _, clean = _get_json(_plugin(server, "diagnosis?run=dynamic_b2"))
    assert clean["diagnosis"] is None


@pytest.mark.slow
@pytest.mark.parametrize("points", [200, 5000])
def test_timeline_is_downsampled_with_exact_peaks(server: str, points: int) -> None:
    _, summary = _get_json(_plugin(server, "summary?run=dynamic_b2"))
    _, timeline = _get_json(_plugin(server, f"timeline?run=dynamic_b2&points={points}"))

    (device,) = timeline["devices"]
    (expected,) = summary["devices"]
    # Each of the five series keeps at most ~points of its own; their union is what travels.
    assert device["points"] <= 5 * points
    assert device["points"] < device["events"]
    assert max(device["allocated"]) == expected["peak_allocated_bytes"]
    assert device["allocated"][-1] == expected["final_allocated_bytes"]
    peak_i = device["allocated"].index(max(device["allocated"]))
    at_peak = {name: device[name][peak_i] for name in ("kv", "weights", "other")}
    assert at_peak == expected["categories_at_peak"]
    assert max(device["kv"]) >= summary["kv"]["final_bytes"]
    assert {m["kind"] for m in timeline["markers"]} == {"step"}
    assert len(timeline["markers"]) == summary["steps"]


@pytest.mark.slow
def test_layers_last_step_is_the_kv_arithmetic_of_the_raw_log(server: str, logdir: Path) -> None:
    _, layers = _get_json(_plugin(server, "layers?run=dynamic_b2"))

    manifest = json.loads((logdir / "dynamic_b2" / "manifest.json").read_text())
    model = manifest["model"]
    last_k: dict[int, dict[str, Any]] = {}
    for line in (logdir / "dynamic_b2" / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event["phase"] != "end" and event["part"] == "data" and event["kv"] == "k" and event.get("shape"):
            last_k[event["layer"]] = event
    assert layers["layers"] == sorted(last_k)
    assert layers["steps"] == list(range(1, layers["steps_total"] + 1))
    assert layers["phases"][0] == "prefill" and set(layers["phases"][1:]) == {"decode"}
    for row, layer in zip(layers["kv_bytes"], layers["layers"], strict=True):
        event = last_k[layer]
        rows, tokens = event["shape"][0], event["tokens"]
        one_of_k_or_v = rows * model["num_kv_heads"] * model["head_dim"] * tokens * 4  # float32
        assert row[-1] == 2 * one_of_k_or_v


def _evicted_per_layer_from_the_raw_log(run: Path) -> dict[int, int]:
    """Tokens evicted per layer over every batch row, rebuilt from the KV log's lines: the `evicted_tokens`
    of each layer's K data events (per row) times that event's rows."""
    per_layer: dict[int, int] = {}
    for line in (run / "kv_events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("evicted_tokens") and event["kv"] == "k" and event["part"] == "data":
            rows = event["shape"][0]
            per_layer[event["layer"]] = per_layer.get(event["layer"], 0) + event["evicted_tokens"] * rows
    return per_layer


@pytest.mark.slow
@pytest.mark.parametrize("steps", [None, 10])
def test_window_eviction_markers_count_every_row_and_add_up_to_the_report(
    server: str, logdir: Path, steps: int | None
) -> None:
    # GIVEN the sliding-window run at batch 2 (its window evicts at prefill and at every decode step), shown
    # whole or cut down to 10 of its 16 steps
    query = "layers?run=sliding_b2" + (f"&steps={steps}" if steps else "")
    _, layers = _get_json(_plugin(server, query))
    markers = layers["evictions"]
    expected = _evicted_per_layer_from_the_raw_log(logdir / "sliding_b2")
    assert len(expected) == 4 and all(expected.values())

    # THEN each layer's markers add up to its tokens evicted over both rows, as the report counts them
    by_layer: dict[int, int] = {}
    for marker in markers:
        by_layer[marker["layer"]] = by_layer.get(marker["layer"], 0) + marker["evicted_tokens"]
        assert marker["by_kind"] == {"window": marker["evicted_tokens"]}
    assert by_layer == expected
    report = _cli_json("report", str(logdir / "sliding_b2"), "--json", "--no-export", "-q")
    assert [layer["evicted_tokens"] for layer in report["kv"]["per_layer"]] == [expected[n] for n in range(4)]
    assert sum(m["evicted_tokens"] for m in markers) == report["kv"]["evicted_tokens"]
    # AND every marker sits on a column shown, standing for the steps since the previous column
    assert {m["step"] for m in markers} <= set(layers["steps"])
    for marker in markers:
        at = layers["steps"].index(marker["step"])
        assert marker["first_step"] == (layers["steps"][at - 1] + 1 if at else marker["step"])
    if steps:
        assert len(layers["steps"]) < layers["steps_total"]
        assert any(m["first_step"] < m["step"] for m in markers)


def test_press_and_crop_markers_count_every_row(tmp_path: Path) -> None:
    """A run recorded here: at batch 2, a forward hook on each attention module keeps the prompt's last
    KEEP tokens (as an eviction press rebinds `layer.keys`), one decode step follows, then a crop."""
    import torch
    from transformers import DynamicCache

    import kvtrace
    from analyzers.tb_plugin.run_store import RunStore
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    layers_n, batch, prompt, keep, crop = 2, 2, 17, 8, 3
    model = build_model(tiny_size(layers_n, 2))

    def keep_last(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        cache: Any = kwargs.get("past_key_values") or kwargs.get("cache")
        layer = cache.layers[module.layer_idx]
        if layer.keys.shape[-2] == prompt:
            layer.keys = layer.keys[:, :, -keep:, :].contiguous()
            layer.values = layer.values[:, :, -keep:, :].contiguous()

    attention = [m for m in model.modules() if hasattr(m, "layer_idx")]
    handles = [m.register_forward_hook(keep_last, with_kwargs=True) for m in attention]
    ids = torch.randint(3, 1000, (batch, prompt))
    cache = DynamicCache()
    try:
        with torch.no_grad(), kvtrace.record(tmp_path / "press_b2", model=model, profiler=False):
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
            cache.crop(-crop)
    finally:
        for handle in handles:
            handle.remove()

    layers = RunStore(tmp_path).layers("press_b2")

    # THEN one marker per layer at the prefill (the press) and one at the decode step (the crop), each
    # counting both rows
    assert layers["steps"] == [1, 2]
    got = [(m["step"], m["layer"], m["evicted_tokens"], m["by_kind"]) for m in layers["evictions"]]
    press, cropped = (prompt - keep) * batch, crop * batch
    assert got == [(1, n, press, {"press": press}) for n in range(layers_n)] + [
        (2, n, cropped, {"crop": cropped}) for n in range(layers_n)
    ]
    report = _cli_json("report", str(tmp_path / "press_b2"), "--json", "--no-export", "-q")
    assert [layer["evicted_tokens"] for layer in report["kv"]["per_layer"]] == [press + cropped] * layers_n
    assert report["kv"]["evictions_by_reason"] == {"press": press * layers_n, "crop": cropped * layers_n}


@pytest.mark.parametrize("name", ["vllm_preempt", "vllm_preempt_mixed"])
def test_an_engine_run_shows_its_pool_and_says_why_it_has_no_memory_chart(tmp_path: Path, name: str) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN a copy of a vLLM run recorded without a profiler: its one memory event is the pool's allocation
    run = shutil.copytree(SAMPLES / name, tmp_path / name)
    steps = [json.loads(line) for line in (run / "engine_steps.jsonl").read_text().splitlines() if line]
    preempted = [(step["step"], ", ".join(step["preempted"])) for step in steps if step["preempted"]]
    preemptions = sum(len(step["preempted"]) for step in steps)
    assert len(steps) > 90 and preempted
    store = RunStore(tmp_path)

    # WHEN the tab asks for its timeline and its pool
    timeline = store.timeline(name)
    pool = store.pool(name)

    # THEN the timeline (at t=0 the level before the trace, nothing, then the pool's blocks x bytes per
    # block) says why the page draws no memory chart, and where to look
    engine = json.loads((run / "engine.json").read_text())
    ((device,),) = [timeline["devices"]]
    assert (device["t_s"], device["points"]) == ([0.0, 0.0], 2)
    assert device["allocated"] == device["kv"] == [0, engine["num_blocks"] * engine["bytes_per_block"]]
    plural = "s" if preemptions != 1 else ""
    assert timeline["no_chart"] == (
        "No memory timeline: this vllm 0.32.0 run has one memory event, its KV pool's allocation (before its "
        "first engine step). The KV pool chart below is its timeline: blocks used against the total over "
        f"{len(steps)} engine steps, {preemptions} preemption{plural}."
    )
    # AND the pool is charted: blocks used against the total at every engine step of the raw log (what each
    # step held while it ran, or after it where that is more, as the legend says), and its preemptions at
    # their steps
    assert pool["title"] == "vllm 0.32.0 KV pool"
    traces = {trace["name"]: trace for trace in decoded(pool["figure"]["data"])}
    used = traces["blocks used while the step ran"]
    assert used["x"] == [step["step"] for step in steps]
    assert used["y"] == [max(step["blocks_used_in_step"], step["blocks_used"]) for step in steps]
    assert used["customdata"] == [step["blocks_used"] for step in steps]
    assert traces["blocks total"]["y"] == [step["blocks_total"] for step in steps]
    assert list(zip(traces["preemption"]["x"], traces["preemption"]["text"], strict=True)) == preempted
    # AND it is the figure and the table `kvtrace report -o` draws: one source for both
    page = tmp_path / "report.html"
    assert kvtrace_main(["report", str(run), "--no-export", "-q", "-o", str(page)]) == 0
    html = page.read_text()
    assert page_figure(html, "kvtrace-engine-pool")[0] == list(traces.values())
    cells = [f"<tr><th>{label}</th><td>{escape(value)}</td></tr>" for label, value in pool["rows"]]
    assert all(cell in html for cell in cells)
    assert ("<p class='note'>" + timeline["no_chart"].replace("'", "&#x27;")) in html


def _page_sections(run: Path, tmp_path: Path) -> str:
    """The HTML `kvtrace report -o` writes for the run."""
    page = tmp_path / f"{run.name}.html"
    assert kvtrace_main(["report", str(run), "--no-export", "-q", "-o", str(page)]) == 0
    return page.read_text()


def test_a_vllm_run_over_its_budget_gets_the_engine_diagnosis_in_the_tab(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN the vLLM run as record(gpu_memory="22.5MiB") would have written it: what vLLM held before the
    # trace (weights and its buffers, engine.json) fits that budget; with the pool allocated at its start,
    # it does not
    mib = 1 << 20
    budget = int(22.5 * mib)
    run = shutil.copytree(SAMPLES / "vllm_preempt", tmp_path / "logs" / "vllm_budget")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["options"]["gpu_memory"] = budget
    (run / "manifest.json").write_text(json.dumps(manifest))
    engine = json.loads((run / "engine.json").read_text())
    held = engine["memory_profile"]["weights_bytes"] + engine["memory_profile"]["buffers_bytes"]
    pool, per_block = engine["num_blocks"] * engine["bytes_per_block"], engine["bytes_per_block"]
    assert held < budget < held + pool

    # WHEN the tab asks for its diagnosis
    payload = RunStore(tmp_path / "logs").diagnosis("vllm_budget")

    # THEN it is `kvtrace diagnose --json`'s: the pool took the peak over the budget, priced in vLLM's knob
    said = json.loads(json.dumps(payload["diagnosis"]))
    assert said == _cli_json("diagnose", str(run.resolve()), "--json")
    over = said["budget"]
    assert over["crossed"] and over["crossed_by"] == "pool"
    assert (over["pool_bytes"], over["peak_bytes"]) == (pool, held + pool)
    assert over["over_bytes"] == held + pool - budget
    fitting = (budget - held) // per_block * per_block
    assert {r["knob"]: r["setting"] for r in over["remedies"]}["kv_cache_memory_bytes"] == fitting
    # AND its HTML is the report page's budget and preemption sections, not the Hugging Face diagnosis
    text = unescape(payload["html"])
    assert f"kv_cache_memory_bytes={fitting}" in text and "vLLM preempted 2 time(s)" in text
    assert "batch x tokens held" not in text and "sliding window" not in text
    assert payload["html"] in _page_sections(run, tmp_path)


@pytest.mark.parametrize("name", ["vllm_preempt", "vllm_refused"])
def test_a_preempted_or_refused_vllm_run_gets_its_diagnosis_in_the_tab(tmp_path: Path, name: str) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN a vLLM run recorded without a budget, that preempted or whose start vLLM refused
    run = shutil.copytree(SAMPLES / name, tmp_path / "logs" / name)
    engine = json.loads((run / "engine.json").read_text())

    # WHEN the tab asks for its diagnosis
    payload = RunStore(tmp_path / "logs").diagnosis(name)

    # THEN it is `kvtrace diagnose --json`'s, and its HTML the report page's section
    said = json.loads(json.dumps(payload["diagnosis"]))
    assert said == _cli_json("diagnose", str(run.resolve()), "--json")
    assert payload["html"] in _page_sections(run, tmp_path)
    if engine["status"] == "refused_start":
        assert said["kind"] == "refused_start"
        assert (said["needed_bytes"], said["available_bytes"]) == (
            engine["refused"]["needed_bytes"],
            engine["refused"]["available_bytes"],
        )
    else:
        steps = [json.loads(line) for line in (run / "engine_steps.jsonl").read_text().splitlines() if line]
        assert said["kind"] == "preemption"
        assert said["preemptions"] == sum(len(step["preempted"]) for step in steps) > 0
        assert said["first_preemption_step"] == min(step["step"] for step in steps if step["preempted"])


def _record_ended_before_its_first_engine_step(run: Path) -> None:
    """A real `generate_batch` of the tiny Llama whose first forward raises: transformers makes its pool (8
    usable 4-token blocks, plus its 2 trash sectors), fails both requests before any engine step, and the
    user's code raises on the failed outputs inside the block (as test_hf_continuous_batching_budget.py)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    import kvtrace
    from kvtrace.llama import build_model
    from tests.tiny import tiny_size

    model = build_model(tiny_size(2, 2), dtype=torch.float32)

    def raises(module: Any, args: Any) -> None:
        raise RuntimeError("boom")

    model.model.layers[0].register_forward_pre_hook(raises)
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=8, page_size=4, max_batch_tokens=64)
    with (
        pytest.raises(RuntimeError, match="requests failed"),
        kvtrace.record(run, model=model, profiler=False),
    ):
        outputs = model.generate_batch(
            [[1, 2, 3, 4, 5, 6], [7, 8, 9]],
            generation_config=generation,
            continuous_batching_config=batching,
            progress_bar=False,
        )
        if any(output.error for output in outputs.values()):
            raise RuntimeError("requests failed")


@pytest.mark.slow
@SECTOR_POOL
def test_a_pool_made_before_the_first_engine_step_is_listed_without_a_chart(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore
    from tests.engine_page import pool_table

    # GIVEN a real continuous-batching run that made its pool and ended before its first engine step
    logs = tmp_path / "logs"
    run = logs / "before_first_step"
    _record_ended_before_its_first_engine_step(run)
    assert (run / "engine_steps.jsonl").read_text().strip() == ""
    engine = json.loads((run / "engine.json").read_text())
    blocks, block_bytes = engine["num_blocks"], engine["bytes_per_block"]
    # 8 usable blocks + 2 trash sectors, each 2 layers x K and V x 2 KV heads x head_dim 16 x 4 tokens x 4 B
    assert (blocks, block_bytes, engine["block_size"]) == (8 + 2, 2 * 2 * 2 * 16 * 4 * 4, 4)

    # WHEN the tab asks for its pool
    pool = RunStore(logs).pool("before_first_step")

    # THEN it lists the pool's rows, with no chart of steps it never ran: the rows the HTML page shows
    assert pool["title"] == f"transformers-cb {engine['version']} KV pool" and pool["figure"] is None
    rows = dict(pool["rows"])
    trash = f"2 of the {blocks} blocks are transformers' trash sectors, never handed out"
    assert rows["blocks"] == f"{blocks} blocks of 4 tokens ({trash})"
    assert rows["engine steps"] == "0"
    assert rows["pool"] == f"{blocks * block_bytes / 1024:.2f} KiB (float32)"
    assert (
        rows["peak"]
        == "no engine step ran: the run ended before its first step, none of 8 usable blocks used"
    )
    assert rows["preemptions"] == "none" and rows["requests"] == "2 requests (0 completed, 2 failed)"
    assert rows == pool_table(_page_sections(run, tmp_path))
    # AND the tab, in a real TensorBoard, draws that table and no pool chart
    if CHROMIUM is None:
        return
    with _tensorboard(["--logdir", str(logs)], tmp_path / "tensorboard.log") as base:
        url = f"{base}/data/plugin/{PLUGIN}/index.html?runs=before_first_step"
        dom, stderr, _ = _chromium(url, tmp_path, "--dump-dom")
    panel = _panel(dom, "before_first_step")
    assert 'data-state="ok"' in panel and "pool-plot" not in panel
    assert f'<h3 class="pool-title">{pool["title"]}</h3>' in panel
    for label, value in pool["rows"]:
        assert f"<th>{label}</th><td>{value}</td>" in panel
    assert [line for line in stderr.splitlines() if ":CONSOLE" in line] == []


def test_a_run_without_an_engine_has_a_memory_chart_and_no_pool(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    shutil.copytree(SAMPLES / "dynamic_b2", tmp_path / "dynamic_b2")
    store = RunStore(tmp_path)

    assert store.timeline("dynamic_b2")["no_chart"] is None
    assert store.pool("dynamic_b2") == {"run": "dynamic_b2", "title": None, "rows": [], "figure": None}


def test_the_timeline_begins_at_the_level_held_before_the_trace(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN a profiled run whose model's weights were loaded before record(): held before the first event
    run = shutil.copytree(SAMPLES / "dynamic_b2", tmp_path / "dynamic_b2")
    weights = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines() if line]
    held = sum(w["storage_bytes"] for w in weights)

    # WHEN the tab asks for its timeline
    (device,) = RunStore(tmp_path).timeline("dynamic_b2")["devices"]

    # THEN its first point, at the first event's time, is that level, all weights, as the HTML report draws
    # it; the next is the first event's
    assert device["t_s"][0] == device["t_s"][1] == 0.0 and device["points"] == len(device["t_s"])
    assert (device["allocated"][0], device["weights"][0], device["kv"][0], device["other"][0]) == (
        held,
        held,
        0,
        0,
    )
    assert device["allocated"][1] != held
    # AND its peak is the report's
    report = _cli_json("report", str(run), "--json", "--no-export", "-q")
    assert device["peak_allocated_bytes"] == report["devices"][0]["peak_allocated_bytes"]


def test_a_device_without_events_is_served_at_its_level_with_the_reports_peak(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore
    from kvtrace.llama import build_model
    from tests.tiny import record_generate, tiny_size, weights_on_cuda0

    # GIVEN a profiler=False run of the tiny Llama, its files then set as a GPU run with its cache offloaded
    # writes them: the weights on cuda:0, which has no event, and every KV storage on the CPU
    layers, kv_heads, head_dim, batch, prompt, new = 2, 2, 16, 2, 12, 5
    run = tmp_path / "offloaded"
    record_generate(build_model(tiny_size(layers, kv_heads)), run, batch, prompt, new, profiler=False)
    weights = weights_on_cuda0(run)
    report = _cli_json("report", str(run), "--json", "--no-export", "-q")

    # WHEN the tab asks for its timeline
    timeline = RunStore(tmp_path).timeline("offloaded")

    # THEN cuda:0 is served at its weights, as the caching allocator's 512-byte blocks hold them (it had no
    # point and a peak of 0), flat across the seconds the CPU's KV events span
    devices = {d["device"]: d for d in timeline["devices"]}
    held = sum(-(-w["storage_bytes"] // 512) * 512 for w in weights)
    gpu, cpu = devices["cuda:0"], devices["cpu"]
    assert (gpu["events"], gpu["points"], gpu["t_s"]) == (0, 2, [min(cpu["t_s"]), max(cpu["t_s"])])
    assert (gpu["weights"], gpu["kv"], gpu["other"], gpu["allocated"]) == (
        [held] * 2,
        [0, 0],
        [0, 0],
        [held] * 2,
    )
    # AND each device's peak is the one `kvtrace report --json` gives it: the weights for cuda:0, for the CPU
    # its last storage grown (K and V of every layer over prompt + new - 2 tokens, the others grown by one
    # token, the new storage beside the old one it replaces)
    token = kv_heads * head_dim * batch * 4
    kv_peak = layers * 2 * (prompt + new - 2) * token + (layers * 2 - 1) * token + (prompt + new - 1) * token
    served = {name: d["peak_allocated_bytes"] for name, d in devices.items()}
    assert served == {d["device"]: d["peak_allocated_bytes"] for d in report["devices"]}
    assert served == {"cuda:0": held, "cpu": kv_peak} and max(cpu["allocated"]) == kv_peak


@pytest.mark.slow
def test_a_run_written_after_start_appears(server: str, logdir: Path) -> None:
    shutil.copytree(SAMPLES / "static_b2", logdir / "later" / "static_b2")
    try:
        _, listing = _get_json(_plugin(server, "runs"))
        assert "later/static_b2" in {r["name"] for r in listing["runs"]}
        _, summary = _get_json(_plugin(server, "summary?run=later/static_b2"))
        assert summary["kv"]["measured_from"] == "kv_log"
    finally:
        shutil.rmtree(logdir / "later")


def test_runs_in_folders_named_like_a_runs_own_are_listed_as_export_finds_them(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN runs under folders named profiler/, snapshots/, tb_scalars/ that are no run's own, a run with a
    # worker's run inside it, and a run-shaped copy in a run's own snapshots/ (the run's files, no run)
    logdir = tmp_path / "tb"
    shutil.copytree(SAMPLES / "dynamic_b2", logdir / "snapshots" / "r1")
    shutil.copytree(SAMPLES / "sliding_b2", logdir / "a" / "profiler" / "r2")
    shutil.copytree(SAMPLES / "static_b2", logdir / "tb_scalars" / "deep" / "r3")
    run = shutil.copytree(SAMPLES / "static_b2", logdir / "plain")
    shutil.copytree(SAMPLES / "vllm_preempt", run / "worker-1")
    shutil.copytree(SAMPLES / "dynamic_b2", run / "snapshots" / "inside")
    only_nested = tmp_path / "only_nested"
    shutil.copytree(SAMPLES / "sliding_b2", only_nested / "snapshots" / "r")

    # WHEN the tab lists the runs, and `kvtrace query` exports the same folder
    listed = RunStore(logdir).list_runs()
    exported = _cli_json("query", str(logdir), "SELECT path FROM runs", "--json")

    # THEN every run is listed, readable, exactly the runs export finds
    names = {"snapshots/r1", "a/profiler/r2", "tb_scalars/deep/r3", "plain", "plain/worker-1"}
    assert {r["name"] for r in listed} == names
    assert [r["error"] for r in listed] == [None] * len(names)
    assert {r["path"] for r in listed} == {str((logdir / n).resolve()) for n in names}
    assert {str(Path(row["path"]).resolve()) for row in exported} == {r["path"] for r in listed}
    # and a log directory whose only run is under snapshots/ turns the tab on
    store = RunStore(only_nested)
    assert store.has_runs() and list(store.scan()) == ["snapshots/r"]


@pytest.mark.parametrize(
    "spec",
    [
        "first:/a/b,second:relative/c",
        "/abs/no_name,plain_no_name",
        "name:/path:with/a/colon,C:\\windows\\path",
        "gs://bucket/logs,uri:s3://bucket/x",
        "one:~/runs,one:/other",
    ],
)
def test_the_logdir_spec_is_read_as_tensorboard_reads_it(spec: str) -> None:
    from tensorboard.backend.event_processing.data_ingester import _parse_event_files_spec

    from analyzers.tb_plugin.plugin import parse_logdir_spec

    assert parse_logdir_spec(spec) == _parse_event_files_spec(spec)


def test_runs_of_every_logdir_spec_entry_are_named_apart(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN three spec entries holding a run of one name: two entries of one name, one without a name
    for folder in ("x", "y", "z"):
        shutil.copytree(SAMPLES / "sliding_b2", tmp_path / folder / "run")
    spec = {str(tmp_path / "x"): "a", str(tmp_path / "y"): "a", str(tmp_path / "z"): None}

    # WHEN the tab lists them
    runs = RunStore(None, logdir_spec=spec).scan()

    # THEN each has a name of its own: the entry's name (its directory, unnamed) then the run's path
    z_run = f"{(tmp_path / 'z').resolve()}/run"
    assert runs == {
        "a/run": (tmp_path / "x" / "run").resolve(),
        "a/run#2": (tmp_path / "y" / "run").resolve(),
        z_run: (tmp_path / "z" / "run").resolve(),
    }


@pytest.mark.slow
def test_the_tab_lists_every_run_of_a_logdir_spec(tmp_path: Path) -> None:
    # GIVEN two directories, each holding a different run under the same folder name
    shutil.copytree(SAMPLES / "dynamic_b2", tmp_path / "dir1" / "run")
    shutil.copytree(SAMPLES / "sliding_b2", tmp_path / "dir2" / "run")
    spec = f"first:{tmp_path / 'dir1'},second:{tmp_path / 'dir2'}"

    # WHEN TensorBoard serves them with --logdir_spec
    with _tensorboard(["--logdir_spec", spec], tmp_path / "tensorboard.log") as base:
        _, listing = _get_json(f"{base}/data/plugins_listing")
        _, runs = _get_json(_plugin(base, "runs"))
        summaries = {
            name: _get_json(_plugin(base, f"summary?run={name}"))[1] for name in ("first/run", "second/run")
        }

    # THEN the tab is on and lists both runs, named by their entry, each serving its own run's figures
    assert listing[PLUGIN]["enabled"] is True
    assert {r["name"]: r["path"] for r in runs["runs"]} == {
        "first/run": str((tmp_path / "dir1" / "run").resolve()),
        "second/run": str((tmp_path / "dir2" / "run").resolve()),
    }
    assert runs["logdir"] == f"first:{(tmp_path / 'dir1').resolve()},second:{(tmp_path / 'dir2').resolve()}"
    for name, folder in (("first/run", "dir1"), ("second/run", "dir2")):
        report = _cli_json("report", str(tmp_path / folder / "run"), "--json", "--no-export", "-q")
        assert summaries[name] == report
    assert summaries["first/run"] != summaries["second/run"]


@pytest.mark.slow
def test_served_assets_are_all_local(server: str) -> None:
    from plotly.offline import get_plotlyjs

    status, plotly_js = _get(_plugin(server, "plotly.min.js"))
    assert status == 200 and plotly_js.decode("utf-8") == get_plotlyjs()
    for asset in ("index.html", "kvcache.js", "charts.js"):
        status, body = _get(_plugin(server, asset))
        assert status == 200
        urls = re.findall(r"https?://[^\s\"'<>)]+", body.decode("utf-8"))
        assert [u for u in urls if not u.startswith("http://127.0.0.1")] == []


def _chromium(url: str, out_dir: Path, *extra: str) -> tuple[str, str, list[dict[str, Any]]]:
    """Headless Chromium with every host but 127.0.0.1 unresolvable; returns (stdout, stderr, the
    requests the page made, from Chromium's own net log)."""
    net_log = out_dir / f"netlog-{len(list(out_dir.iterdir()))}.json"
    proc = subprocess.run(
        [
            CHROMIUM or "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--log-net-log={net_log}",
            "--window-size=1500,1300",
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    requests = [
        e["params"]
        for e in log["events"]
        if e["type"] == start_job
        and "url" in e.get("params", {})
        and e["params"].get("initiator") != BROWSER_ONLY_INITIATOR
    ]
    return proc.stdout, proc.stderr, requests


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_renders_the_dashboard_offline(server: str, tmp_path: Path) -> None:
    # WHEN the plugin's page is opened with one broken and three good runs side by side
    runs = "broken_manifest,dynamic_b2,oom_b2,sliding_b2"
    dom, stderr, requests = _chromium(_plugin(server, f"index.html?runs={runs}"), tmp_path, "--dump-dom")

    # THEN it finished, with the plots drawn by plotly and data in them
    app = re.search(r'id="kvcache-app"[^>]*', dom)
    assert app is not None and 'data-state="ready"' in app.group(0)
    assert "data-js-errors" not in app.group(0)
    panels = dict(re.findall(r'class="run-panel" data-run="([^"]+)" data-state="(\w+)"', dom))
    assert panels == {"broken_manifest": "error", "dynamic_b2": "ok", "oom_b2": "ok", "sliding_b2": "ok"}
    assert dom.count('class="plot-container plotly"') == 9  # timeline, KV curve and heatmap per good run
    assert dom.count('class="trace scatter') >= 3 * 5  # weights, kv, other, allocated, steps
    assert dom.count('class="hm"') == 3
    points = [
        int(n)
        for n in re.findall(
            r'class="run-panel" data-run="[^"]+" data-state="ok"[^>]*data-points="(\d+)"', dom
        )
    ]
    assert len(points) == 3 and min(points) > 100
    assert "corrupt manifest" in dom
    assert "kvtrace-diagnosis" in dom  # the OOM run's diagnosis section
    # AND the figures read as the CLI prints them: separators on both sides of bytes per token (the
    # sample's 4 layers x (K, V) x 2 KV heads x head_dim 16 x 4 B), for dynamic_b2 and its OOM copy
    assert dom.count("<th>KV bytes/token measured vs arithmetic</th><td>1,024.0 vs 1,024</td>") == 2
    # AND every memory level, on both time charts, is drawn as steps held until the next event (plotly's
    # "hv": moves across and up only), not as slopes between two events
    panel = _panel(dom, "dynamic_b2")
    for plot in ("timeline-plot", "kv-plot"):
        chart = panel[panel.index(plot) :]
        lines = re.findall(r'<path class="js-line" d="([^"]*)"', chart[: chart.index("</svg>")])
        assert lines and all(re.fullmatch(r"(M[^A-Z]+)?([HVM][^A-Z]+)*", d) for d in lines), (plot, lines[:1])
    # AND the page logged nothing (Chromium prints every console message, errors included, as CONSOLE)
    assert [line for line in stderr.splitlines() if ":CONSOLE" in line] == []
    # AND every request the page made stayed on 127.0.0.1
    urls = [r["url"] for r in requests]
    assert any(u.endswith("/plotly.min.js") for u in urls)
    assert [u for u in urls if not u.startswith("http://127.0.0.1:")] == []


def _panel(dom: str, run: str) -> str:
    start = dom.index(f'class="run-panel" data-run="{run}"')
    end = dom.find('class="run-panel"', start + 1)
    return dom[start : end if end >= 0 else len(dom)]


def _heatmap_step_labels(panel: str) -> list[str]:
    heatmap = panel[panel.index("heatmap-plot") :]
    heatmap = heatmap[: heatmap.index("</svg>")]
    return re.findall(r'<g class="xtick">\s*<text[^>]*>([^<]*)</text>', heatmap)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_shows_an_engine_pool_and_a_short_runs_steps_as_the_cli_does(
    server: str, logdir: Path, tmp_path: Path
) -> None:
    # GIVEN a vLLM run (its pool allocated once, before its first engine step: no batch, one KV step),
    # a 2-token run and a 16-step one
    engine = json.loads((logdir / "vllm_preempt" / "engine.json").read_text())
    capacity = engine["num_blocks"] * engine["block_size"]  # 16 blocks x 32 tokens
    # WHEN the tab shows them side by side
    runs = "vllm_preempt,short_b1,dynamic_b2"
    dom, stderr, _ = _chromium(_plugin(server, f"index.html?runs={runs}"), tmp_path, "--dump-dom")
    app = re.search(r'id="kvcache-app"[^>]*', dom)
    assert app is not None and 'data-state="ready"' in app.group(0) and "data-js-errors" not in app.group(0)
    # THEN the vLLM run's tokens are its pool's capacity, as `kvtrace report` says, with no batch
    vllm = _panel(dom, "vllm_preempt")
    assert 'data-state="ok"' in vllm
    # (its diagnosis, first, names vLLM's null block: the rest has no JavaScript null)
    diagnosis = re.search(r'<div class="diagnosis">.*?</section></div>', vllm, flags=re.S)
    assert diagnosis is not None and "vLLM preempted 2 time(s)" in diagnosis.group(0)
    # (and so does its pool table's blocks cell, `1 of the 16 blocks is vLLM's null block`)
    summary = (
        vllm.replace(diagnosis.group(0), "")
        .replace("vLLM&#x27;s null block", "")
        .replace("vLLM's null block", "")
    )
    assert f"<th>KV pool capacity</th><td>{capacity} tokens</td>" in summary and "null" not in summary
    assert f"the pool's capacity of {capacity} tokens" in _cli_text(logdir / "vllm_preempt")
    # AND it has no per-step heatmap (as in the HTML report): one column at step 0 of a 96-step run
    assert "heatmap-plot" not in vllm
    # AND no memory chart of its one point (empty axes, once): the panel says why, and draws the pool's
    # blocks over its 96 engine steps in its place, as the HTML report does
    assert "timeline-plot" not in vllm and "kv-plot" not in vllm
    assert "No memory timeline: this vllm 0.32.0 run has one memory event" in vllm
    assert "pool-plot" in vllm and vllm.count('class="plot-container plotly"') == 1
    assert "KV pool: blocks used over engine steps" in vllm and "Blocks held per request" in vllm
    # AND the step axes read whole steps, each once: 1 and 2 of the short run, every other one of 16
    assert _heatmap_step_labels(_panel(dom, "short_b1")) == ["1", "2"]
    assert _heatmap_step_labels(_panel(dom, "dynamic_b2")) == [str(n) for n in range(2, 17, 2)]
    assert "<th>tokens held × batch</th><td>35 × 2</td>" in _panel(dom, "dynamic_b2")
    # AND its KV allocated row says what it sums over in the report's words (the JSON's `allocated_over`)
    dynamic = _cli_json("report", str(logdir / "dynamic_b2"), "--json", "--no-export", "-q")["kv"]
    allocated = f"<th>KV allocated {dynamic['allocated_over']}</th><td>"
    assert allocated in _panel(dom, "dynamic_b2") and dynamic["allocated_over"] == "over the run"
    assert f"    allocated {dynamic['allocated_over']} " in _cli_text(logdir / "dynamic_b2")
    assert [line for line in stderr.splitlines() if ":CONSOLE" in line] == []


def _cli_text(run: Path) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert kvtrace_main(["report", str(run), "--no-export", "-q"]) == 0
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_opens_the_kv_cache_tab_in_tensorboard(server: str, tmp_path: Path) -> None:
    shot = tmp_path / "tab.png"
    _, stderr, requests = _chromium(f"{server}/#{PLUGIN}", tmp_path, f"--screenshot={shot}")

    urls = [r["url"] for r in requests]
    # TensorBoard's iframe loaded the module, which opened the dashboard, which fetched the data.
    assert any(f"plugin_entry.html?name={PLUGIN}" in u for u in urls)
    assert any(f"/data/plugin/{PLUGIN}/timeline?run=" in u for u in urls)
    assert [u for u in urls if not u.startswith("http://127.0.0.1:")] == []
    assert not [line for line in stderr.splitlines() if ":CONSOLE" in line and "/plugin/kvcache/" in line]
    assert shot.stat().st_size > 20_000


def test_loading_runs_does_not_import_torch(tmp_path: Path) -> None:
    run = shutil.copytree(SAMPLES / "sliding_b2", tmp_path / "sliding_b2")
    code = (
        "import sys\n"
        "import analyzers.tb_plugin.plugin\n"
        "from analyzers.tb_plugin.run_store import RunStore\n"
        f"store = RunStore({str(tmp_path)!r})\n"
        "assert [r['name'] for r in store.list_runs()] == ['sliding_b2']\n"
        "for payload in (store.summary('sliding_b2'), store.timeline('sliding_b2'),\n"
        "                store.layers('sliding_b2'), store.diagnosis('sliding_b2')):\n"
        "    assert 'error' not in payload, payload\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert run.is_dir()


def _x_ticks(panel: str, plot: str) -> list[tuple[str, float]]:
    """(label, pixel x) of each x tick plotly drew in one plot of a panel."""
    svg = panel[panel.index(f"plot {plot}") :]
    svg = svg[: svg.index("</svg>")]
    ticks = re.findall(
        r'<g class="xtick"><text[^>]*?transform="translate\(([\d.]+),[^>]*>([^<]*)</text>', svg
    )
    return [(label, float(x)) for x, label in ticks]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_the_memory_and_kv_charts_place_a_second_at_one_x(tmp_path: Path) -> None:
    from analyzers.tb_plugin.run_store import RunStore

    # GIVEN a real run whose first step began before its first memory event (without a profiler the first
    # memory event is the prefill's first KV line)
    logs = tmp_path / "logs"
    _record_two_steps(logs / "two_steps")
    timeline = RunStore(logs).timeline("two_steps")
    first_step = min(m["t_s"] for m in timeline["markers"] if m["kind"] == "step")
    assert timeline["devices"][0]["t_s"][0] == 0 and first_step < 0
    # WHEN the tab draws it in a real TensorBoard
    with _tensorboard(["--logdir", str(logs)], tmp_path / "tensorboard.log") as base:
        dom, stderr, _ = _chromium(
            f"{base}/data/plugin/{PLUGIN}/index.html?runs=two_steps", tmp_path, "--dump-dom"
        )
    panel = _panel(dom, "two_steps")
    assert 'data-state="ok"' in panel
    assert [line for line in stderr.splitlines() if ":CONSOLE" in line] == []
    # THEN its memory chart and its KV chart, one above the other, have the same seconds at the same x (as the
    # HTML report's panels share one axis), the step before the first event included on both
    memory, kv = _x_ticks(panel, "timeline-plot"), _x_ticks(panel, "kv-plot")
    assert [label for label, _ in memory] == [label for label, _ in kv]
    for (label, x_memory), (_, x_kv) in zip(memory, kv, strict=True):
        assert abs(x_memory - x_kv) < 3, (label, x_memory, x_kv)
