"""The real analyzers on real recorded runs: KV figures per layer and per step equal the arithmetic, the
KV-log join agrees with the stack rules, and the HTML renders in a real browser."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch

import kvtrace
from analyzers.attribution import RULES, _frame_categories
from analyzers.model import KV, METHOD_KV_LOG, METHOD_STACK_RULE
from analyzers.report import build_report
from kvtrace.cli import main
from kvtrace.llama import build_model, make_cache
from tests.hf_versions import HAS_FP8_CACHE, needs_fp8_cache
from tests.plotly_figures import page_figure
from tests.tiny import cache_arg, record_generate, tiny_size, weights_on_cuda0

SAMPLES = Path(__file__).resolve().parents[2] / "sample_traces"

KV_HEADS, HEAD_DIM, LAYERS, BATCH, PROMPT, NEW, WINDOW = 2, 16, 2, 2, 12, 5, 8
SIZE = tiny_size(LAYERS, KV_HEADS)


def _record(out: Path, kind: str, window: int = WINDOW, **options: object) -> Path:
    model = build_model(SIZE)
    torch.manual_seed(1)
    ids = torch.randint(3, 1000, (BATCH, PROMPT))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on the first row
    cache, extra = make_cache(kind, model, BATCH, PROMPT + NEW, window=window)
    if cache is not None:
        extra.update(cache_arg(cache))
    with torch.no_grad(), kvtrace.record(out, model=model, **options):
        model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            **extra,
        )
    return out


def _expected_layer_bytes(kind: str, step: int) -> int:
    """Storage bytes one layer holds (K + V) after forward `step` (1 = prefill), from first principles."""
    per_token_row = KV_HEADS * HEAD_DIM  # elements of one token of one row of K (or V)
    held = PROMPT + step - 1
    if kind == "dynamic":
        return 2 * per_token_row * held * BATCH * 4
    if kind == "static":
        # generate() sizes a static cache for every token it will feed: the prompt and all new tokens but
        # the last (never fed back), allocated in full at the first step.
        return 2 * per_token_row * (PROMPT + NEW - 1) * BATCH * 4
    if kind == "sliding":
        # The layer keeps a view of the torch.cat result: the storage is the previous view (at most
        # WINDOW-1 tokens) plus the step's new tokens; at prefill, the whole prompt.
        tokens = PROMPT if step == 1 else min(WINDOW - 1, held - 1) + 1
        return 2 * per_token_row * tokens * BATCH * 4
    if kind == "fp8":
        return 2 * (per_token_row * held * BATCH * 1 + 4)  # fp8 data + one float32 scale, for K and for V
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {
        kind: _record(root / kind, kind)
        for kind in ("dynamic", "static", "sliding", "fp8")
        if kind != "fp8" or HAS_FP8_CACHE
    }


@pytest.mark.parametrize("kind", ["dynamic", "static", "sliding", pytest.param("fp8", marks=needs_fp8_cache)])
def test_report_kv_bytes_equal_arithmetic(runs: dict[str, Path], kind: str) -> None:
    # GIVEN a recorded run WHEN `kvtrace report --json` reads it
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(runs[kind]), "--json", "-q"]) == 0
    data = json.loads(out.getvalue())
    # THEN the final per-layer K and V storage bytes are the arithmetic of the last step
    last = _expected_layer_bytes(kind, NEW)
    assert data["source"]["kind"] == "run"
    assert [(layer["k_bytes"], layer["v_bytes"]) for layer in data["kv"]["per_layer"]] == [
        (last // 2, last // 2)
    ] * LAYERS
    assert data["kv"]["final_bytes"] == LAYERS * last
    # and at every step, every layer's live KV bytes equal the arithmetic
    _, report = build_report(runs[kind])
    kv_log = build_report(runs[kind])[0].meta["kv"]
    assert sorted(kv_log.step_live) == list(range(1, NEW + 1))
    for step, live in kv_log.step_live.items():
        assert live == {layer: _expected_layer_bytes(kind, step) for layer in range(LAYERS)}, step
    # the CPU peak covers weights + KV, and KV at the peak is at most the KV peak
    cpu = data["devices"][0]
    assert cpu["device"] == "cpu"
    assert cpu["categories_at_peak"]["kv"] <= data["kv"]["peak_bytes"]
    model = build_model(SIZE)
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    assert cpu["categories_at_peak"]["weights"] == sum(tensors.values())
    assert report.kv.allocated_bytes_total >= report.kv.final_bytes


@pytest.mark.parametrize("window", [WINDOW, PROMPT + NEW + 8])
def test_static_sliding_cache_holds_the_window_or_what_static_holds(tmp_path: Path, window: int) -> None:
    # GIVEN sweep's and demo's static_sliding cache, with a window narrower, then wider, than the context
    _, report = build_report(_record(tmp_path / "run", "static_sliding", window=window, profiler=False))
    # THEN each layer holds min(window, every token generate() feeds: prompt + new - 1), as generate() sizes
    # its own static cache; wider than the context, exactly what `static` holds
    tokens = min(window, PROMPT + NEW - 1)
    assert report.kv.final_bytes == LAYERS * 2 * KV_HEADS * HEAD_DIM * tokens * BATCH * 4
    if window > PROMPT + NEW:
        assert report.kv.final_bytes == LAYERS * _expected_layer_bytes("static", NEW)
    assert report.kv.allocated_bytes_total == report.kv.final_bytes  # allocated once, written in place


def test_dynamic_churn_is_the_sum_of_every_growth(runs: dict[str, Path]) -> None:
    _, report = build_report(runs["dynamic"])
    expected = LAYERS * sum(_expected_layer_bytes("dynamic", step) for step in range(1, NEW + 1))
    assert report.kv.allocated_bytes_total == expected
    assert (
        report.kv.bytes_per_token_measured
        == report.kv.bytes_per_token_expected
        == LAYERS * 2 * KV_HEADS * HEAD_DIM * 4
    )


def test_kv_log_join_and_stack_rules_agree(tmp_path: Path) -> None:
    # GIVEN a run recorded with Python stacks
    run = _record(tmp_path / "stacks", "dynamic", with_stack=True)
    source, _ = build_report(run)
    device = source.devices[0]
    allocs = device.delta_bytes > 0
    by_log = allocs & (device.method == METHOD_KV_LOG)
    # WHEN the stack rules alone classify the same allocations
    categories, _ = _frame_categories(source.frames, RULES)
    has_stack = device.frame_id >= 0
    by_rule = allocs & has_stack & (categories[np.maximum(device.frame_id, 0)] == KV)
    # THEN both find every KV storage of the log, and the same ones
    storages = len(source.meta["kv"].storages)
    assert int(by_log.sum()) == storages == LAYERS * 2 * NEW
    assert np.array_equal(by_log, by_rule)


def _kv_category_bytes(run: Path) -> tuple[int, int, int]:
    """(allocated, peak live, final live) of the events attribution calls KV, from the device's events."""
    source, _ = build_report(run)
    device = source.devices[0]
    kv_deltas = np.where(device.category == KV, device.delta_bytes, 0)
    live = np.cumsum(kv_deltas)
    return int(kv_deltas[kv_deltas > 0].sum()), int(live.max()), int(live[-1])


@pytest.mark.parametrize("kind", [pytest.param("fp8", marks=needs_fp8_cache), "static_sliding"])
def test_stacks_leave_the_kv_category_to_the_kv_log(tmp_path: Path, kind: str) -> None:
    # GIVEN caches whose update() allocates temporaries beside the KV storage (an fp8 cache's dequantized
    # copies, a sliding window's roll), recorded with and without Python stacks
    plain = _record(tmp_path / "plain", kind)
    stacked = _record(tmp_path / "stacks", kind, with_stack=True)
    # the stacks do name those temporaries as the cache's update: more allocations than the log's storages
    source, _ = build_report(stacked)
    device = source.devices[0]
    categories, _ = _frame_categories(source.frames, RULES)
    in_update = (device.delta_bytes > 0) & (device.frame_id >= 0)
    in_update &= categories[np.maximum(device.frame_id, 0)] == KV
    assert int(in_update.sum()) > len(source.meta["kv"].storages)
    # THEN the KV category holds the KV log's storages alone, with stacks or without: the arithmetic
    per_token_row = KV_HEADS * HEAD_DIM * BATCH  # elements of one token of K (or V), every row
    if kind == "fp8":
        # every step quantizes K and V anew (1 byte an element); the float32 scales are made once
        allocated = LAYERS * 2 * (per_token_row * sum(PROMPT + step - 1 for step in range(1, NEW + 1)) + 4)
        final = LAYERS * _expected_layer_bytes("fp8", NEW)
        # the last step's last layer holds its previous K and V data until the new ones are made
        peak = final + 2 * per_token_row * (PROMPT + NEW - 2)
    else:
        # one buffer per layer's K and V, min(window, every token fed) positions, float32, written in place
        allocated = peak = final = LAYERS * 2 * per_token_row * min(WINDOW, PROMPT + NEW - 1) * 4
    assert _kv_category_bytes(plain) == _kv_category_bytes(stacked) == (allocated, peak, final)
    assert not (device.method[device.category == KV] == METHOD_STACK_RULE).any()


def test_every_kv_storage_joins_an_allocation(runs: dict[str, Path]) -> None:
    source, _ = build_report(runs["dynamic"])
    device = source.devices[0]
    joined = int(((device.delta_bytes > 0) & (device.method == METHOD_KV_LOG)).sum())
    assert joined == len(source.meta["kv"].storages)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_renders_in_headless_chromium(runs: dict[str, Path], tmp_path: Path) -> None:
    html = tmp_path / "timeline.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(runs["sliding"]), "-o", str(html), "-q"]) == 0
    assert "cdn" not in html.read_text(encoding="utf-8")[:2000].lower()
    proc = subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=5000",
            "--dump-dom",
            html.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    console_errors = [
        line for line in proc.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()
    ]
    assert console_errors == []
    dom = proc.stdout
    assert 'class="plot-container plotly"' in dom
    assert dom.count('class="trace scatter') >= 4  # weights, kv, other, allocated
    assert "heatmaplayer" in dom or 'class="hm"' in dom or "heatmap" in dom


def test_report_exports_counter_track_and_tensorboard_scalars(runs: dict[str, Path]) -> None:
    import gzip

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs["dynamic"]
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(run), "-q"]) == 0
    with gzip.open(run / "kv_counters.trace.json.gz", "rt") as fh:
        trace = json.load(fh)
    per_layer = [e["args"] for e in trace["traceEvents"] if e.get("name") == "KV bytes per layer"]
    assert per_layer[-1] == {f"L{layer}": _expected_layer_bytes("dynamic", NEW) for layer in range(LAYERS)}
    accumulator = EventAccumulator(str(run / "tb_scalars"))
    accumulator.Reload()
    totals = [(event.step, event.value) for event in accumulator.Scalars("kv/total_bytes")]
    expected = [(step, float(LAYERS * _expected_layer_bytes("dynamic", step))) for step in range(1, NEW + 1)]
    assert totals == expected


@pytest.mark.parametrize("name", ["dynamic_b2", "sliding_b2", "static_b2"])
def test_a_cpu_runs_curve_is_its_weights_and_the_running_sum_of_bytes(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The CPU's 'Total Allocated' is the profiler's own counter and misses frees made between two profiler
    # sessions (static_b2 was recorded after sliding_b2 in one process: its total starts 32 KiB high)
    run = SAMPLES / name
    (trace,) = (run / "profiler").glob("*.pt.trace.json.gz")
    events = json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    level = peak = 0
    for event in memory:
        level += event["args"]["Bytes"]
        peak = max(peak, level)
    lines = (run / "weights.jsonl").read_text().splitlines()
    weights = sum(json.loads(line)["storage_bytes"] for line in lines)
    assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    (cpu,) = json.loads(capsys.readouterr().out)["devices"]
    assert (cpu["peak_allocated_bytes"], cpu["final_allocated_bytes"]) == (weights + peak, weights + level)


def test_a_run_without_a_trace_counts_each_layers_kv_on_the_device_it_sits_on(tmp_path: Path) -> None:
    # GIVEN a profiler=False run of a 4-layer model whose cache the caller keeps, its files then set as a GPU
    # run writes them for a cache split over two devices (an offloaded cache, a `device_map` putting layers
    # 2-3 on the CPU): the weights and layers 0-1 on cuda:0, layers 2-3 on the CPU
    size = tiny_size(4, KV_HEADS)
    model = build_model(size)
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0, return_dict_in_generate=True,
        )  # fmt: skip
    weights = weights_on_cuda0(run)
    events = [json.loads(line) for line in (run / "kv_events.jsonl").read_text().splitlines()]
    for event in events:
        if "device" in event:
            event["device"] = "cuda:0" if event["layer"] < 2 else "cpu"
    (run / "kv_events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))

    # WHEN it is reported
    text = io.StringIO()
    with redirect_stdout(text):
        assert main(["report", str(run), "--json", "--no-export", "-q"]) == 0
    report = json.loads(text.getvalue())

    # THEN each device holds its own layers' KV (2 of the 4, K and V, prompt + new - 1 tokens), the weights
    # sit on the GPU, and the run's own device comes first
    two_layers = 2 * 2 * KV_HEADS * HEAD_DIM * (PROMPT + NEW - 1) * BATCH * 4
    # on a GPU, as the caching allocator's blocks that hold them: each rounded up to 512 bytes
    weights_bytes = sum(-(-w["storage_bytes"] // 512) * 512 for w in weights)
    devices = {d["device"]: d for d in report["devices"]}
    assert [d["device"] for d in report["devices"]] == ["cuda:0", "cpu"]
    assert devices["cuda:0"]["final_allocated_bytes"] == weights_bytes + two_layers
    assert devices["cpu"]["final_allocated_bytes"] == two_layers
    assert devices["cuda:0"]["categories_at_peak"]["weights"] == weights_bytes
    assert devices["cpu"]["categories_at_peak"]["weights"] == 0
    assert len(out.past_key_values.layers) == 4  # the cache was held to the end


def test_the_html_draws_a_device_without_events_beside_one_with_them(tmp_path: Path) -> None:
    # GIVEN a profiler=False run, its files then set as a GPU run with its cache offloaded writes them: the
    # weights on cuda:0, which has no event (no KV is written there), and every KV storage on the CPU
    model = build_model(SIZE)
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=False):
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip
    weights = weights_on_cuda0(run)

    # WHEN its HTML report is written
    page = tmp_path / "report.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(run), "-o", str(page), "--no-export", "-q"]) == 0
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")

    # THEN cuda:0, which the report names, is drawn (it was left out): its weights as a flat line across the
    # x the CPU's KV events span, at the weights' bytes as the caching allocator's 512-byte blocks hold them
    weights_bytes = sum(-(-w["storage_bytes"] // 512) * 512 for w in weights)
    assert weights_bytes < 2**20 and layout["yaxis"]["title"]["text"] == "KiB"
    by_name = {trace["name"]: trace for trace in traces}
    cpu_x = by_name["cpu allocated"]["x"]
    for name, level in (("weights", weights_bytes), ("kv", 0), ("other", 0), ("allocated", weights_bytes)):
        gpu = by_name[f"cuda:0 {name}"]
        assert [y * 1024 for y in gpu["y"]] == [level, level]
        assert gpu["x"] == [min(cpu_x), max(cpu_x)]
    # AND the CPU's curve peaks in the last forward, as its last storage is grown: the K and V of every
    # layer over prompt + new - 2 tokens, the others already grown by one token, and the new storage (prompt +
    # new - 1 tokens) beside the old one it replaces
    token = KV_HEADS * HEAD_DIM * BATCH * 4
    held = LAYERS * 2 * (PROMPT + NEW - 2) * token
    peak = held + (LAYERS * 2 - 1) * token + (PROMPT + NEW - 1) * token
    assert max(by_name["cpu allocated"]["y"]) * 1024 == peak


def test_the_group_html_draws_each_ranks_device_without_events_at_its_level(tmp_path: Path) -> None:
    # GIVEN a group of two ranks (data parallel: rank r generates for r + 1 rows), each a profiler=False run
    # of a Llama of 6 layers, its files set as a GPU run with its cache offloaded writes them: the weights on
    # cuda:0, which has no event, and every KV storage on the CPU
    layers = 6
    group = tmp_path / "group"
    weights = {}
    for rank in (0, 1):
        run = group / f"rank-{rank}"
        record_generate(build_model(tiny_size(layers, KV_HEADS)), run, rank + 1, PROMPT, NEW, profiler=False)
        weights[rank] = weights_on_cuda0(run)
        manifest = json.loads((run / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "rank": rank, "world_size": 2}))

    # WHEN the group's HTML report and its JSON are written
    page = tmp_path / "group.html"
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["report", str(group), "-o", str(page), "--no-export", "-q"]) == 0
        assert main(["report", str(group), "--json", "--no-export", "-q"]) == 0
    report = json.loads(out.getvalue()[out.getvalue().index("{") :])
    traces, layout = page_figure(page.read_text(), "kvtrace-ranks")

    # THEN every rank's cuda:0, which its report names, is drawn (it was left out): its weights, as the
    # caching allocator's 512-byte blocks hold them, flat across the x its CPU's KV events span; over 1 MiB,
    # they set the page's unit (it was KiB, the CPU's KV alone)
    assert layout["yaxis"]["title"]["text"] == "MiB" and layout["yaxis3"]["title"]["text"] == "MiB"
    for rank in (0, 1):
        held = sum(-(-w["storage_bytes"] // 512) * 512 for w in weights[rank])
        assert held > 2**20
        mine = {t["name"]: t for t in traces if t["hovertemplate"].startswith(f"rank {rank} ")}
        cpu_x = mine["cpu allocated"]["x"]
        for name, level in (("weights", held), ("kv", 0), ("other", 0), ("allocated", held)):
            gpu = mine[f"cuda:0 {name}"]
            assert [y * 2**20 for y in gpu["y"]] == [level, level]
            assert gpu["x"] == [min(cpu_x), max(cpu_x)]
        # AND each device's drawn peak is the one the report's JSON gives it: the weights for cuda:0, for the
        # CPU its last storage grown (K and V of every layer over prompt + new - 2 tokens, the others grown
        # by one token, the new storage beside the old one it replaces)
        token = KV_HEADS * HEAD_DIM * (rank + 1) * 4
        kv_peak = (
            layers * 2 * (PROMPT + NEW - 2) * token + (layers * 2 - 1) * token + (PROMPT + NEW - 1) * token
        )
        peaks = {d["device"]: d["peak_allocated_bytes"] for d in report["devices"] if d["rank"] == rank}
        drawn = {f"rank{rank}/{dev}": max(mine[f"{dev} allocated"]["y"]) * 2**20 for dev in ("cuda:0", "cpu")}
        assert drawn == peaks == {f"rank{rank}/cuda:0": held, f"rank{rank}/cpu": kv_peak}


@pytest.mark.parametrize("profiler", [True, False])
def test_the_pages_step_markers_number_steps_from_the_prefill_with_or_without_the_profiler(
    tmp_path: Path, profiler: bool
) -> None:
    # GIVEN a run of two generate() calls of NEW tokens each, recorded with the profiler on (its trace holds
    # the recorder's ranges "kvtrace/prefill", "kvtrace/decode 1", ... which restart at each prefill) or off
    model = build_model(SIZE)
    ids = torch.randint(3, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    run = tmp_path / "run"
    with torch.no_grad(), kvtrace.record(run, model=model, profiler=profiler):
        for _ in range(2):
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip

    # WHEN its HTML report is written
    page = tmp_path / "report.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(run), "-o", str(page), "--no-export", "-q"]) == 0
    traces, _ = page_figure(page.read_text(), "kvtrace-timeline")

    # THEN the step markers say "step N phase" with step 1 = the first prefill, as the rest of the page and
    # the text report number them: each call's NEW forwards (a prefill, then NEW - 1 decodes), the second
    # call's prefill step NEW + 1 (its range "kvtrace/prefill", its first decode's "kvtrace/decode 1")
    markers = next(trace for trace in traces if trace["name"] == "step")["text"]
    expected = [
        f"step {call * NEW + forward} {'prefill' if forward == 1 else 'decode'}"
        for call in range(2)
        for forward in range(1, NEW + 1)
    ]
    assert markers == expected


def _summary_cell(page: str, heading: str) -> str:
    """The text of the summary table's cell beside `heading`."""
    import html as html_text
    import re

    cell = re.search(f"<th>{re.escape(heading)}</th><td>(.*?)</td>", page)
    assert cell is not None, f"no summary row {heading!r}"
    return html_text.unescape(cell.group(1))


def test_the_page_explains_a_sliding_windows_bytes_per_token_and_its_evictions(tmp_path: Path) -> None:
    # GIVEN the sliding_b2 sample: batch 2, a prompt of `prompt` tokens, 16 new, a window of 16 on every layer
    run = SAMPLES / "sliding_b2"
    manifest = json.loads((run / "manifest.json").read_text())
    geometry = manifest["model"]
    layers, window, batch, new = geometry["num_layers"], 16, 2, 16
    row_bytes = geometry["num_kv_heads"] * geometry["head_dim"] * 4  # a token of one row of K, float32
    token_bytes = layers * 2 * row_bytes  # K and V
    # the prefill's storage holds the whole prompt (its view, the last window - 1 tokens)
    prompt = json.loads((run / "kv_events.jsonl").read_text().splitlines()[0])["storage_bytes"] // (
        batch * row_bytes
    )

    # WHEN its HTML report is written
    page = tmp_path / "report.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(run), "-o", str(page), "--no-export", "-q"]) == 0
    text = page.read_text()

    # THEN the bytes per token say why measured and arithmetic differ, as the text report does: each layer
    # holds window - 1 tokens in a storage of `window` positions, the spare one's bytes spread over the tokens
    held = window - 1
    measured = token_bytes * window / held
    per_token = _summary_cell(text, "KV bytes/token measured vs arithmetic")
    assert per_token.startswith(f"{measured:,.1f} vs {token_bytes:,} (")
    assert (
        f"their spare positions are {measured - token_bytes:,.1f} of the measured bytes per token"
        in per_token
    )
    # AND the evicted tokens say what evicted them: every token fed but the window - 1 kept, on each row and
    # layer, by the sliding window
    evicted = (prompt + new - 1 - held) * batch * layers
    assert (
        _summary_cell(text, "evicted tokens (all rows and layers)")
        == f"{evicted:,} (sliding window {evicted:,})"
    )


def test_the_nvml_memory_axis_of_a_gpu_run_has_its_own_round_ticks_from_zero(tmp_path: Path) -> None:
    # GIVEN the H200 run, whose samples carry NVML's device memory (16.4 to 72.3 GiB)
    run = SAMPLES / "h200" / "dynamic_b24"
    page = tmp_path / "report.html"
    with redirect_stdout(io.StringIO()):
        assert main(["report", str(run), "-o", str(page), "--no-export", "-q"]) == 0
    traces, layout = page_figure(page.read_text(), "kvtrace-timeline")
    (memory,) = [trace for trace in traces if trace["name"] == "GPU memory used (NVML, all processes)"]
    axis = layout["yaxis" + memory["yaxis"].removeprefix("y")]
    # THEN its axis, overlaying the % axis, starts at 0 and picks its own ticks: plotly synced them to the %
    # axis's grid before (0, 28.2, 56.3 GiB; 13.3, 36.3, 59.3 without the zero)
    assert axis["overlaying"] and axis["title"]["text"] == "device memory (GiB)"
    assert (axis["rangemode"], axis["tickmode"]) == ("tozero", "auto")
    assert min(memory["y"]) > 16


def test_a_long_runs_token_counts_carry_thousands_separators(capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN the H200 run: 24 rows of 8,199 tokens (its bytes already said "402,997,248" beside "8199")
    run = SAMPLES / "h200" / "dynamic_b24"
    assert main(["report", str(run), "--json", "--no-export"]) == 0
    kv = json.loads(capsys.readouterr().out)["kv"]
    assert (kv["tokens_held"], kv["batch"]) == (8199, 24)
    # WHEN its text report is read, THEN the counts read as the bytes beside them do
    assert main(["report", str(run), "--no-export"]) == 0
    text = capsys.readouterr().out
    assert f"({kv['tokens_held']:,} tokens x {kv['batch']} rows)" in text and "8199" not in text
    layer0 = next(line for line in text.splitlines() if line.split()[:1] == ["0"])
    assert layer0.split()[3] == "8,199"
